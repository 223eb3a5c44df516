"""Receiving a model: manifest admission, then verified chunks into resumable staging.

Everything is checked before a byte is downloaded (who signed it, which device, which version,
how big) so a device never spends bandwidth or disk on a model it would refuse. Chunks are
verified against the signed manifest one by one; duplicates and reordering are harmless, and the
whole file is checked once more before it is unpacked.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.store import ModelStore, Staging, StoreError
from protocol import chunking
from protocol.errors import ProtocolError, SignatureError
from protocol.limits import DEFAULT_LIMITS, Limits
from protocol.messages import Manifest
from protocol.names import peek_deployment_id
from protocol.schema import decode_object

_LOGGER = logging.getLogger(__name__)

# Every ACK_EVERY new chunks the agent names what it still misses (need_chunks, reason "progress"):
# the server keeps only a window of chunks in flight (server/window.py) and tops it up on these.
ACK_EVERY = 8

# Staging holds the packed blob while unpacking writes the files next to it: ask for room for
# the blob, its unpacked form (a tflite barely compresses) and some slack.
DISK_FACTOR = 3


class ManifestRejected(Exception):
    """A manifest the device refuses; `reason` goes into the manifest_rejected event verbatim."""

    def __init__(self, reason: str, manifest: Manifest | None = None, deployment_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.manifest = manifest
        # Best effort for a manifest that decoded but failed its schema, so the server can match the event.
        self.deployment_id = manifest.deployment_id if manifest is not None else deployment_id


class ChunkRejected(Exception):
    """A chunk that does not belong to the manifest; `index` is set when it can be re-requested."""

    def __init__(self, reason: str, index: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.index = index


class VerifyError(Exception):
    """The assembled file does not have the manifest's SHA-256."""


@dataclass(frozen=True)
class Admission:
    """What the device knows when judging a manifest."""

    device_id: str
    server_key: Ed25519PublicKey
    active_version: int | None
    quota_bytes: int
    free_bytes: int
    limits: Limits = DEFAULT_LIMITS
    # `created` of the newest manifest this device ever admitted (ModelStore.newest_admitted): an
    # older one is a replay, whether or not its id is still in the bounded list of finished ones.
    newest_admitted: str | None = None


def created_time(created: str) -> datetime:
    """A signed `created` field as an aware UTC time; ValueError if it is not ISO 8601."""
    when = datetime.fromisoformat(created)
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def check_manifest(payload: bytes, admission: Admission) -> Manifest:
    """Decode and admit a manifest, or raise ManifestRejected naming the reason and the values."""
    # Decoded once: a payload refused for its size or its JSON is never parsed again (not even to
    # find its deployment id), and the id of one that fails the schema comes from this same dict.
    try:
        obj = decode_object(payload, "manifest", admission.limits.max_manifest_bytes)
    except ProtocolError as exc:
        raise ManifestRejected(f"malformed manifest: {exc}") from exc
    try:
        manifest = Manifest.from_dict(obj)
    except ProtocolError as exc:
        raise ManifestRejected(f"malformed manifest: {exc}", deployment_id=peek_deployment_id(obj)) from exc
    try:
        manifest.verify(admission.server_key)
    except SignatureError as exc:
        raise ManifestRejected(f"bad signature: {exc}", manifest) from exc
    if manifest.device_id != admission.device_id:
        raise ManifestRejected(f"manifest is for device {manifest.device_id!r}, this is {admission.device_id!r}",
                               manifest)
    try:
        created = created_time(manifest.created)
    except ValueError as exc:
        raise ManifestRejected(f"malformed manifest: created {manifest.created!r} is not an ISO 8601 time",
                               manifest) from exc
    if admission.newest_admitted is not None and created < created_time(admission.newest_admitted):
        raise ManifestRejected(f"manifest created {manifest.created} is older than the newest manifest this device "
                               f"admitted ({admission.newest_admitted}): a replay", manifest)
    active = admission.active_version
    if active is not None and manifest.version <= active and not manifest.rollback:
        raise ManifestRejected(f"version {manifest.version} is not newer than the active version {active} "
                               f"(set rollback to install an older model)", manifest)
    lim = admission.limits
    if manifest.unpacked_size is not None and manifest.unpacked_size > lim.max_unpacked_bytes:
        raise ManifestRejected(f"unpacked_size {manifest.unpacked_size} exceeds the limit of {lim.max_unpacked_bytes} "
                               "bytes", manifest)
    if manifest.total_size > admission.quota_bytes:
        raise ManifestRejected(f"total_size {manifest.total_size} exceeds the device quota {admission.quota_bytes}",
                               manifest)
    needed = manifest.total_size * DISK_FACTOR
    if manifest.unpacked_size is not None:  # blob + its files + slack, when the manifest says how big they are
        needed = max(needed, manifest.total_size * (DISK_FACTOR - 1) + manifest.unpacked_size)
    if needed > admission.free_bytes:
        raise ManifestRejected(f"not enough free disk: need ~{needed} bytes for total_size {manifest.total_size}, "
                               f"{admission.free_bytes} free", manifest)
    if not 1 <= manifest.chunk_size <= lim.max_chunk_bytes or manifest.chunk_count > lim.max_chunks:
        raise ManifestRejected(f"chunk_size {manifest.chunk_size} x {manifest.chunk_count} chunks outside limits "
                               f"(chunk <= {lim.max_chunk_bytes}, count <= {lim.max_chunks})", manifest)
    return manifest


