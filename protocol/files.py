"""Atomic file replacement: readers see the old file or the new one, never a mix or a half.

One helper for every package: write to a unique temporary name in the same directory (two writers
never share a temp file), fsync it, rename it over the target, fsync the directory so the rename
itself survives a power cut.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def fsync_dir(path: Path | str) -> None:
    """Make a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A hidden, unique sibling of `path` (same directory, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write(path: Path | str, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` so readers see either the old or the new file, never a mix.

    `durable=False` skips both fsyncs: the replacement survives a killed process (the page cache
    does) but maybe not a power cut, which may also leave the file empty. Only for files whose
    reader copes with that, like the agent's staging bitmap.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: Path | str, text: str, *, durable: bool = True) -> None:
    """`atomic_write` of UTF-8 text."""
    atomic_write(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: Path | str, obj: Any, *, indent: int | None = 1, sort_keys: bool = True,
                      durable: bool = True) -> None:
    """`atomic_write` of `obj` as JSON (NaN refused: sanitise with protocol.jsonsafe first)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False)
    atomic_write(path, text.encode("utf-8"), durable=durable)
