"""Upper bounds on everything received over the wire.

A device has little memory and disk: every size that arrives from the network is checked against
one of these before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Limits:
    """Size limits applied by both ends; the agent may lower `max_artifact_bytes` (its quota)."""

    max_json_bytes: int = 256 * KIB
    # 4096 chunk digests of ~67 bytes each must fit: a 256 MiB artifact at 64 KiB chunks.
    max_manifest_bytes: int = 320 * KIB
    max_chunk_bytes: int = 1 * MIB
    default_chunk_bytes: int = 64 * KIB
    max_chunks: int = 4096
    max_artifact_bytes: int = 64 * MIB
    max_unpacked_bytes: int = 256 * MIB
    max_string: int = 4096
    max_list: int = 8192


DEFAULT_LIMITS = Limits()