class Receiver:
    """Collects the chunks of one admitted manifest into its staging directory."""

    def __init__(self, staging: Staging) -> None:
        self.staging = staging
        self.manifest = staging.manifest
        self._since_ack = 0

    def ack_due(self) -> bool:
        """Count one new chunk; True every ACK_EVERY of them while chunks are still missing."""
        self._since_ack += 1
        if self._since_ack < ACK_EVERY or self.complete:
            return False
        self._since_ack = 0
        return True

    @classmethod
    def start(cls, store: ModelStore, manifest: Manifest) -> Receiver:
        """Create staging for a fresh deployment, or resume the one already on disk for it."""
        path = store.staging(manifest.deployment_id)
        if path.exists():
            try:
                staging = Staging.open(path)
                if staging.manifest.canonical() == manifest.canonical():
                    _LOGGER.info("staging_resumed deployment=%s missing=%d", manifest.deployment_id,
                                 len(staging.missing()))
                    return cls(staging)
                _LOGGER.warning("staging_manifest_changed deployment=%s: starting over", manifest.deployment_id)
            except (OSError, ValueError, ProtocolError, StoreError) as exc:
                _LOGGER.warning("staging_unreadable deployment=%s error=%s: starting over", manifest.deployment_id, exc)
        return cls(Staging.create(path, manifest))

    @classmethod
    def resume(cls, store: ModelStore, deployment_id: str) -> Receiver:
        """Reopen staging after a restart (raises if it is unreadable; the caller drops it)."""
        return cls(Staging.open(store.staging(deployment_id)))

    @property
    def deployment_id(self) -> str:
        return self.manifest.deployment_id

    def missing(self) -> list[int]:
        return self.staging.missing()

    @property
    def complete(self) -> bool:
        return self.staging.complete

    def flush(self) -> None:
        """Make the chunks received so far durable (before a planned stop)."""
        self.staging.flush()

    def close(self) -> None:
        """Release the staging file handle (the download is over, or the agent stops)."""
        self.staging.close()

    def accept(self, chunk: chunking.Chunk) -> bool:
        """Store one decoded chunk; False for a harmless duplicate, ChunkRejected if it does not fit."""
        m = self.manifest
        if chunk.deployment_id != m.deployment_id:
            raise ChunkRejected(f"chunk of {chunk.deployment_id} does not belong to {m.deployment_id}")
        if chunk.count != m.chunk_count or not 0 <= chunk.index < m.chunk_count:
            raise ChunkRejected(f"chunk {chunk.index}/{chunk.count} does not fit the manifest's {m.chunk_count} chunks")
        expected_len = self.staging.chunk_length(chunk.index)
        if len(chunk.data) != expected_len:
            raise ChunkRejected(f"chunk {chunk.index} has {len(chunk.data)} bytes, manifest says {expected_len}",
                                chunk.index)
        if chunk.digest.hex() != m.chunk_sha256[chunk.index]:
            raise ChunkRejected(f"chunk {chunk.index} sha256 {chunk.digest.hex()[:16]}... differs from the manifest's "
                                f"{m.chunk_sha256[chunk.index][:16]}...", chunk.index)
        if self.staging.have[chunk.index]:
            return False
        self.staging.write_chunk(chunk.index, chunk.data)
        return True

    def verified_path(self) -> Path:
        """The staged file, hashed in 1 MiB steps (VerifyError unless it is the manifest's SHA-256)."""
        if not self.complete:
            raise VerifyError(f"{self.deployment_id}: {len(self.missing())} chunks still missing")
        path = self.staging.path / self.staging.DATA
        hasher, size = hashlib.sha256(), 0
        with open(path, "rb") as fh:
            while piece := fh.read(1 << 20):
                hasher.update(piece)
                size += len(piece)
        digest = hasher.hexdigest()
        if size != self.manifest.total_size or digest != self.manifest.sha256:
            raise VerifyError(f"{self.deployment_id}: assembled {size} bytes with sha256 {digest}, manifest says "
                              f"{self.manifest.total_size} bytes with sha256 {self.manifest.sha256}")
        return path

    def assemble(self) -> bytes:
        """The whole verified blob (raises VerifyError if the file's SHA-256 is not the manifest's)."""
        return self.verified_path().read_bytes()
