"""Binary chunk frames for model transfer, and the splitting that matches the manifest.

A frame is `EGC1 | deployment id (14 ASCII) | index u32 | count u32 | sha256(data) 32 B | data`.
Each frame verifies on its own, so duplicates and out-of-order delivery are harmless and a corrupt
frame is dropped and re-requested instead of poisoning the file.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from protocol import names
from protocol.errors import ProtocolError
from protocol.limits import DEFAULT_LIMITS

MAGIC = b"EGC1"
_HEADER = struct.Struct(">4s14sII32s")
HEADER_BYTES = _HEADER.size
_DIGEST_BYTES = 32


@dataclass(frozen=True)
class Chunk:
    """One verified piece of an artifact."""

    deployment_id: str
    index: int
    count: int
    digest: bytes
    data: bytes | memoryview  # a view into the received frame: 64 KiB not copied per chunk


def split(blob: bytes, chunk_size: int = DEFAULT_LIMITS.default_chunk_bytes) -> list[bytes]:
    """Cut `blob` into chunk_size pieces (the last may be shorter)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [blob[i:i + chunk_size] for i in range(0, len(blob), chunk_size)] or [b""]


def digests(blob: bytes, chunk_size: int) -> list[str]:
    """Hex SHA-256 of each chunk, as listed in the manifest."""
    return [hashlib.sha256(c).hexdigest() for c in split(blob, chunk_size)]


def encode_chunk(deployment_id: str, index: int, count: int, data: bytes | memoryview,
                 digest: bytes | str | None = None) -> bytes:
    """Frame one chunk for the wire.

    `digest` is the chunk's SHA-256 when the caller already has it (the manifest's chunk_sha256,
    as raw bytes or hex): the server then hashes each model once, not again for every frame.
    The receiver re-verifies the data against it, so a wrong digest only gets the frame refused.
    """
    names.deployment_id(deployment_id)
    if not 0 <= index < count:
        raise ValueError(f"chunk index {index} outside 0..{count - 1}")
    if digest is None:
        digest = hashlib.sha256(data).digest()
    elif isinstance(digest, str):
        try:
            digest = bytes.fromhex(digest)
        except ValueError as exc:
            raise ValueError(f"chunk {index} digest {digest[:80]!r} is not hex") from exc
    if len(digest) != _DIGEST_BYTES:
        raise ValueError(f"chunk {index} digest must be {_DIGEST_BYTES} bytes of SHA-256, got {len(digest)}")
    return _HEADER.pack(MAGIC, deployment_id.encode("ascii"), index, count, bytes(digest)) + data


def decode_chunk(payload: bytes, max_chunk_bytes: int = DEFAULT_LIMITS.max_chunk_bytes) -> Chunk:
    """Parse and self-verify a frame; raises ProtocolError on any inconsistency."""
    if len(payload) < HEADER_BYTES:
        raise ProtocolError(f"chunk frame of {len(payload)} bytes is shorter than its {HEADER_BYTES}-byte header")
    if len(payload) - HEADER_BYTES > max_chunk_bytes:
        raise ProtocolError(f"chunk of {len(payload) - HEADER_BYTES} bytes exceeds the limit {max_chunk_bytes}")
    magic, dep, index, count, digest = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolError(f"chunk frame has magic {magic!r}, expected {MAGIC!r}")
    try:
        deployment_id = names.deployment_id(dep.decode("ascii"))
    except UnicodeDecodeError as exc:
        raise ProtocolError("chunk frame deployment id is not ASCII") from exc
    if not 0 <= index < count or count > DEFAULT_LIMITS.max_chunks:
        raise ProtocolError(f"chunk index {index} / count {count} out of range")
    data = memoryview(payload)[HEADER_BYTES:]
    if hashlib.sha256(data).digest() != digest:
        raise ProtocolError(f"chunk {index} of {deployment_id}: data does not match its digest")
    return Chunk(deployment_id, index, count, digest, data)
