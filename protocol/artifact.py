"""The model artifact container: a folder of four files, shipped as a deterministic tar.gz.

Unpacking accepts exactly the known file names as regular files, bounds every size (no gzip
bombs, no path traversal, no links), so nothing received is ever used as a path.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

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


def unpacked_size(folder: Path) -> int:
    """Bytes the artifact's files take once unpacked: what a manifest declares as `unpacked_size`."""
    return sum((Path(folder) / name).stat().st_size for name in ARTIFACT_FILES)


def unpack_artifact(blob: bytes | Path, dest: Path, max_unpacked_bytes: int = DEFAULT_LIMITS.max_unpacked_bytes,
                    *, declared_size: int | None = None) -> Path:
    """Extract a packed artifact (bytes, or the path of the packed file) into a new `dest`, fsyncing every file.

    Streaming, in steps of `_STEP` bytes: memory stays a small constant whatever the archive
    claims. Each member's size is checked against what is left of the budget (the files may
    total at most `declared_size` when the manifest declares it, and never more than
    `max_unpacked_bytes`) before a byte of it is decompressed; the whole decompressed stream,
    padding and trailing data included, is bounded by `max_unpacked_bytes` as well. Anything
    refused raises ProtocolError and leaves no `dest`; disk errors (ENOSPC) propagate as OSError.
    """
    dest = Path(dest)
    budget = max_unpacked_bytes if declared_size is None else min(declared_size, max_unpacked_bytes)
    dest.mkdir(parents=True, exist_ok=False)
    try:
        with (open(blob, "rb") if isinstance(blob, Path) else io.BytesIO(blob)) as raw:
            stream = _BoundedGunzip(raw, max_unpacked_bytes)
            _extract_stream(stream, dest, budget, declared_size)
            stream.drain()  # to the end: trailing data is bounded too, and gzip checks its CRC there
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


_STEP = 1024 * 1024
_BLOCK = 512


class _BoundedGunzip:
    """Decompressed bytes of a gzip stream, read in bounded steps, refused past `limit` in total."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._gz = gzip.GzipFile(fileobj=raw, mode="rb")
        self.limit = limit
        self.count = 0

    def read(self, n: int) -> bytes:
        try:
            data = self._gz.read(n)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise ProtocolError(f"artifact is not valid gzip: {exc}") from exc
        self.count += len(data)
        if self.count > self.limit:
            raise ProtocolError(f"artifact unpacks to more than {self.limit} bytes")
        return data

    def read_exact(self, n: int, what: str) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise ProtocolError(f"artifact is truncated in {what} ({len(data)} of {n} bytes)")
        return data

    def drain(self) -> None:
        while self.read(_STEP):
            pass


def _extract_stream(stream: _BoundedGunzip, dest: Path, budget: int, declared_size: int | None) -> None:
    """Read tar headers one 512-byte block at a time; write only the four known regular files."""
    seen: set[str] = set()
    total = 0
    while True:
        header = stream.read_exact(_BLOCK, "a tar header")
        if header == bytes(_BLOCK):  # end of archive
            break
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise ProtocolError(f"artifact is not a valid tar archive: {exc}") from exc
        name = info.name
        if name not in ARTIFACT_FILES or name in seen:
            what = "a second" if name in seen else "unexpected member"
            raise ProtocolError(f"artifact holds {what} {name!r:.100}; expected exactly {list(ARTIFACT_FILES)}")
        if not info.isreg():
            raise ProtocolError(f"artifact member {name!r} is not a regular file")
        if total + info.size > budget:
            bound = f"its declared unpacked_size of {budget}" if budget == declared_size else str(budget)
            raise ProtocolError(f"artifact unpacks to more than {bound} bytes ({name} alone is {info.size} bytes)")
        seen.add(name)
        total += info.size
        _copy_member(stream, dest / name, info.size)
        stream.read_exact(-info.size % _BLOCK, "padding")
    if seen != set(ARTIFACT_FILES):
        raise ProtocolError(f"artifact holds {sorted(seen)!r:.200}, expected exactly {list(ARTIFACT_FILES)}")


def _copy_member(stream: _BoundedGunzip, path: Path, size: int) -> None:
    with open(path, "wb") as out:
        left = size
        while left:
            piece = stream.read_exact(min(_STEP, left), f"{path.name}")
            out.write(piece)
            left -= len(piece)
        out.flush()
        os.fsync(out.fileno())


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
