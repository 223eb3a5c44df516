"""The model artifact container: a folder of four files, shipped as a deterministic tar.gz.

Unpacking accepts exactly the known file names as regular files, bounds every size (no gzip
bombs, no path traversal, no links), so nothing received is ever used as a path.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from protocol.errors import ProtocolError
from protocol.limits import DEFAULT_LIMITS

MODEL_FILE = "model.tflite"
ITEMS_FILE = "items.json"
METRICS_FILE = "metrics.json"
GOLDEN_FILE = "golden.json"
ARTIFACT_FILES = (MODEL_FILE, ITEMS_FILE, METRICS_FILE, GOLDEN_FILE)


def pack_artifact(folder: Path) -> bytes:
    """Deterministic tar.gz of the artifact folder (same bytes for the same files)."""
    folder = Path(folder)
    missing = [n for n in ARTIFACT_FILES if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"artifact {folder} lacks {missing}")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ARTIFACT_FILES:
            data = (folder / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def unpack_artifact(blob: bytes, dest: Path, max_unpacked_bytes: int = DEFAULT_LIMITS.max_unpacked_bytes) -> Path:
    """Extract a packed artifact into `dest` (which must not exist yet) and fsync every file."""
    dest = Path(dest)
    raw = _bounded_gunzip(blob, max_unpacked_bytes)
    try:
        tar = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")  # noqa: SIM115 - closed below
        tar.getmembers()
    except (EOFError, tarfile.TarError) as exc:
        raise ProtocolError(f"artifact is not a valid tar archive: {exc}") from exc
    with tar:  # disk errors (ENOSPC) propagate as OSError: they are not the sender's fault
        _extract_known_files(tar, dest)
    return dest


def _extract_known_files(tar: tarfile.TarFile, dest: Path) -> None:
    """Write exactly the artifact's four regular files into a new `dest`, fsyncing each."""
    members = tar.getmembers()
    seen = {m.name for m in members}
    if len(members) != len(ARTIFACT_FILES) or seen != set(ARTIFACT_FILES):
        raise ProtocolError(f"artifact holds {sorted(seen)!r:.200}, expected exactly {list(ARTIFACT_FILES)}")
    for m in members:
        if not m.isreg():
            raise ProtocolError(f"artifact member {m.name!r} is not a regular file")
    dest.mkdir(parents=True, exist_ok=False)
    for m in members:
        fh = tar.extractfile(m)
        if fh is None:
            raise ProtocolError(f"artifact member {m.name!r} has no data")
        with open(dest / m.name, "wb") as out:
            out.write(fh.read())
            out.flush()
            os.fsync(out.fileno())


_GUNZIP_STEP = 1024 * 1024


def _bounded_gunzip(blob: bytes, limit: int) -> bytes:
    # Read in steps: gz.read(limit + 1) would allocate the whole limit (256 MiB) up front, which
    # fails on a device with a memory cap even for a tiny artifact.
    data = bytearray()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(blob)) as gz:
            while len(data) <= limit:
                piece = gz.read(min(_GUNZIP_STEP, limit + 1 - len(data)))
                if not piece:
                    break
                data += piece
    except (OSError, EOFError) as exc:
        raise ProtocolError(f"artifact is not valid gzip: {exc}") from exc
    if len(data) > limit:
        raise ProtocolError(f"artifact unpacks to more than {limit} bytes")
    return bytes(data)


def _read_json(folder: Path, name: str) -> dict[str, Any]:
    path = Path(folder) / name
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"{path}: expected a JSON object")
    return obj


def read_items(folder: Path) -> dict[str, Any]:
    """items.json: index -> [stock_code, description], plus the popularity fallback list."""
    obj = _read_json(folder, ITEMS_FILE)
    items = obj.get("items")
    if not isinstance(items, list) or not items or not all(isinstance(i, list) and len(i) == 2 for i in items):
        raise ProtocolError(f"{folder}/{ITEMS_FILE}: 'items' must be a non-empty list of [code, description]")
    return obj


def read_metrics(folder: Path) -> dict[str, Any]:
    """metrics.json: quality, size, split, training config, runtime compatibility."""
    return _read_json(folder, METRICS_FILE)


def read_golden(folder: Path) -> dict[str, Any]:
    """golden.json: real histories with this model's reference top-K."""
    obj = _read_json(folder, GOLDEN_FILE)
    for key in ("histories", "item_ids"):
        if not isinstance(obj.get(key), list) or not obj[key]:
            raise ProtocolError(f"{folder}/{GOLDEN_FILE}: {key!r} must be a non-empty list")
    if len(obj["histories"]) != len(obj["item_ids"]):
        raise ProtocolError(f"{folder}/{GOLDEN_FILE}: histories and item_ids differ in length")
    return obj
