"""Deployment of one registered artifact to one device: manifest, chunks, report, gate, verdict.

The deployer keeps no state of its own between messages: every step reads and updates the
deployment row in the registry, so a restarted server (or another server process sharing the
database) continues any deployment from its recorded status. Status changes that two processes
might race on are made with conditional UPDATEs.

Status flow: pending -> transferring -> measuring -> passed | failed -> promoted | rolled_back;
rejected (refused before or during transfer) and timeout end a deployment early.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import chunking, signing
from protocol.artifact import unpacked_size
from protocol.limits import DEFAULT_LIMITS
from protocol.messages import Command, Event, Manifest, Report, Verdict
from protocol.topics import Topics
from server import gate, reports, window
from server.policy import Policy
from server.registry import ACTIVE, ArtifactRecord, DeploymentRecord, DeviceRecord, Registry, RegistryError

_LOGGER = logging.getLogger(__name__)

Publish = Callable[[str, bytes], None]
ChunkTransform = Callable[[str, int, bytes], bytes]


# Device events that say something went wrong on the device: kept as its `last_error`.
DEVICE_ERRORS = frozenset({"manifest_rejected", "verdict_rejected", "command_rejected", "load_failed", "error",
                           "verify_failed"})
# What protocol.signing says when a device's pinned key is not the one that signed.
PINNED_KEY_MISMATCH = "does not match the pinned server key"
CANCELLED = "cancelled by the operator"
CANCEL_PENDING = "cancelled by the operator; a running server tells the device"


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


class Deployer:
    """Runs deployments over a `publish(topic, payload)` function with registry-backed state."""

    def __init__(self, registry: Registry, key: Ed25519PrivateKey, publish: Publish, *,
                 topics: Topics | None = None, policy: Policy, config: DeployerConfig | None = None,
                 chunk_transform: ChunkTransform | None = None) -> None:
        self.registry = registry
        self.key = key
        self.publish = publish
        self.topics = topics or Topics()
        self.policy = policy
        self.config = config or DeployerConfig()
        # Fault injection for tests and the HIL rig: rewrites a chunk's data before framing, so the
        # frame is self-consistent but no longer matches the signed manifest.
        self.chunk_transform = chunk_transform
        # Reading and checking a 5 MB artifact costs ~6 ms of CPU (x3 on a loaded host): done once
        # per (artifact, chunk size), not per deployment or manifest re-send.
        self._prepared: OrderedDict[tuple[str, int], Prepared] = OrderedDict()
        self._prepared_lock = threading.Lock()  # tests and tools call prepare() from their own threads
        # Report files (a matplotlib PNG costs ~0.15-0.3 s) are written in order on their own thread,
        # so a finished deployment never holds up the messages of the next ones.
        self._reporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeguide-reports")

    # ---- creation --------------------------------------------------------------------------
    def create(self, model_id: str, device_id: str, *, version: int | None = None, policy: Policy | None = None,
               force: bool = False, chunk_size: int | None = None) -> DeploymentRecord:
        """Record a pending deployment after checking the device and its runtime.

        Raises UnknownDeviceError for a device never seen (unless `force`), and
        IncompatibleRuntimeError (after recording a rejected deployment) when the artifact's
        runtime check says the device cannot load it.
        """
        artifact = self.registry.artifact(model_id, version)
        device = self.registry.find_device(device_id)
        if device is None and not force:
            known = [d.device_id for d in self.registry.devices()]
            raise UnknownDeviceError(
                f"device {device_id!r} has never been seen (no up/state received); known devices: "
                f"{known or 'none'}. Start its agent first, or force the deployment.")
        policy = policy or self.policy
        size = chunk_size or self.config.chunk_size
        why = runtime_incompatibility(artifact, device.runtime_key if device else None)
        if why and not force:
            self.registry.create_deployment(artifact, device_id, chunk_size=size, policy=policy.to_dict(),
                                            deadline_s=self.config.deadline_s, status="rejected",
                                            reason=f"op_version: {why}")
            raise IncompatibleRuntimeError(f"refusing to deploy: {why}")
        record = self.registry.create_deployment(artifact, device_id, chunk_size=size, policy=policy.to_dict(),
                                                 deadline_s=self.config.deadline_s, forced=force,
                                                 reason="forced" if force and (why or device is None) else "")
        _LOGGER.info("deployment %s created: %s -> %s", record.deployment_id, artifact.id, device_id)
        return record

    # ---- transfer --------------------------------------------------------------------------
    def start(self, deployment_id: str) -> bool:
        """Claim a pending deployment and send its signed manifest; False if another process claimed it."""
        if self.registry.db.execute(
                "UPDATE deployments SET status = 'transferring', updated = ? WHERE deployment_id = ?"
                " AND status = 'pending'", (time.time(), deployment_id)) != 1:
            return False
        self._send_manifest(self.registry.deployment(deployment_id))
        self.registry.log_event("status:transferring", deployment_id=deployment_id)
        return True

    def prepare(self, artifact: ArtifactRecord, chunk_size: int) -> Prepared:
        """The packed artifact read and cut into chunks, cached; DeployError if the registry copy is corrupt.

        With chunk digests recorded at registration for this size, each chunk is checked when it
        is first sent (`Prepared.checked_piece`); otherwise the whole file is checked here.
        """
        key = (artifact.id, chunk_size)
        with self._prepared_lock:
            prepared = self._prepared.get(key)
        if prepared is not None:
            return prepared
        blob = artifact.packed_path.read_bytes()
        if len(blob) != artifact.size:
            raise DeployError(f"stored artifact {artifact.packed_path} has {len(blob)} bytes, registration recorded "
                              f"{artifact.size}: the registry copy is corrupt; register it again")
        view = memoryview(blob)
        pieces = [view[offset:offset + chunk_size] for offset in range(0, len(blob), chunk_size)] or [view]
        recorded = self.registry.chunk_digests(artifact, chunk_size)
        if recorded is not None and len(recorded) == len(pieces):
            prepared = Prepared(artifact, chunk_size, pieces, recorded, unchecked=set(range(len(pieces))))
        else:
            whole = hashlib.sha256(blob).hexdigest()
            if whole != artifact.sha256:
                raise DeployError(f"stored artifact {artifact.packed_path} has sha256 {whole}, registration recorded "
                                  f"{artifact.sha256}: the registry copy is corrupt; register it again")
            prepared = Prepared(artifact, chunk_size, pieces, [hashlib.sha256(p).hexdigest() for p in pieces])
        with self._prepared_lock:
            self._prepared[key] = prepared
            while len(self._prepared) > 4:
                self._prepared.popitem(last=False)
        return prepared

    def close(self) -> None:
        """Write the report files still queued (call once the worker has stopped)."""
        self._reporter.shutdown(wait=True)

    def wait_reports(self, timeout: float = 30.0) -> None:
        """Block until the report files queued so far are written (TimeoutError after `timeout`)."""
        with contextlib.suppress(RuntimeError):  # closed: close() already waited for them
            self._reporter.submit(lambda: None).result(timeout)

    def _prepared_for(self, dep: DeploymentRecord) -> Prepared:
        return self.prepare(self.registry.artifact_by_id(dep.artifact_id), dep.chunk_size)

    def manifest(self, dep: DeploymentRecord) -> Manifest:
        """The signed manifest of a deployment: identical bytes every time, so a re-sent manifest
        resumes the device's download instead of restarting it."""
        artifact = self.registry.artifact_by_id(dep.artifact_id)
        # The digests recorded at registration: the manifest goes out without reading the blob,
        # whose chunks are checked against these same digests as they are sent.
        digests = self.registry.chunk_digests(artifact, dep.chunk_size)
        if digests is None:
            digests = self.prepare(artifact, dep.chunk_size).digests
        metrics = artifact.metrics
        requirements = {k: metrics[k] for k in ("ops", "runtimes", "window", "k", "num_items") if k in metrics}
        return Manifest(deployment_id=dep.deployment_id, device_id=dep.device_id, model_id=artifact.model_id,
                        version=artifact.version, total_size=artifact.size, sha256=artifact.sha256,
                        chunk_size=dep.chunk_size, chunk_sha256=list(digests),
                        created=_iso(dep.created), requirements=requirements,
                        unpacked_size=unpacked_size(artifact.path)).signed(self.key)

    def _send_manifest(self, dep: DeploymentRecord) -> None:
        try:
            manifest = self.manifest(dep)
        except (DeployError, OSError) as exc:
            self._finish(dep, "rejected", f"cannot send: {exc}")
            return
        payload = manifest.to_json()
        limits = DEFAULT_LIMITS
        if len(payload) > limits.max_manifest_bytes or manifest.chunk_count > limits.max_chunks:
            self._finish(dep, "rejected", f"manifest of {len(payload)} bytes for {manifest.chunk_count} chunks exceeds "
                                          f"the device limits ({limits.max_manifest_bytes} bytes, {limits.max_chunks} "
                                          f"chunks): deploy with a larger chunk size than {dep.chunk_size}")
            return
        self.publish(self.topics.down(dep.device_id, "manifest"), payload)
        _LOGGER.info("sent manifest of %s to %s (%d bytes in %d chunks)", dep.deployment_id, dep.device_id,
                     manifest.total_size, manifest.chunk_count)

    def send_chunks(self, dep: DeploymentRecord, indices: Iterable[int] | None, *, resend: bool = True) -> None:
        """Publish the next window of the chunks the device misses (all when `indices` is None).

        Only a window of chunks is in flight (server.window): the device's progress acknowledgements
        top it up, and chunks already in flight go out again only when `resend` (the device stalled,
        or a fresh manifest answer). The chunks go out in one loop before the re-send counts are
        written, so the device never waits on our database.
        """
        try:
            prepared = self._prepared_for(dep)
        except (DeployError, OSError) as exc:
            self._give_up(dep, f"cannot send: {exc}")
            return
        pieces = prepared.pieces
        wanted = sorted(set(range(len(pieces)) if indices is None else indices))
        bad = [i for i in wanted if not 0 <= i < len(pieces)]
        if bad:
            _LOGGER.warning("%s: device asked for chunks %s outside 0..%d; ignoring them", dep.deployment_id,
                            bad[:10], len(pieces) - 1)
            wanted = [i for i in wanted if 0 <= i < len(pieces)]
        wanted = window.plan(wanted, dep.resends, window.window_chunks(self.config.window_bytes, dep.chunk_size),
                             resend=resend).indices
        if not wanted:
            return
        resends = dict(dep.resends)
        for i in wanted:
            count = resends.get(str(i), -1) + 1  # -1: never sent
            if count > self.config.max_resends:
                self._give_up(dep, f"chunk {i} was requested again after {self.config.max_resends} re-sends "
                                   "(corrupted in transit every time?)")
                return
            resends[str(i)] = count
        topic = self.topics.down(dep.device_id, "chunk")
        for i in wanted:
            try:
                data: bytes | memoryview = prepared.checked_piece(i)  # encode_chunk copies it into the frame
            except DeployError as exc:
                self._give_up(dep, f"cannot send: {exc}")
                return
            digest: str | None = prepared.digests[i]  # known already, not hashed again per frame
            if self.chunk_transform is not None:
                # fault injection: the frame carries the digest of what is sent, as a corrupting link would
                data, digest = self.chunk_transform(dep.deployment_id, i, bytes(data)), None
            self.publish(topic, chunking.encode_chunk(dep.deployment_id, i, len(pieces), data, digest=digest))
        self.registry.update_deployment(dep.deployment_id, resends=resends)
        _LOGGER.info("sent %d of %d chunks of %s to %s", len(wanted), len(pieces), dep.deployment_id, dep.device_id)

    def _give_up(self, dep: DeploymentRecord, reason: str) -> None:
        self._finish(dep, "rejected", reason)
        self.send_command(dep.device_id, "cancel", dep.deployment_id)

    def send_command(self, device_id: str, command: str, deployment_id: str | None = None) -> None:
        """Publish a signed command (report_state, rollback, cancel) to one device."""
        cmd = Command(device_id=device_id, command=command, deployment_id=deployment_id).signed(self.key)
        self.publish(self.topics.down(device_id, "command"), cmd.to_json())

    # ---- device messages -------------------------------------------------------------------
    def _active(self, deployment_id: str | None, device_id: str, what: str) -> DeploymentRecord | None:
        if deployment_id is None:
            return None
        try:
            dep = self.registry.deployment(deployment_id)
        except RegistryError:  # not ours (another server's database) or long gone
            _LOGGER.warning("%s from %s names unknown deployment %s", what, device_id, deployment_id)
            self.registry.log_event("unknown_deployment", device_id=device_id, deployment_id=None,
                                    detail=f"{what} for {deployment_id}")
            return None
        if dep.device_id != device_id:
            _LOGGER.warning("%s for %s came from %s, but it targets %s", what, deployment_id, device_id,
                            dep.device_id)
            self.registry.log_event("wrong_device", device_id=device_id, deployment_id=deployment_id, detail=what)
            return None
        return dep

    def explain(self, reason: str) -> str:
        """A device's rejection plus the way forward when it pinned another server key."""
        if PINNED_KEY_MISMATCH not in reason:
            return reason
        return (f"{reason}; this server signs with {signing.fingerprint(self.key)}: the agent pins another "
                "server's key. Run `edgeguide-server export-key KEY.pem` on this server and restart the agent "
                "with --server-key KEY.pem")

    def handle_event(self, event: Event) -> None:
        """React to a device event about a deployment."""
        detail = event.reason or (f"missing={event.missing[:20]}" if event.missing else "")
        self.registry.log_event(f"device:{event.type}", device_id=event.device_id,
                                deployment_id=event.deployment_id, detail=detail or "")
        if event.type in DEVICE_ERRORS:
            self.registry.set_device_error(event.device_id, self.explain(f"{event.type}: {event.reason or ''}"))
        elif event.type == "promoted":  # the device took a signed model: an old key or load error is history
            self.registry.set_device_error(event.device_id, "")
        dep = self._active(event.deployment_id, event.device_id, f"event {event.type}")
        if dep is None:
            return
        kind = event.type
        if dep.terminal and kind not in {"promoted", "rolled_back"}:
            _LOGGER.info("ignoring %s for %s: already %s", kind, dep.deployment_id, dep.status)
            return
        if kind == "manifest_accepted":
            self.send_chunks(dep, event.missing)
        elif kind in {"need_chunks", "chunk_rejected"}:
            if event.missing is None:  # the agent follows up with need_chunks naming the index
                _LOGGER.info("%s for %s: %s", kind, dep.deployment_id, event.reason)
            elif dep.status in {"pending", "transferring"}:
                self.send_chunks(dep, event.missing, resend=event.reason in window.RESEND_REASONS)
        elif kind == "manifest_rejected":
            self._finish(dep, "rejected",
                         self.explain(f"device rejected the manifest: {event.reason or 'no reason given'}"))
        elif kind in {"download_complete", "measuring"}:
            self._transition(dep, "measuring", ("pending", "transferring"), event.reason or "")
        elif kind == "verify_failed":
            _LOGGER.warning("%s: device %s says the artifact failed verification: %s", dep.deployment_id,
                            dep.device_id, event.reason)
            self.registry.update_deployment(dep.deployment_id, reason=f"verify_failed: {event.reason or ''}")
        elif kind == "promoted":
            note = "" if dep.status == "passed" else f" (unexpected: status was {dep.status})"
            self._finish(dep, "promoted", f"device promoted version {event.version or dep.version}{note}")
        elif kind == "rolled_back":
            self._finish(dep, "rolled_back", event.reason or f"device discarded version {dep.version}")
        elif kind in {"verdict_rejected", "command_rejected", "load_failed", "error"}:
            _LOGGER.warning("%s: device %s reports %s: %s", dep.deployment_id, dep.device_id, kind, event.reason)
            self.registry.update_deployment(dep.deployment_id, reason=f"{kind}: {event.reason or ''}")

    def handle_report(self, report: Report) -> None:
        """Gate a device report, publish the signed verdict and write the report files."""
        dep = self._active(report.deployment_id, report.device_id, "report")
        if dep is None:
            return
        if dep.terminal:
            # A finished deployment's record is final: a late, repeated or forged report (a device
            # "passing" a manifest its own agent rejected) is logged and changes nothing.
            self.registry.log_event("report_ignored", device_id=report.device_id, deployment_id=dep.deployment_id,
                                    detail=f"deployment already {dep.status}; report load_ok={report.load_ok}")
            _LOGGER.warning("report for %s ignored: the deployment is already %s", dep.deployment_id, dep.status)
            return
        if report.version != dep.version or report.model_id != dep.model_id:
            self.registry.log_event("report_mismatch", device_id=report.device_id, deployment_id=dep.deployment_id,
                                    detail=f"report for {report.model_id}@{report.version}, expected "
                                           f"{dep.model_id}@{dep.version}")
            _LOGGER.warning("report for %s names %s@%s, deployment is %s@%s; ignored", dep.deployment_id,
                            report.model_id, report.version, dep.model_id, dep.version)
            return
        if dep.verdict is not None:  # duplicate delivery: the device may have missed our verdict
            _LOGGER.info("report for %s already gated (%s); re-sending the verdict", dep.deployment_id, dep.status)
            self._publish_verdict(dep, Verdict.from_dict(dep.verdict))
            return
        policy = Policy.from_dict(dep.policy) if dep.policy else self.policy
        result = gate.evaluate(report, policy)
        verdict = Verdict(deployment_id=dep.deployment_id, device_id=dep.device_id, model_id=dep.model_id,
                          version=dep.version, verdict=result.verdict, checks=result.checks,
                          reason=result.reason, created=_iso(dep.created)).signed(self.key)
        status = "passed" if result.passed else "failed"
        # Conditional on a non-terminal status: a deployment finished meanwhile keeps its record.
        if not self._transition(dep, status, ("pending", "transferring", "measuring"), result.reason,
                                report=report.to_dict(), verdict=verdict.to_dict()):
            return
        self._publish_verdict(dep, verdict)
        self._write_report(dep.deployment_id, plot=False)

    def _write_report(self, deployment_id: str, plot: bool = True) -> None:
        """Queue the report files for people; the PNG only once, when the deployment ends."""
        try:
            self._reporter.submit(self._write_report_now, deployment_id, plot)
        except RuntimeError:  # closed: write it here rather than lose it
            self._write_report_now(deployment_id, plot)

    def _write_report_now(self, deployment_id: str, plot: bool) -> None:
        """Files of the deployment as recorded now (see reports.write_report); errors are logged."""
        dep = self.registry.deployment(deployment_id)
        if dep.report is None:
            return
        try:
            reports.write_report(self.registry.reports_dir, _summary(dep), dep.report, dep.verdict, plot=plot)
        except OSError as exc:  # the verdict stands even if the disk is full
            _LOGGER.error("could not write the report files of %s: %s", dep.deployment_id, exc)
        except Exception:  # a report bug must not silently stop the writer thread's later reports
            _LOGGER.exception("report files of %s failed", dep.deployment_id)

    def _publish_verdict(self, dep: DeploymentRecord, verdict: Verdict) -> None:
        self.publish(self.topics.down(dep.device_id, "verdict"), verdict.to_json())
        _LOGGER.info("verdict %s for %s sent to %s: %s", verdict.verdict, dep.deployment_id, dep.device_id,
                     verdict.reason)

    # ---- status helpers ----------------------------------------------------------------------
    def _transition(self, dep: DeploymentRecord, status: str, from_statuses: Iterable[str], reason: str, *,
                    report: dict | None = None, verdict: dict | None = None) -> bool:
        """Move to `status` only from one of `from_statuses` (atomic; a racing process loses)."""
        olds = tuple(from_statuses)
        sets = ["status = ?", "reason = ?", "updated = ?"]
        params: list[Any] = [status, reason, time.time()]
        if report is not None:
            sets.append("report = ?")
            params.append(_json_text(report))
        if verdict is not None:
            sets.append("verdict = ?")
            params.append(_json_text(verdict))
        sql = (f"UPDATE deployments SET {', '.join(sets)} WHERE deployment_id = ? AND status IN "
               f"({', '.join('?' for _ in olds)})")
        changed = self.registry.db.execute(sql, [*params, dep.deployment_id, *olds]) == 1
        if changed:
            self.registry.log_event(f"status:{status}", device_id=dep.device_id, deployment_id=dep.deployment_id,
                                    detail=reason)
            _LOGGER.info("deployment %s: %s -> %s %s", dep.deployment_id, dep.status, status, reason)
        return changed

    def _finish(self, dep: DeploymentRecord, status: str, reason: str) -> bool:
        allowed = ACTIVE if status not in {"promoted", "rolled_back"} else ACTIVE | {"timeout"}
        changed = self._transition(dep, status, sorted(allowed), reason)
        if changed and dep.report is not None:
            self._write_report(dep.deployment_id)  # the files show the final status
        return changed

    # ---- cancelling -------------------------------------------------------------------------
    def cancel(self, deployment_id: str, *, notify: bool) -> DeploymentRecord:
        """End a deployment in progress as `cancelled`; tell its device now (`notify`) or on the next tick.

        A process without a broker (the CLI) records CANCEL_PENDING; the running server's tick
        sends the signed cancel command, so the device drops the candidate and keeps its model.
        """
        dep = self.registry.deployment(deployment_id)
        if dep.terminal:
            raise DeployError(f"deployment {deployment_id} already ended: {dep.status} ({dep.reason or '-'})")
        if not self._finish(dep, "cancelled", CANCELLED if notify else CANCEL_PENDING):
            raise DeployError(f"deployment {deployment_id} ended while cancelling: "
                              f"{self.registry.deployment(deployment_id).status}")
        if notify:
            self.send_command(dep.device_id, "cancel", dep.deployment_id)
        return self.registry.deployment(deployment_id)

    def _tell_cancelled(self) -> None:
        for row in self.registry.db.query("SELECT deployment_id, device_id FROM deployments WHERE status = ?"
                                          " AND reason = ?", ("cancelled", CANCEL_PENDING)):
            self.send_command(row["device_id"], "cancel", row["deployment_id"])
            self.registry.update_deployment(row["deployment_id"], reason=CANCELLED)

    # ---- periodic work ---------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Start pending deployments (also those created by the CLI) and time out overdue ones."""
        now = time.time() if now is None else now
        self._tell_cancelled()
        active = self.registry.deployments(active_only=True)
        offline = {d.device_id: d for d in self.registry.offline_devices()} if active else {}
        for dep in active:
            gone = self._offline_too_long(dep, offline.get(dep.device_id), now)
            if dep.deadline < now or gone:
                why = gone or f"no outcome within the deadline (last status {dep.status})"
                if self._finish(dep, "timeout", why):
                    self.send_command(dep.device_id, "cancel", dep.deployment_id)
            elif dep.status == "pending":
                self.start(dep.deployment_id)

    def _offline_too_long(self, dep: DeploymentRecord, device: DeviceRecord | None, now: float) -> str | None:
        """Why the deployment cannot finish: its device has been offline for the grace period during it."""
        if device is None:
            return None
        since = max(device.last_seen, dep.created)  # an offline state's arrival time, or the deployment's start
        if now - since < self.config.offline_grace_s:
            return None
        return (f"device_offline: {dep.device_id} went offline at {_iso(device.last_seen)} (its retained state / "
                f"Last Will) and did not come back within {self.config.offline_grace_s:.0f} s; last status "
                f"{dep.status}")

    def resume(self) -> None:
        """After a (re)start: re-send what a device may be waiting for, per recorded status."""
        for dep in self.registry.deployments(active_only=True):
            if dep.status == "transferring":
                # The agent answers a manifest it already has with its missing chunks.
                self._send_manifest(dep)
            elif dep.status in {"passed", "failed"} and dep.verdict is not None:
                self._publish_verdict(dep, Verdict.from_dict(dep.verdict))


def _json_text(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, allow_nan=False)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _summary(dep: DeploymentRecord) -> dict[str, Any]:
    return {"deployment_id": dep.deployment_id, "device_id": dep.device_id, "model_id": dep.model_id,
            "version": dep.version, "status": dep.status, "reason": dep.reason, "created": dep.created}
