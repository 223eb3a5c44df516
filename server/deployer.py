"""Deployment of one registered artifact to one device: manifest, chunks, report, gate, verdict.

The deployer keeps no state of its own between messages: every step reads and updates the
deployment row in the registry, so a restarted server (or another server process sharing the
database) continues any deployment from its recorded status. Status changes that two processes
might race on are compare-and-set transitions of the registry, checked against the one table in
`protocol.states`. Device events and reports are handled in `server.device_messages`, artifact
reading in `server.transfer`, report files in `server.reports`.

Status flow: pending -> transferring -> measuring -> passed | failed -> promoted | rolled_back;
rejected (refused before or during transfer) and timeout end a deployment early.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import chunking
from protocol.artifact import unpacked_size
from protocol.limits import DEFAULT_LIMITS
from protocol.messages import Command, Event, Manifest, Report, Verdict
from protocol.states import CommandName, DeploymentStatus, ErrorKind
from protocol.topics import Topics
from server import window
from server.device_messages import DEVICE_ERRORS, PINNED_KEY_MISMATCH, DeviceMessages
from server.policy import Policy
from server.registry import ArtifactRecord, DeploymentRecord, Registry
from server.registry.records import allowed_sources
from server.reports import ReportQueue, write_record_report
from server.transfer import (
    DeployerConfig,
    DeployError,
    IncompatibleRuntimeError,
    Prepared,
    PreparedCache,
    UnknownDeviceError,
    iso_time,
    runtime_incompatibility,
)

_LOGGER = logging.getLogger(__name__)

__all__ = ["CANCELLED", "CANCEL_PENDING", "DEVICE_ERRORS", "PINNED_KEY_MISMATCH", "ChunkTransform", "Deployer",
           "DeployerConfig", "DeployError", "IncompatibleRuntimeError", "Prepared", "Publish", "UnknownDeviceError",
           "runtime_incompatibility"]

Publish = Callable[[str, bytes], None]
ChunkTransform = Callable[[str, int, bytes], bytes]
_D = DeploymentStatus

CANCELLED = "cancelled by the operator"
CANCEL_PENDING = "cancelled by the operator; a running server tells the device"


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
        self._prepared = PreparedCache(registry.chunk_digests)
        self.reports = ReportQueue(registry)
        self._messages = DeviceMessages(self)

    # ---- creation --------------------------------------------------------------------------
    def create(self, model_id: str, device_id: str, *, version: int | None = None, policy: Policy | None = None,
               force: bool = False, chunk_size: int | None = None) -> DeploymentRecord:
        """Record a pending deployment (see `record_deployment`) with this deployer's defaults."""
        return record_deployment(self.registry, model_id, device_id, version=version, policy=policy or self.policy,
                                 force=force, chunk_size=chunk_size or self.config.chunk_size,
                                 deadline_s=self.config.deadline_s)

    # ---- transfer --------------------------------------------------------------------------
    def start(self, deployment_id: str) -> bool:
        """Claim a pending deployment and send its signed manifest; False if another process claimed it."""
        record = self.registry.transition(deployment_id, (_D.PENDING,), _D.TRANSFERRING)
        if record is None:
            return False
        self._send_manifest(record)
        return True

    def prepare(self, artifact: ArtifactRecord, chunk_size: int) -> Prepared:
        """The packed artifact read and cut into chunks, cached (see `PreparedCache.get`)."""
        return self._prepared.get(artifact, chunk_size)

    def close(self) -> None:
        """Write the report files still queued (call once the worker has stopped)."""
        self.reports.close()

    def wait_reports(self, timeout: float = 30.0) -> None:
        """Block until the report files queued so far are written (TimeoutError after `timeout`)."""
        self.reports.wait(timeout)

    def handle_event(self, event: Event) -> None:
        """React to a device event about a deployment."""
        self._messages.handle_event(event)

    def handle_report(self, report: Report) -> None:
        """Gate a device report, publish the signed verdict and write the report files."""
        self._messages.handle_report(report)

    def explain(self, reason: str) -> str:
        """A device's rejection plus the way forward when it pinned another server key."""
        return self._messages.explain(reason)

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
        requirements: dict[str, Any] = {k: metrics[k] for k in ("ops", "runtimes", "window", "k", "num_items")
                                        if k in metrics}
        return Manifest(deployment_id=dep.deployment_id, device_id=dep.device_id, model_id=artifact.model_id,
                        version=artifact.version, total_size=artifact.size, sha256=artifact.sha256,
                        chunk_size=dep.chunk_size, chunk_sha256=list(digests),
                        created=iso_time(dep.created), requirements=requirements,
                        unpacked_size=unpacked_size(artifact.path)).signed(self.key)

    def _send_manifest(self, dep: DeploymentRecord) -> None:
        try:
            manifest = self.manifest(dep)
        except (DeployError, OSError) as exc:
            self.finish(dep, _D.REJECTED, f"cannot send: {exc}")
            return
        payload = manifest.to_json()
        limits = DEFAULT_LIMITS
        if len(payload) > limits.max_manifest_bytes or manifest.chunk_count > limits.max_chunks:
            self.finish(dep, _D.REJECTED, f"manifest of {len(payload)} bytes for {manifest.chunk_count} chunks exceeds "
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
        self.finish(dep, _D.REJECTED, reason)
        self.send_command(dep.device_id, CommandName.CANCEL, dep.deployment_id)

    def send_command(self, device_id: str, command: str, deployment_id: str | None = None) -> None:
        """Publish a signed command (report_state, rollback, cancel) to one device."""
        cmd = Command(device_id=device_id, command=command, deployment_id=deployment_id).signed(self.key)
        self.publish(self.topics.down(device_id, "command"), cmd.to_json())

    def publish_verdict(self, dep: DeploymentRecord, verdict: Verdict) -> None:
        self.publish(self.topics.down(dep.device_id, "verdict"), verdict.to_json())
        _LOGGER.info("verdict %s for %s sent to %s: %s", verdict.verdict, dep.deployment_id, dep.device_id,
                     verdict.reason)

    # ---- status helpers ----------------------------------------------------------------------
    def transition(self, dep: DeploymentRecord, status: str, from_statuses: Iterable[str], reason: str, *,
                    report: dict | None = None, verdict: dict | None = None) -> DeploymentRecord | None:
        """Move to `status` only from one of `from_statuses` (atomic; a racing process loses: None)."""
        record = self.registry.transition(dep.deployment_id, from_statuses, status, reason=reason, report=report,
                                          verdict=verdict)
        if record is not None:
            _LOGGER.info("deployment %s: %s -> %s %s", dep.deployment_id, dep.status, status, reason)
        return record

    def finish(self, dep: DeploymentRecord, status: str, reason: str) -> bool:
        record = self.transition(dep, status, allowed_sources(status), reason)
        if record is not None and record.report is not None:
            self.reports.submit(record)  # the files show the final status
        return record is not None

    # ---- cancelling -------------------------------------------------------------------------
    def cancel(self, deployment_id: str, *, notify: bool) -> DeploymentRecord:
        """End a deployment in progress as `cancelled` (see `cancel_deployment`); `notify` tells its device now."""
        record = cancel_deployment(self.registry, deployment_id, notify=notify, reports=self.reports)
        if notify:
            self.send_command(record.device_id, CommandName.CANCEL, record.deployment_id)
        return record

    def _tell_cancelled(self) -> None:
        for dep in self.registry.deployments(status=_D.CANCELLED, reason=CANCEL_PENDING):
            self.send_command(dep.device_id, CommandName.CANCEL, dep.deployment_id)
            self.registry.update_deployment(dep.deployment_id, reason=CANCELLED)

    # ---- periodic work ---------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Start pending deployments (also those created by the CLI) and time out overdue ones."""
        now = time.time() if now is None else now
        self._tell_cancelled()
        for dep, offline_at in self.registry.deployments_due(now, offline_since=now - self.config.offline_grace_s):
            gone = None if offline_at is None else self._offline_reason(dep, offline_at)
            if dep.deadline < now or gone:
                why = gone or f"no outcome within the deadline (last status {dep.status})"
                if self.finish(dep, _D.TIMEOUT, why):
                    self.send_command(dep.device_id, CommandName.CANCEL, dep.deployment_id)
            elif dep.status == _D.PENDING:
                self.start(dep.deployment_id)

    def _offline_reason(self, dep: DeploymentRecord, offline_at: float) -> str:
        """Why the deployment cannot finish: its device went offline at `offline_at` and stayed away for
        the grace period during the deployment (the registry's query decides that)."""
        return (f"device_offline: {dep.device_id} went offline at {iso_time(offline_at)} (its retained state / "
                f"Last Will) and did not come back within {self.config.offline_grace_s:.0f} s; last status "
                f"{dep.status}")

    def resume(self) -> None:
        """After a (re)start: re-send what a device may be waiting for, per recorded status."""
        for dep in self.registry.deployments(active_only=True):
            if dep.status == _D.TRANSFERRING:
                # The agent answers a manifest it already has with its missing chunks.
                self._send_manifest(dep)
            elif dep.status in {_D.PASSED, _D.FAILED} and dep.verdict is not None:
                self.publish_verdict(dep, Verdict.from_dict(dep.verdict))


def record_deployment(registry: Registry, model_id: str, device_id: str, *, policy: Policy, deadline_s: float,
                      chunk_size: int, version: int | None = None, force: bool = False) -> DeploymentRecord:
    """Record a pending deployment after checking the device and its runtime (no key, no broker needed).

    Raises UnknownDeviceError for a device never seen (unless `force`), and
    IncompatibleRuntimeError (after recording a rejected deployment) when the artifact's
    runtime check says the device cannot load it. A running server's tick starts it.
    """
    artifact = registry.artifact(model_id, version)
    device = registry.find_device(device_id)
    if device is None and not force:
        known = [d.device_id for d in registry.devices()]
        raise UnknownDeviceError(
            f"device {device_id!r} has never been seen (no up/state received); known devices: "
            f"{known or 'none'}. Start its agent first, or force the deployment.")
    why = runtime_incompatibility(artifact, device.runtime_key if device else None)
    if why and not force:
        registry.create_deployment(artifact, device_id, chunk_size=chunk_size, policy=policy.to_dict(),
                                   deadline_s=deadline_s, status=_D.REJECTED, reason=f"{ErrorKind.OP_VERSION}: {why}")
        raise IncompatibleRuntimeError(f"refusing to deploy: {why}")
    record = registry.create_deployment(artifact, device_id, chunk_size=chunk_size, policy=policy.to_dict(),
                                        deadline_s=deadline_s, forced=force,
                                        reason="forced" if force and (why or device is None) else "")
    _LOGGER.info("deployment %s created: %s -> %s", record.deployment_id, artifact.id, device_id)
    return record


def cancel_deployment(registry: Registry, deployment_id: str, *, notify: bool,
                      reports: ReportQueue | None = None) -> DeploymentRecord:
    """End a deployment in progress as `cancelled`; the caller tells its device (`notify`) or the next tick does.

    A process without a broker (the CLI) records CANCEL_PENDING; the running server's tick
    sends the signed cancel command, so the device drops the candidate and keeps its model.
    Report files, if the deployment has a report, are rewritten to show the final status.
    """
    dep = registry.deployment(deployment_id)
    if dep.terminal:
        raise DeployError(f"deployment {deployment_id} already ended: {dep.status} ({dep.reason or '-'})")
    reason = CANCELLED if notify else CANCEL_PENDING
    record = registry.transition(deployment_id, allowed_sources(_D.CANCELLED), _D.CANCELLED, reason=reason)
    if record is None:
        raise DeployError(f"deployment {deployment_id} ended while cancelling: "
                          f"{registry.deployment(deployment_id).status}")
    _LOGGER.info("deployment %s: %s -> %s %s", deployment_id, dep.status, _D.CANCELLED, reason)
    if record.report is not None:
        if reports is not None:
            reports.submit(record)
        else:  # a command line: no 45 ms PNG per deployment in the foreground (the dashboard draws it)
            write_record_report(registry.reports_dir, record, plot=False,
                                plot_note="(latency.png not drawn by the command line; the dashboard draws it when "
                                          "opened)")
    return record
