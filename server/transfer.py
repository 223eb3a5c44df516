"""What a transfer needs before its first chunk: the artifact read and cut once, its settings and checks.

Reading and checking a 5 MB artifact costs ~6 ms of CPU (x3 on a loaded host): `PreparedCache`
does it once per (artifact, chunk size), not per deployment or manifest re-send.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from protocol.limits import DEFAULT_LIMITS
from server.registry import ArtifactRecord

_LOGGER = logging.getLogger(__name__)


@dataclass
class Prepared:
    """An artifact read and cut for one chunk size: computed once, shared by its deployments.

    `digests` are those recorded at registration (or computed at once when none were recorded
    for this chunk size); `unchecked` chunks have not been hashed against them yet. Each chunk is
    checked the first time it is sent, so a transfer starts without a whole-file pass first.
    """

    artifact: ArtifactRecord
    chunk_size: int
    pieces: list[memoryview]  # views of the blob read once (they keep it alive)
    digests: list[str]
    unchecked: set[int] = field(default_factory=set)

    def checked_piece(self, index: int) -> memoryview:
        """Chunk `index`, hashed against its recorded digest once; DeployError if the copy is corrupt."""
        piece = self.pieces[index]
        if index in self.unchecked:
            actual = hashlib.sha256(piece).hexdigest()
            if actual != self.digests[index]:
                raise DeployError(f"stored artifact {self.artifact.packed_path}: chunk {index} has sha256 "
                                  f"{actual[:16]}..., registration recorded {self.digests[index][:16]}...: the "
                                  "registry copy is corrupt; register it again")
            self.unchecked.discard(index)
        return piece


class DeployError(Exception):
    """A deployment cannot be started; the message says why and what to do."""


class UnknownDeviceError(DeployError):
    """The target device has never announced itself on up/state."""


class IncompatibleRuntimeError(DeployError):
    """The artifact's export-time check says the device's runtime cannot load it."""


@dataclass(frozen=True)
class DeployerConfig:
    """Transfer parameters; `max_resends` bounds how often one chunk is sent again before giving up.

    `window_bytes`: chunks in flight to one device at a time (server.window), sized to the round trip.
    `offline_grace_s`: how long a device may stay offline (its retained state or Last Will says so)
    during a deployment before the deployment ends as `timeout` with that reason; long enough for an
    agent restart or a reboot, short against the whole `deadline_s`.
    """

    chunk_size: int = DEFAULT_LIMITS.default_chunk_bytes
    window_bytes: int = 2 * 1024 * 1024
    deadline_s: float = 1800.0
    max_resends: int = 10
    offline_grace_s: float = 120.0

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_size <= DEFAULT_LIMITS.max_chunk_bytes:
            raise ValueError(f"chunk_size must be in [1, {DEFAULT_LIMITS.max_chunk_bytes}], got {self.chunk_size}")
        if self.window_bytes < self.chunk_size:
            raise ValueError(f"window_bytes must be >= chunk_size ({self.chunk_size}), got {self.window_bytes}")
        if self.deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s}")
        if self.max_resends < 0:
            raise ValueError(f"max_resends must be >= 0, got {self.max_resends}")
        if self.offline_grace_s <= 0:
            raise ValueError(f"offline_grace_s must be > 0, got {self.offline_grace_s}")


def runtime_incompatibility(artifact: ArtifactRecord, runtime_key: str | None) -> str | None:
    """Why `runtime_key` (name==version) cannot load the artifact per metrics.json, or None."""
    runtimes = artifact.metrics.get("runtimes")
    if not runtime_key or not isinstance(runtimes, dict):
        return None
    entry = runtimes.get(runtime_key)
    if not isinstance(entry, dict) or entry.get("loads") is not False:
        return None
    return f"{artifact.id} does not load on {runtime_key}: {entry.get('error') or 'no error text'}"


class PreparedCache:
    """The last few artifacts read for sending; `chunk_digests` gives the digests recorded at registration."""

    def __init__(self, chunk_digests: Callable[[ArtifactRecord, int], list[str] | None], size: int = 4) -> None:
        self._chunk_digests = chunk_digests
        self._size = size
        self._prepared: OrderedDict[tuple[str, int], Prepared] = OrderedDict()
        self._lock = threading.Lock()  # tests and tools call prepare() from their own threads

    def get(self, artifact: ArtifactRecord, chunk_size: int) -> Prepared:
        """The packed artifact read and cut into chunks, cached; DeployError if the registry copy is corrupt.

        With chunk digests recorded at registration for this size, each chunk is checked when it
        is first sent (`Prepared.checked_piece`); otherwise the whole file is checked here.
        """
        key = (artifact.id, chunk_size)
        with self._lock:
            prepared = self._prepared.get(key)
        if prepared is not None:
            return prepared
        blob = artifact.packed_path.read_bytes()
        if len(blob) != artifact.size:
            raise DeployError(f"stored artifact {artifact.packed_path} has {len(blob)} bytes, registration recorded "
                              f"{artifact.size}: the registry copy is corrupt; register it again")
        view = memoryview(blob)
        pieces = [view[offset:offset + chunk_size] for offset in range(0, len(blob), chunk_size)] or [view]
        recorded = self._chunk_digests(artifact, chunk_size)
        if recorded is not None and len(recorded) == len(pieces):
            prepared = Prepared(artifact, chunk_size, pieces, recorded, unchecked=set(range(len(pieces))))
        else:
            whole = hashlib.sha256(blob).hexdigest()
            if whole != artifact.sha256:
                raise DeployError(f"stored artifact {artifact.packed_path} has sha256 {whole}, registration recorded "
                                  f"{artifact.sha256}: the registry copy is corrupt; register it again")
            prepared = Prepared(artifact, chunk_size, pieces, [hashlib.sha256(p).hexdigest() for p in pieces])
        with self._lock:
            self._prepared[key] = prepared
            while len(self._prepared) > self._size:
                self._prepared.popitem(last=False)
        return prepared


def iso_time(ts: float) -> str:
    """A UTC timestamp as the signed messages carry it (milliseconds)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
