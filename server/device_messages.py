"""What the server does with a device's events and reports about a deployment: the gate and its verdict.

Every reaction is a registry transition from the statuses it expects, so a late, repeated or
forged message changes nothing once the deployment moved on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from protocol import signing
from protocol.messages import Event, Report, Verdict
from protocol.states import DeploymentStatus, EventType, NeedChunksReason
from server import gate, window
from server.policy import Policy
from server.registry import DeploymentRecord, Registry, RegistryError
from server.transfer import iso_time

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from server.reports import ReportQueue

_LOGGER = logging.getLogger(__name__)

_D, _E = DeploymentStatus, EventType
# Device events that say something went wrong on the device: kept as its `last_error`.
DEVICE_ERRORS = frozenset({_E.MANIFEST_REJECTED, _E.VERDICT_REJECTED, _E.COMMAND_REJECTED, _E.LOAD_FAILED, _E.ERROR,
                           _E.VERIFY_FAILED})
# What protocol.signing says when a device's pinned key is not the one that signed.
PINNED_KEY_MISMATCH = "does not match the pinned server key"


class Delivery(Protocol):
    """What device messages may ask of the deployer that owns them (`server.deployer.Deployer`):
    declared here so this module needs nothing from the deployer's."""

    registry: Registry
    key: Ed25519PrivateKey
    policy: Policy
    reports: ReportQueue

    def send_chunks(self, dep: DeploymentRecord, indices: Iterable[int] | None, *, resend: bool = True) -> None: ...

    def publish_verdict(self, dep: DeploymentRecord, verdict: Verdict) -> None: ...

    def transition(self, dep: DeploymentRecord, status: str, from_statuses: Iterable[str], reason: str, *,
                   report: dict | None = None, verdict: dict | None = None) -> DeploymentRecord | None: ...

    def finish(self, dep: DeploymentRecord, status: str, reason: str) -> bool: ...


class DeviceMessages:
    """Handles one deployer's device events and reports (on the server's worker thread)."""

    def __init__(self, deployer: Delivery) -> None:
        self.deployer = deployer

    @property
    def registry(self) -> Registry:
        return self.deployer.registry

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
        return (f"{reason}; this server signs with {signing.fingerprint(self.deployer.key)}: the agent pins another "
                "server's key. Run `edgeguide-server export-key KEY.pem` on this server and restart the agent "
                "with --server-key KEY.pem")

    def handle_event(self, event: Event) -> None:
        """React to a device event about a deployment."""
        detail = event.reason or (f"missing={event.missing[:20]}" if event.missing else "")
        if not (event.type == _E.NEED_CHUNKS and event.reason == NeedChunksReason.PROGRESS):
            # A progress acknowledgement is flow control (one per few chunks), not history worth a row.
            self.registry.log_event(f"device:{event.type}", device_id=event.device_id,
                                    deployment_id=event.deployment_id, detail=detail or "")
        if event.type in DEVICE_ERRORS:
            self.registry.set_device_error(event.device_id, self.explain(f"{event.type}: {event.reason or ''}"))
        elif event.type == _E.PROMOTED:  # the device took a signed model: an old key or load error is history
            self.registry.set_device_error(event.device_id, "")
        dep = self._active(event.deployment_id, event.device_id, f"event {event.type}")
        if dep is None:
            return
        kind = event.type
        if dep.terminal and kind not in {_E.PROMOTED, _E.ROLLED_BACK}:
            _LOGGER.info("ignoring %s for %s: already %s", kind, dep.deployment_id, dep.status)
            return
        if kind == _E.MANIFEST_ACCEPTED:
            self.deployer.send_chunks(dep, event.missing)
        elif kind in {_E.NEED_CHUNKS, _E.CHUNK_REJECTED}:
            if event.missing is None:  # the agent follows up with need_chunks naming the index
                _LOGGER.info("%s for %s: %s", kind, dep.deployment_id, event.reason)
            elif dep.status in {_D.PENDING, _D.TRANSFERRING}:
                self.deployer.send_chunks(dep, event.missing, resend=event.reason in window.RESEND_REASONS)
        elif kind == _E.MANIFEST_REJECTED:
            self.deployer.finish(dep, _D.REJECTED,
                         self.explain(f"device rejected the manifest: {event.reason or 'no reason given'}"))
        elif kind in {_E.DOWNLOAD_COMPLETE, _E.MEASURING}:
            self.deployer.transition(dep, _D.MEASURING, (_D.PENDING, _D.TRANSFERRING), event.reason or "")
        elif kind == _E.VERIFY_FAILED:
            _LOGGER.warning("%s: device %s says the artifact failed verification: %s", dep.deployment_id,
                            dep.device_id, event.reason)
            self.registry.update_deployment(dep.deployment_id, reason=f"verify_failed: {event.reason or ''}")
        elif kind == _E.PROMOTED:
            note = "" if dep.status == _D.PASSED else f" (unexpected: status was {dep.status})"
            self.deployer.finish(dep, _D.PROMOTED, f"device promoted version {event.version or dep.version}{note}")
        elif kind == _E.ROLLED_BACK:
            self.deployer.finish(dep, _D.ROLLED_BACK, event.reason or f"device discarded version {dep.version}")
        elif kind in {_E.VERDICT_REJECTED, _E.COMMAND_REJECTED, _E.LOAD_FAILED, _E.ERROR}:
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
            self.deployer.publish_verdict(dep, Verdict.from_dict(dep.verdict))
            return
        policy = Policy.from_dict(dep.policy) if dep.policy else self.deployer.policy
        result = gate.evaluate(report, policy)
        verdict = Verdict(deployment_id=dep.deployment_id, device_id=dep.device_id, model_id=dep.model_id,
                          version=dep.version, verdict=result.verdict, checks=result.checks,
                          reason=result.reason, created=iso_time(dep.created)).signed(self.deployer.key)
        status = _D.PASSED if result.passed else _D.FAILED
        # Conditional on a non-terminal status: a deployment finished meanwhile keeps its record.
        gated = self.deployer.transition(dep, status, (_D.PENDING, _D.TRANSFERRING, _D.MEASURING), result.reason,
                                         report=report.to_dict(), verdict=verdict.to_dict())
        if gated is None:
            return
        self.deployer.publish_verdict(dep, verdict)
        self.deployer.reports.submit(gated, plot=False)
