"""Online Retail -> next-item dataset, exactly as /work/shared/notes/quality.md prescribes.

Two sources give the same ``Dataset``: the raw UCI CSV parts (``../shared/data`` beside the
repository) and the compact derived copy shipped in ``data/retail/`` (made by
``scripts/derive_data.py``). Only stdlib csv/gzip is used to read them, so loading is cheap
and has no pandas dependency.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_LOGGER = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
RAW_DIR = REPO_ROOT.parent / "shared" / "data"
DERIVED_DIR = REPO_ROOT / "data" / "retail"
RAW_PARTS = ("online_retail.part1.csv.gz", "online_retail.part2.csv.gz", "online_retail.part3.csv.gz")
ITEMS_FILE = "items.tsv.gz"
SEQUENCES_FILE = "sequences.tsv.gz"
MIN_ITEMS = 5
DEFAULT_WINDOW = 20
PADDING_DESCRIPTION = "<padding>"
SPLITS = ("val", "test")


class DataError(Exception):
    """Raised when a data source is missing or does not have the expected shape."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Item vocabulary plus per-customer purchase sequences, split leave-last-out.

    ``codes[i]``/``descriptions[i]`` describe model index ``i``; index 0 is padding.
    ``sequences[u]`` holds customer ``u``'s item indices in purchase order; the last one is
    the test target, the second to last the validation target, the rest is training data.
    """

    codes: list[str]
    descriptions: list[str]
    customers: list[str]
    sequences: list[np.ndarray]
    source: str = ""
    popularity: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.codes) != len(self.descriptions):
            raise DataError(f"{len(self.codes)} codes but {len(self.descriptions)} descriptions")
        if len(self.customers) != len(self.sequences):
            raise DataError(f"{len(self.customers)} customers but {len(self.sequences)} sequences")
        counts = np.zeros(len(self.codes), dtype=np.int64)
        for seq in self.sequences:
            if len(seq) < 3:
                raise DataError(f"a sequence has {len(seq)} items; leave-last-out needs at least 3")
            np.add.at(counts, seq[:-2], 1)
        object.__setattr__(self, "popularity", counts)

    @property
    def num_items(self) -> int:
        """V: the number of real items (model indices 1..V)."""
        return len(self.codes) - 1

    @property
    def num_interactions(self) -> int:
        """Total purchase events over all customers (all splits)."""
        return int(sum(len(s) for s in self.sequences))

    def train_sequences(self) -> list[np.ndarray]:
        """Each customer's training part: everything except the last two items."""
        return [s[:-2] for s in self.sequences]

    def popular(self, n: int = 100) -> list[int]:
        """Top-``n`` item indices by training popularity (ties broken by lower index)."""
        order = np.argsort(-self.popularity[1:], kind="stable") + 1
        return [int(i) for i in order[:n]]

    def training_pairs(self, window: int = DEFAULT_WINDOW) -> tuple[np.ndarray, np.ndarray]:
        """Sliding windows over the training parts: (histories int32 [N, window], next item int32 [N]).

        Every training item but each customer's first is a target; its history is the up to
        ``window`` items before it, left-padded with 0.
        """
        _check_window(window)
        parts: list[np.ndarray] = []
        target_pos: list[np.ndarray] = []
        offset = 0
        pad = np.zeros(window, dtype=np.int32)
        for seq in self.train_sequences():
            # `window` zeros between customers keep histories from crossing customers.
            parts.append(pad)
            parts.append(seq)
            start = offset + window
            target_pos.append(np.arange(start + 1, start + len(seq), dtype=np.int64))
            offset = start + len(seq)
        flat = np.concatenate(parts).astype(np.int32)
        pos = np.concatenate(target_pos)
        windows = np.lib.stride_tricks.sliding_window_view(flat, window)
        return np.ascontiguousarray(windows[pos - window]), flat[pos].copy()

    def eval_histories(self, split: str = "test",
                       window: int = DEFAULT_WINDOW) -> tuple[np.ndarray, np.ndarray]:
        """(histories int32 [U, window], targets int32 [U]) for the val or test target of every customer."""
        _check_window(window)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        cut = 2 if split == "val" else 1
        histories = np.zeros((len(self.sequences), window), dtype=np.int32)
        targets = np.empty(len(self.sequences), dtype=np.int32)
        for u, seq in enumerate(self.sequences):
            prefix = seq[: len(seq) - cut][-window:]
            histories[u, window - len(prefix):] = prefix
            targets[u] = seq[len(seq) - cut]
        return histories, targets

    def split_summary(self) -> dict:
        """The ``split`` block of metrics.json."""
        return {
            "customers": len(self.customers),
            "items": self.num_items,
            "interactions": self.num_interactions,
            "test_users": len(self.customers),
            "protocol": "leave-last-out",
        }


