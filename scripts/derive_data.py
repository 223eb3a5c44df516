"""Rebuild data/retail/ (the compact derived copy of UCI Online Retail) from the raw CSV parts.

Usage: python scripts/derive_data.py [--raw ../shared/data] [--out data/retail]
The output is byte-reproducible; ``tests/test_data.py`` checks it matches the raw data.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compression.data import DERIVED_DIR, RAW_DIR, read_raw_sequences, write_derived  # noqa: E402

_LOGGER = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Filter the raw parts as quality.md says and write items.tsv.gz + sequences.tsv.gz."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=RAW_DIR, help=f"raw CSV parts (default: {RAW_DIR})")
    parser.add_argument("--out", type=Path, default=DERIVED_DIR,
                        help=f"output directory (default: {DERIVED_DIR})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sequences, descriptions = read_raw_sequences(args.raw)
    for path in write_derived(sequences, descriptions, args.out):
        _LOGGER.info("wrote %s (%d bytes)", path, path.stat().st_size)
    _LOGGER.info("%d customers, %d items, %d interactions", len(sequences), len(descriptions),
                 sum(len(s) for s in sequences.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
