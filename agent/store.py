"""The agent's state directory: two model slots, an atomic active pointer, and resumable staging.

Layout (everything a power cut may interrupt is either atomic or re-derivable):
    active.json                 {"slot", "model_id", "version", "deployment_id", "previous": {...} | null}
    slots/a, slots/b            unpacked artifacts, each with slot.json naming what it holds
    staging/<deployment_id>/    manifest.json, data.bin (preallocated), bitmap.json (saved every few
                                chunks, after fsyncing data.bin; re-verified on resume)
    finished.json               recently finished deployment ids (a redelivered manifest is ignored)
    admitted.json               `created` of the newest manifest ever admitted (older ones are replays)
    outbox/                     reports waiting for the broker (agent.outbox)
A slot is written into a temporary directory and renamed into place, so a half-written slot is
never visible; the pointer is replaced with tmp + fsync + os.replace + fsync(dir).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from protocol import artifact, names
from protocol.errors import ProtocolError
from protocol.files import atomic_write, atomic_write_json, fsync_dir
from protocol.messages import Manifest

_LOGGER = logging.getLogger(__name__)

SLOTS = ("a", "b")
ACTIVE_FILE = "active.json"
SLOT_FILE = "slot.json"
FINISHED_FILE = "finished.json"
FINISHED_KEEP = 64
ADMITTED_FILE = "admitted.json"
# Staging flush policy: each flush costs two fsyncs and a directory fsync (~1.5 ms idle, 10+ ms on
# a busy disk); doing that per 64 KiB chunk made the device the bottleneck of every transfer.
FLUSH_EVERY = 32
FLUSH_INTERVAL_S = 0.5


class StoreError(RuntimeError):
    """A state-directory operation failed; `kind` is "disk_full", "verify_error" or "io"."""

    def __init__(self, message: str, kind: str = "io") -> None:
        super().__init__(message)
        self.kind = kind


def _disk_error(exc: OSError, what: str) -> StoreError:
    kind = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "io"
    return StoreError(f"{what}: {exc.strerror or exc} (errno {exc.errno})", kind)


@dataclass(frozen=True)
class SlotRef:
    """Which model a slot holds."""

    slot: str
    model_id: str
    version: int
    deployment_id: str | None = None

    @classmethod
    def from_dict(cls, obj: Any) -> SlotRef:
        if not isinstance(obj, dict) or obj.get("slot") not in SLOTS:
            raise ValueError(f"not a slot reference: {obj!r:.200}")
        version = obj.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"slot reference version must be an int, got {version!r}")
        dep = obj.get("deployment_id")
        return cls(obj["slot"], names.model_id(obj.get("model_id")), version,
                   names.deployment_id(dep) if dep is not None else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ActivePointer:
    """The model being served, and the one before it (kept for rollback while its slot holds it)."""

    current: SlotRef
    previous: SlotRef | None = None


class ModelStore:
    """Owns the state directory. Not thread-safe: the agent's worker thread is its only caller."""

    def __init__(self, state_dir: Path | str) -> None:
        self.root = Path(state_dir)
        self.slots_dir = self.root / "slots"
        self.staging_dir = self.root / "staging"
        for d in (self.root, self.slots_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()

    def _clean_leftovers(self) -> None:
        """Remove temporary slot dirs a crash left behind (they were never renamed into place)."""
        for p in self.slots_dir.iterdir():
            if p.name.startswith("."):
                _LOGGER.warning("store_cleanup removing leftover %s", p)
                shutil.rmtree(p, ignore_errors=True)

    # -- slots & pointer ------------------------------------------------------------------
    def slot_path(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise ValueError(f"slot must be one of {SLOTS}, got {slot!r}")
        return self.slots_dir / slot

    def active(self) -> ActivePointer | None:
        """The active pointer, or None on a fresh device; a corrupt pointer is logged and ignored."""
        path = self.root / ACTIVE_FILE
        if not path.exists():
            return None
        try:
            obj = json.loads(path.read_text())
            current = SlotRef.from_dict(obj)
            previous = SlotRef.from_dict(obj["previous"]) if obj.get("previous") else None
        except (OSError, ValueError, ProtocolError) as exc:
            _LOGGER.error("active_pointer_corrupt path=%s error=%s", path, exc)
            return None
        return ActivePointer(current, previous)

    def slot_contents(self, slot: str) -> SlotRef | None:
        """What `slot` holds according to its own slot.json (None if empty or unreadable)."""
        try:
            return SlotRef.from_dict(json.loads((self.slot_path(slot) / SLOT_FILE).read_text()))
        except (OSError, ValueError, ProtocolError):
            return None

    def inactive_slot(self) -> str:
        """The slot a candidate goes into: the one the active pointer does not name."""
        pointer = self.active()
        if pointer is None:
            return SLOTS[0]
        return SLOTS[1] if pointer.current.slot == SLOTS[0] else SLOTS[0]

    def _write_pointer(self, current: SlotRef, previous: SlotRef | None) -> None:
        body = current.to_dict() | {"previous": previous.to_dict() if previous else None}
        try:
            atomic_write_json(self.root / ACTIVE_FILE, body)
        except OSError as exc:
            raise _disk_error(exc, "cannot write the active pointer") from exc
        _LOGGER.info("active_pointer slot=%s model_id=%s version=%s previous=%s", current.slot, current.model_id,
                     current.version, previous.version if previous else None)

    def install_candidate(self, blob: bytes | Path, *, model_id: str, version: int, deployment_id: str,
                          max_unpacked_bytes: int, declared_size: int | None = None) -> SlotRef:
        """Unpack a verified artifact (bytes or its file) into the inactive slot (tmp dir, fsync, rename).

        The active slot is untouched; `declared_size` is the manifest's unpacked_size, when given.
        """
        slot = self.inactive_slot()
        ref = SlotRef(slot, model_id, version, deployment_id)
        tmp = self.slots_dir / f".tmp-{slot}-{uuid.uuid4().hex[:8]}"
        try:
            artifact.unpack_artifact(blob, tmp, max_unpacked_bytes, declared_size=declared_size)
            atomic_write_json(tmp / SLOT_FILE, ref.to_dict())
            fsync_dir(tmp)
        except ProtocolError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"artifact of {deployment_id} cannot be unpacked: {exc}", "verify_error") from exc
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _disk_error(exc, f"cannot unpack {deployment_id} into slot {slot}") from exc
        self._forget_previous_in(slot)
        target = self.slot_path(slot)
        old = self.slots_dir / f".old-{slot}-{uuid.uuid4().hex[:8]}"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(self.slots_dir)
        shutil.rmtree(old, ignore_errors=True)
        _LOGGER.info("candidate_installed slot=%s model_id=%s version=%d deployment=%s",
                     slot, model_id, version, deployment_id)
        return ref

    def _forget_previous_in(self, slot: str) -> None:
        """The previous model is about to be overwritten: stop offering it for rollback."""
        pointer = self.active()
        if pointer and pointer.previous and pointer.previous.slot == slot:
            self._write_pointer(pointer.current, None)

    def promote(self, candidate: SlotRef) -> ActivePointer:
        """Atomically make `candidate` the active model; the old one becomes `previous`."""
        held = self.slot_contents(candidate.slot)
        if held != candidate:
            raise StoreError(f"cannot promote {candidate}: slot {candidate.slot} holds {held}")
        pointer = self.active()
        previous = pointer.current if pointer else None
        self._write_pointer(candidate, previous)
        return ActivePointer(candidate, previous)

    def rollback(self) -> ActivePointer:
        """Point back at the previous model if its slot still holds it."""
        pointer = self.active()
        if pointer is None or pointer.previous is None:
            raise StoreError("no previous model to roll back to")
        if self.slot_contents(pointer.previous.slot) != pointer.previous:
            raise StoreError(f"previous model {pointer.previous} is no longer in its slot")
        self._write_pointer(pointer.previous, None)
        return ActivePointer(pointer.previous, None)

    def discard_candidate(self, candidate: SlotRef | None = None) -> None:
        """Delete the inactive slot's content (a failed candidate), never the active slot."""
        slot = candidate.slot if candidate else self.inactive_slot()
        pointer = self.active()
        if pointer and pointer.current.slot == slot:
            raise StoreError(f"refusing to discard slot {slot}: it is the active slot")
        path = self.slot_path(slot)
        if path.exists():
            self._forget_previous_in(slot)
            doomed = self.slots_dir / f".old-{slot}-{uuid.uuid4().hex[:8]}"
            os.replace(path, doomed)
            fsync_dir(self.slots_dir)
            shutil.rmtree(doomed, ignore_errors=True)
            _LOGGER.info("candidate_discarded slot=%s", slot)

    def model_dir(self, ref: SlotRef) -> Path:
        return self.slot_path(ref.slot)

    # -- finished deployments ---------------------------------------------------------------
    def finished(self) -> list[str]:
        try:
            obj = json.loads((self.root / FINISHED_FILE).read_text())
            return [d for d in obj if isinstance(d, str)] if isinstance(obj, list) else []
        except (OSError, ValueError):
            return []

    def mark_finished(self, deployment_id: str) -> None:
        ids = [d for d in self.finished() if d != deployment_id] + [deployment_id]
        try:
            atomic_write_json(self.root / FINISHED_FILE, ids[-FINISHED_KEEP:])
        except OSError as exc:
            _LOGGER.warning("finished_list_write_failed deployment=%s error=%s", deployment_id, exc)

    def newest_admitted(self) -> str | None:
        """`created` of the newest manifest admitted on this device (None before the first one)."""
        try:
            value = json.loads((self.root / ADMITTED_FILE).read_text()).get("created")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def note_admitted(self, created: str) -> None:
        """Remember `created` of a manifest just admitted (the caller checked it is not older)."""
        try:
            atomic_write_json(self.root / ADMITTED_FILE, {"created": created})
        except OSError as exc:
            raise _disk_error(exc, "cannot record the admitted manifest") from exc

    # -- staging ----------------------------------------------------------------------------
    def staging(self, deployment_id: str) -> Path:
        return self.staging_dir / names.deployment_id(deployment_id)

    def staged_deployments(self) -> list[str]:
        """Deployment ids with a staging directory (finished or not), oldest first."""
        out = []
        for p in sorted(self.staging_dir.iterdir(), key=lambda p: p.stat().st_mtime):
            try:
                out.append(names.deployment_id(p.name))
            except ProtocolError:
                _LOGGER.warning("staging_unknown_entry removing %s", p)
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return out

    def remove_staging(self, deployment_id: str) -> None:
        shutil.rmtree(self.staging(deployment_id), ignore_errors=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


class Staging:
    """A resumable download: the manifest, a preallocated data file and a bitmap of verified chunks."""

    MANIFEST = "manifest.json"
    DATA = "data.bin"
    BITMAP = "bitmap.json"

    def __init__(self, path: Path, manifest: Manifest, have: list[bool], *, flush_every: int = FLUSH_EVERY,
                 flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        if flush_every < 1 or flush_interval_s < 0:
            raise ValueError(f"flush_every must be >= 1 and flush_interval_s >= 0, got {flush_every} and "
                             f"{flush_interval_s}")
        self.path = path
        self.manifest = manifest
        self.have = have
        self.flush_every = int(flush_every)
        self.flush_interval_s = flush_interval_s
        self.flushes = 0
        self._unflushed = 0
        self._last_flush = time.monotonic()
        self._missing = have.count(False)
        # Opened on the first chunk and kept until the download is complete: an open/close per
        # 64 KiB chunk costs about as much as writing it. FileIO closes itself if we are dropped.
        self._data: io.FileIO | None = None

    @classmethod
    def create(cls, path: Path, manifest: Manifest, **flush_policy: Any) -> Staging:
        """Preallocate the file so a full disk fails now, before any chunk is accepted.

        Only the directory rename is made durable (one fsync): a staging dir whose manifest,
        bitmap or size a power cut tore fails `open`'s checks and the download starts over.
        """
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            (tmp / cls.MANIFEST).write_bytes(manifest.to_json())
            fd = os.open(tmp / cls.DATA, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, manifest.total_size)
            finally:
                os.close(fd)
            (tmp / cls.BITMAP).write_text(_bitmap_json([False] * manifest.chunk_count))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _disk_error(exc, f"cannot stage {manifest.total_size} bytes for {manifest.deployment_id}") from exc
        return cls(path, manifest, [False] * manifest.chunk_count, **flush_policy)

    @classmethod
    def open(cls, path: Path, **flush_policy: Any) -> Staging:
        """Resume: re-verify every chunk the bitmap claims, so a torn write is simply re-requested.

        This check is what lets `write_chunk` skip fsync: the bitmap only ever claims chunks whose
        data was fsynced before it was saved, and even a claim that lies costs a re-request, not
        a corrupt model.
        """
        manifest = Manifest.from_json((path / cls.MANIFEST).read_bytes())
        bitmap = json.loads((path / cls.BITMAP).read_text())
        marks = str(bitmap.get("have", ""))
        if bitmap.get("count") != manifest.chunk_count or len(marks) != manifest.chunk_count:
            raise StoreError(f"{path}/{cls.BITMAP} does not match the manifest's {manifest.chunk_count} chunks")
        staging = cls(path, manifest, [c == "1" for c in marks], **flush_policy)
        if (path / cls.DATA).stat().st_size != manifest.total_size:
            raise StoreError(f"{path}/{cls.DATA} has the wrong size")
        with open(path / cls.DATA, "rb") as fh:
            for i, have in enumerate(staging.have):
                if have:
                    fh.seek(i * manifest.chunk_size)
                    data = fh.read(staging.chunk_length(i))
                    if hashlib.sha256(data).hexdigest() != manifest.chunk_sha256[i]:
                        _LOGGER.warning("staging_chunk_corrupt deployment=%s index=%d: re-requesting",
                                        manifest.deployment_id, i)
                        staging.have[i] = False
        staging._missing = staging.have.count(False)
        return staging

    def chunk_length(self, index: int) -> int:
        m = self.manifest
        return min(m.chunk_size, m.total_size - index * m.chunk_size)

    def write_chunk(self, index: int, data: bytes | memoryview) -> None:
        """Write at the chunk's offset (no fsync); flush every `flush_every` chunks, `flush_interval_s`
        seconds, and when the last chunk arrives.

        A chunk is durable only after the next flush; a crash before it loses at most the unflushed
        chunks, which `open` does not claim and the agent requests again.
        """
        try:
            os.pwrite(self._file().fileno(), data, index * self.manifest.chunk_size)
        except OSError as exc:
            raise _disk_error(exc, f"cannot write chunk {index} of {self.manifest.deployment_id}") from exc
        if not self.have[index]:
            self.have[index] = True
            self._missing -= 1
        self._unflushed += 1
        if (self._unflushed >= self.flush_every or not self._missing
                or time.monotonic() - self._last_flush >= self.flush_interval_s):
            self.flush()
        if not self._missing:
            self.close()

    def flush(self) -> None:
        """Make every written chunk durable: fsync the data first, then save the bitmap claiming it."""
        if self._unflushed == 0:
            return
        try:
            os.fdatasync(self._file().fileno())  # the data and its extents; its mtime does not matter
            # Not fsynced (saves two of three fsyncs per flush): `open` re-verifies every chunk the
            # bitmap claims and starts over on a bitmap a power cut tore, so a lost bitmap update
            # costs a re-download, never a corrupt model.
            atomic_write(self.path / self.BITMAP, _bitmap_json(self.have).encode(), durable=False)
        except OSError as exc:
            raise _disk_error(exc, f"cannot flush staging of {self.manifest.deployment_id}") from exc
        self._unflushed = 0
        self._last_flush = time.monotonic()
        self.flushes += 1

    def flush_if_due(self) -> None:
        """Flush chunks that have waited `flush_interval_s` (e.g. the stream stalled after them)."""
        if self._unflushed and time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    @property
    def unflushed(self) -> int:
        """Chunks written since the last flush (lost, and re-requested, if the process dies now)."""
        return self._unflushed

    def missing(self) -> list[int]:
        return [i for i, have in enumerate(self.have) if not have]

    @property
    def complete(self) -> bool:
        return not self._missing

    def _file(self) -> io.FileIO:
        """The data file, opened on first use and kept until `close`."""
        if self._data is None:
            self._data = io.FileIO(self.path / self.DATA, "r+")
        return self._data

    def close(self) -> None:
        """Release the data file handle (flush first to keep what was written); idempotent."""
        data, self._data = self._data, None
        if data is not None:
            data.close()

    def read_blob(self) -> bytes:
        return (self.path / self.DATA).read_bytes()


def _bitmap_json(have: list[bool]) -> str:
    return json.dumps({"count": len(have), "have": "".join("1" if h else "0" for h in have)})