def _check_window(window: int) -> None:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def _is_product_code(code: str) -> bool:
    return len(code) >= 5 and code[:5].isdigit()


def read_raw_sequences(raw_dir: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Apply the quality.md filters to the raw CSV parts.

    Returns (customer id -> ordered stock codes of customers with >= MIN_ITEMS items,
    stock code -> most frequent non-empty stripped description among the kept rows). The
    vocabulary is every product code that survives the row filters (3,659), including the
    few bought only by customers later dropped for having fewer than MIN_ITEMS items.
    """
    missing = [p for p in RAW_PARTS if not (raw_dir / p).is_file()]
    if missing:
        raise DataError(f"raw Online Retail parts missing in {raw_dir}: {missing}")
    rows: dict[str, list[tuple[str, str, int, str]]] = defaultdict(list)
    desc_counts: dict[str, Counter] = defaultdict(Counter)
    row_no = 0
    for part in RAW_PARTS:
        with gzip.open(raw_dir / part, "rt", encoding="utf-8", newline="") as fh:
            for rec in csv.DictReader(fh):
                row_no += 1
                customer = rec["customer_id"].strip()
                code = rec["stock_code"].strip().upper()
                invoice = rec["invoice"].strip()
                if not customer or invoice.startswith("C") or not _is_product_code(code):
                    continue
                if int(rec["quantity"]) <= 0 or float(rec["unit_price"]) <= 0:
                    continue
                rows[customer].append((rec["invoice_date"], invoice, row_no, code))
                desc = rec["description"].strip()
                if desc:
                    desc_counts[code][desc] += 1
    _LOGGER.info("read %d raw rows from %s; %d customers after row filters", row_no, raw_dir, len(rows))
    sequences: dict[str, list[str]] = {}
    for customer, lines in rows.items():
        lines.sort()
        seen: set[tuple[str, str]] = set()
        codes: list[str] = []
        for _, invoice, _, code in lines:
            if (invoice, code) not in seen:
                seen.add((invoice, code))
                codes.append(code)
        if len(codes) >= MIN_ITEMS:
            sequences[customer] = codes
    kept_codes = {line[3] for lines in rows.values() for line in lines}
    descriptions = {c: _most_common(desc_counts.get(c)) for c in kept_codes}
    return sequences, descriptions


def _most_common(counts: Counter | None) -> str:
    # Ties go to the description seen first (Counter keeps insertion order).
    if not counts:
        return ""
    return counts.most_common(1)[0][0]


def read_derived_sequences(derived_dir: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Read the compact copy written by ``write_derived``: same return shape as ``read_raw_sequences``."""
    missing = [p for p in (ITEMS_FILE, SEQUENCES_FILE) if not (derived_dir / p).is_file()]
    if missing:
        raise DataError(f"derived Online Retail files missing in {derived_dir}: {missing}")
    descriptions: dict[str, str] = {}
    with gzip.open(derived_dir / ITEMS_FILE, "rt", encoding="utf-8", newline="") as fh:
        for line_no, line in enumerate(fh, 1):
            code, sep, desc = line.rstrip("\n").partition("\t")
            if not sep:
                raise DataError(f"{derived_dir / ITEMS_FILE}:{line_no}: expected "
                                f"'code<TAB>description', got {line!r}")
            descriptions[code] = desc
    sequences: dict[str, list[str]] = {}
    with gzip.open(derived_dir / SEQUENCES_FILE, "rt", encoding="utf-8", newline="") as fh:
        for line_no, line in enumerate(fh, 1):
            customer, sep, codes = line.rstrip("\n").partition("\t")
            if not sep:
                raise DataError(f"{derived_dir / SEQUENCES_FILE}:{line_no}: expected "
                                f"'customer<TAB>codes', got {line!r}")
            sequences[customer] = codes.split(" ")
    unknown = {c for codes in sequences.values() for c in codes} - descriptions.keys()
    if unknown:
        raise DataError(f"{len(unknown)} stock codes in {SEQUENCES_FILE} not in {ITEMS_FILE}, "
                        f"e.g. {sorted(unknown)[:5]}")
    return sequences, descriptions


def write_derived(sequences: dict[str, list[str]], descriptions: dict[str, str], out_dir: Path) -> list[Path]:
    """Write the compact derived copy (byte-reproducible: gzip mtime 0, sorted keys)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for text in list(descriptions) + list(descriptions.values()):
        if "\t" in text or "\n" in text:
            raise DataError(f"tab or newline in {text!r} would break the TSV format")
    items_text = "".join(f"{c}\t{descriptions[c]}\n" for c in sorted(descriptions))
    seq_text = "".join(f"{cust}\t{' '.join(sequences[cust])}\n" for cust in sorted(sequences, key=int))
    written = []
    for name, text in ((ITEMS_FILE, items_text), (SEQUENCES_FILE, seq_text)):
        path = out_dir / name
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
            gz.write(text.encode("utf-8"))
        path.write_bytes(buf.getvalue())
        written.append(path)
    return written


def _resolve_source(source: str | None) -> tuple[Path, bool]:
    """(directory, is_raw) for an explicit source or the default raw-then-derived lookup."""
    if source is None:
        if all((RAW_DIR / p).is_file() for p in RAW_PARTS):
            return RAW_DIR, True
        return DERIVED_DIR, False
    path = Path(source)
    if all((path / p).is_file() for p in RAW_PARTS):
        return path, True
    if (path / SEQUENCES_FILE).is_file():
        return path, False
    raise DataError(f"{path} holds neither the raw parts {RAW_PARTS} nor the derived {SEQUENCES_FILE}")


def load_dataset(source: str | None = None, max_customers: int | None = None) -> Dataset:
    """Load Online Retail as a leave-last-out ``Dataset``.

    ``source`` is a directory with the raw CSV parts or the derived copy; by default the raw
    data in ``../shared/data`` when present, else ``data/retail/``. ``max_customers`` keeps
    the first customers by id (deterministic) and re-indexes items to those they bought
    (small vocabularies for fast tests); without it the vocabulary is every kept product code.
    """
    path, is_raw = _resolve_source(source)
    sequences, descriptions = read_raw_sequences(path) if is_raw else read_derived_sequences(path)
    customers = sorted(sequences, key=int)
    codes = sorted(descriptions)
    if max_customers is not None:
        if max_customers < 1:
            raise ValueError(f"max_customers must be >= 1 or None, got {max_customers}")
        customers = customers[:max_customers]
        codes = sorted({c for cust in customers for c in sequences[cust]})
    index = {c: i for i, c in enumerate(codes, 1)}
    seqs = [np.array([index[c] for c in sequences[cust]], dtype=np.int32) for cust in customers]
    dataset = Dataset(
        codes=[""] + codes,
        descriptions=[PADDING_DESCRIPTION] + [descriptions[c] or c for c in codes],
        customers=customers,
        sequences=seqs,
        source=f"{'raw' if is_raw else 'derived'}:{path}",
    )
    _LOGGER.info("dataset from %s: %d customers, %d items, %d interactions",
                 dataset.source, len(customers), dataset.num_items, dataset.num_interactions)
    return dataset
