"""The deployment controller: the device's one deployment, its phase, and the model it serves.

Owner of the model store, the active model and the deployment in progress; every method below
runs on the agent's worker thread (protocol.worker), so none of that state is locked. Readers on
other threads (heartbeat, state messages) get `snapshot`, an immutable value replaced whole.

The phase moves only through `_enter`, checked against `protocol.states.AGENT_TRANSITIONS`:
IDLE -> DOWNLOADING -> MEASURING -> AWAITING_VERDICT -> IDLE, and any phase may end back to IDLE
(finished, failed, superseded, cancelled or timed out). The constructor does no I/O: `open()`
reads the pinned server key, opens the state directory and detects the runtime.

This class is a little over 300 lines on purpose: it is the one place where a deployment's
phase changes, and splitting its handlers apart would spread the transitions again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from agent import __version__
from agent.config import AgentConfig
from agent.deployment import Deployment, EvalSettings, MeasureFn, PairedFn, evaluate_and_encode
from agent.health import Health, Snapshot
from agent.inbound import LATE, Refused, decode_command, decode_verdict, verdict_problem
from agent.link import DeviceLink
from agent.model import LoadedModel
from agent.recovery import open_active, open_slot, resume_staging
from agent.runtime import ModelLoadError, RuntimeInfo, detect_runtime
from agent.store import ModelStore, StoreError
from agent.transfer import Admission, ChunkRejected, ManifestRejected, Receiver, check_manifest
from protocol import chunking, signing
from protocol.errors import ProtocolError
from protocol.limits import DEFAULT_LIMITS
from protocol.messages import DeviceState, Report
from protocol.states import (
    AGENT_TRANSITIONS,
    AgentPhase,
    CommandName,
    DeviceStatus,
    ErrorKind,
    EventType,
    NeedChunksReason,
)

_LOGGER = logging.getLogger(__name__)
_P = AgentPhase
_E = EventType


class Serving(Protocol):
    """What the controller needs of agent.serving: hand it the model to serve (None: nothing)."""

    def swap(self, model: LoadedModel | None) -> object: ...


@dataclass(frozen=True)
class Measuring:
    """How candidates are measured: agent.measure's real functions unless a test passes shorter settings."""

    measure: MeasureFn
    paired: PairedFn
    config: Any = None
    power_source: Any = "detect"


class DeploymentController:
    """Receives manifests, chunks, verdicts and commands; evaluates, promotes or discards candidates."""

    def __init__(self, config: AgentConfig, link: DeviceLink, health: Health, service: Serving,
                 measuring: Measuring) -> None:
        self.config = config
        self.device_id = config.device_id
        self.link = link
        self.health = health
        self.service = service
        self.measuring = measuring
        self.snapshot = Snapshot()
        self.active_model: LoadedModel | None = None
        self.deployment: Deployment | None = None
        self._store: ModelStore | None = None
        self._server_key: Any = None
        self._runtime: RuntimeInfo | None = None
        self._power_source: Any = measuring.power_source

    # -- opening -----------------------------------------------------------------------------------
    def open(self) -> None:
        """Read the pinned key, open the state directory, detect the runtime (before connecting)."""
        if self.config.server_key is None:
            raise ValueError("server_key: required (the agent refuses unsigned deployments)")
        self._server_key = signing.load_public_key(self.config.server_key)
        self._store = ModelStore(self.config.state_dir)
        self._runtime = detect_runtime(self.config.runtime)

    def start_serving(self) -> None:
        """Detect the power source and serve the active model (or fall back to the previous one)."""
        # Compare with what `edgeguide-server export-key` printed: a mismatch refuses every manifest.
        _LOGGER.info("server_key_pinned path=%s fingerprint=%s", self.config.server_key,
                     signing.fingerprint(self._server_key))
        if self._power_source == "detect":
            from agent.measure import detect_power_source
            self._power_source = detect_power_source()
        model, error = open_active(self.store, self.config)
        if error:
            self.health.note_error(error)
        self._swap_in(model)

    @property
    def store(self) -> ModelStore:
        if self._store is None:
            raise RuntimeError("the controller is not open: call open() first")
        return self._store

    @property
    def runtime(self) -> RuntimeInfo:
        if self._runtime is None:
            raise RuntimeError("the controller is not open: call open() first")
        return self._runtime

    @property
    def phase(self) -> AgentPhase:
        return self.deployment.phase if self.deployment is not None else _P.IDLE

    def close(self) -> None:
        """Worker thread, last job: keep every chunk received (a planned stop), release the candidate."""
        dep = self.deployment
        if dep is not None and dep.phase is _P.DOWNLOADING:
            try:
                dep.receiver.flush()
            except StoreError as exc:
                _LOGGER.warning("staging_flush_failed deployment=%s error=%s", dep.deployment_id, exc)
            finally:
                dep.receiver.close()
        if dep is not None:
            dep.release()
        self.link.drop_report()
        self._swap_in(None)

    # -- state -------------------------------------------------------------------------------------
    def _swap_in(self, model: LoadedModel | None) -> None:
        self.service.swap(model)
        self.active_model = model
        self._publish_snapshot()

    def _publish_snapshot(self) -> None:
        model, dep = self.active_model, self.deployment
        self.snapshot = Snapshot(model.model_id if model else None, model.version if model else None,
                                 str(self.phase), dep.deployment_id if dep else None)

    def _enter(self, dep: Deployment, phase: AgentPhase) -> None:
        dep.phase = AGENT_TRANSITIONS.check(dep.phase, phase)
        self._publish_snapshot()

    def state(self, status: DeviceStatus) -> DeviceState:
        model = self.active_model if status is DeviceStatus.ONLINE else None
        return DeviceState(device_id=self.device_id, status=status.value,
                           active_model_id=model.model_id if model else None,
                           active_version=model.version if model else None,
                           runtime=self.runtime.to_dict(), agent_version=__version__)

    def publish_state(self) -> None:
        self.link.publish("state", self.state(DeviceStatus.ONLINE).to_json(), retain=True)

    def _begin(self, receiver: Receiver) -> Deployment:
        AGENT_TRANSITIONS.check(self.phase, _P.DOWNLOADING)
        self.deployment = Deployment(receiver.manifest, receiver)
        self._publish_snapshot()
        return self.deployment

    # -- connection and restart --------------------------------------------------------------------
    def on_connected(self) -> None:
        self.publish_state()
        dep = self.deployment
        if dep is not None and dep.phase is _P.DOWNLOADING:
            dep.last_progress = time.monotonic()
            self.link.event(_E.NEED_CHUNKS, deployment_id=dep.deployment_id, missing=dep.receiver.missing(),
                            version=dep.manifest.version, reason=NeedChunksReason.RECONNECTED)
        elif dep is not None and dep.phase is _P.AWAITING_VERDICT:
            self.link.resend_report("reconnected")
        self.link.kick_outbox()

    def on_resume(self) -> None:
        """After a restart: continue the newest unfinished download (older leftovers are dropped)."""
        receiver = resume_staging(self.store, self.link)
        if receiver is None:
            return
        dep = self._begin(receiver)
        _LOGGER.info("download_resumed deployment=%s missing=%d", receiver.deployment_id, len(receiver.missing()))
        if receiver.complete:
            self._complete(dep)

    # -- deadlines (worker thread, after every job) ------------------------------------------------
    def next_check_in(self) -> float | None:
        """Seconds until `check_deadlines` has something to do (bounded, like the old 5 s poll)."""
        dep = self.deployment
        if dep is None:
            return 5.0
        now = time.monotonic()
        if dep.phase is _P.DOWNLOADING:
            due = dep.last_progress + self.config.chunk_stall_s
            if dep.receiver.staging.unflushed:
                due = min(due, now + dep.receiver.staging.flush_interval_s)
            return max(0.05, min(5.0, due - now))
        if dep.phase is _P.AWAITING_VERDICT:
            resend = self.link.resend_due_in()
            due = min(t for t in (dep.verdict_deadline, now + resend if resend is not None else None, now + 5.0)
                      if t is not None)
            return max(0.05, due - now)
        return 5.0

    def check_deadlines(self) -> None:
        dep = self.deployment
        if dep is None:
            return
        now = time.monotonic()
        if dep.phase is _P.DOWNLOADING:
            try:
                dep.receiver.staging.flush_if_due()
            except StoreError as exc:
                self._fail_download(dep, exc)
                return
            if now - dep.last_progress >= self.config.chunk_stall_s:
                dep.last_progress = now
                if self.link.connected:
                    self.link.event(_E.NEED_CHUNKS, deployment_id=dep.deployment_id, missing=dep.receiver.missing(),
                                    version=dep.manifest.version, reason=NeedChunksReason.STALLED)
        elif dep.phase is _P.AWAITING_VERDICT and dep.verdict_deadline is not None and now >= dep.verdict_deadline:
            self._finish(dep, promoted=False, reason=f"no verdict within {self.config.verdict_timeout_s:.0f} s")
        elif dep.phase is _P.AWAITING_VERDICT:
            self.link.resend_if_due()

    # -- download ----------------------------------------------------------------------------------
    def _admission(self) -> Admission:
        pointer = self.store.active()
        return Admission(device_id=self.device_id, server_key=self._server_key,
                         active_version=pointer.current.version if pointer else None,
                         quota_bytes=self.config.quota_bytes, free_bytes=self.store.free_bytes(),
                         newest_admitted=self.store.newest_admitted())

    def on_manifest(self, payload: bytes) -> None:
        try:
            manifest = check_manifest(payload, self._admission())
        except ManifestRejected as exc:
            self.link.event(_E.MANIFEST_REJECTED, deployment_id=exc.deployment_id, reason=exc.reason,
                            version=exc.manifest.version if exc.manifest else None)
            return
        dep_id = manifest.deployment_id
        if dep_id in self.store.finished():
            self.link.event(_E.MANIFEST_REJECTED, deployment_id=dep_id, reason=f"deployment {dep_id} already finished",
                            version=manifest.version)
            return
        current = self.deployment
        if current is not None and current.deployment_id == dep_id:
            missing = current.receiver.missing() if current.phase is _P.DOWNLOADING else []
            self.link.event(_E.MANIFEST_ACCEPTED, deployment_id=dep_id, missing=missing, version=manifest.version,
                            reason=f"already {current.phase}")
            return
        if current is not None:
            _LOGGER.warning("deployment_superseded old=%s new=%s", current.deployment_id, dep_id)
            self._finish(current, promoted=False, reason=f"superseded by {dep_id}")
        try:
            self.store.note_admitted(manifest.created)
            receiver = Receiver.start(self.store, manifest)
        except StoreError as exc:
            self.link.event(_E.MANIFEST_REJECTED, deployment_id=dep_id, reason=f"{exc.kind}: {exc}",
                            version=manifest.version)
            return
        dep = self._begin(receiver)
        self.link.event(_E.MANIFEST_ACCEPTED, deployment_id=dep_id, missing=receiver.missing(),
                        version=manifest.version)
        if receiver.complete:
            self._complete(dep)

    def on_chunk(self, payload: bytes) -> None:
        dep = self.deployment
        try:
            chunk = chunking.decode_chunk(payload, DEFAULT_LIMITS.max_chunk_bytes)
        except ProtocolError as exc:
            self.link.event(_E.CHUNK_REJECTED, deployment_id=dep.deployment_id if dep else None, reason=str(exc))
            return  # its index is not trustworthy: the stall timer re-requests whatever is missing
        if dep is None or dep.phase is not _P.DOWNLOADING or chunk.deployment_id != dep.deployment_id:
            _LOGGER.debug("chunk_ignored deployment=%s index=%d", chunk.deployment_id, chunk.index)
            return
        try:
            fresh = dep.receiver.accept(chunk)
        except ChunkRejected as exc:
            self.link.event(_E.CHUNK_REJECTED, deployment_id=dep.deployment_id, reason=exc.reason)
            if exc.index is not None:
                self.link.event(_E.NEED_CHUNKS, deployment_id=dep.deployment_id, missing=[exc.index],
                                version=dep.manifest.version, reason=NeedChunksReason.CHUNK_REJECTED)
            return
        except StoreError as exc:
            self._fail_download(dep, exc)
            return
        if fresh:
            dep.last_progress = time.monotonic()
            if dep.receiver.ack_due():  # the server's window of chunks in flight moves on (server/window.py)
                self.link.event(_E.NEED_CHUNKS, deployment_id=dep.deployment_id, missing=dep.receiver.missing(),
                                version=dep.manifest.version, reason=NeedChunksReason.PROGRESS)
        if dep.receiver.complete:
            self._complete(dep)

    def _fail_download(self, dep: Deployment, exc: StoreError) -> None:
        m = dep.manifest
        kind = ErrorKind.DISK_FULL if exc.kind == "disk_full" else ErrorKind.VERIFY_ERROR
        self.link.send_report(Report(device_id=self.device_id, deployment_id=m.deployment_id, model_id=m.model_id,
                                     version=m.version, load_ok=False, error_kind=kind.value, error=str(exc),
                                     mode=self.config.measure_mode, runtime=self.runtime.to_dict()))
        self._finish(dep, promoted=False, reason=str(exc))

    # -- evaluation ----------------------------------------------------------------------------------
    def _settings(self) -> EvalSettings:
        quick = self.config.measure_mode == "quick"
        return EvalSettings(device_id=self.device_id, threads=self.config.threads, mode=self.config.measure_mode,
                            max_unpacked_bytes=DEFAULT_LIMITS.max_unpacked_bytes, runtime=self.config.runtime,
                            measure_config=self.measuring.config, power_source=self._power_source,
                            paired_pairs=20 if quick else 100)

    def _complete(self, dep: Deployment) -> None:
        """All chunks are here: evaluate the candidate and queue its report."""
        self.link.event(_E.DOWNLOAD_COMPLETE, deployment_id=dep.deployment_id, version=dep.manifest.version)
        self._enter(dep, _P.MEASURING)
        self.link.event(_E.MEASURING, deployment_id=dep.deployment_id, version=dep.manifest.version)
        result, payload = evaluate_and_encode(dep, self.store, self._settings(), measure=self.measuring.measure,
                                              paired=self.measuring.paired, incumbent=self.active_model,
                                              runtime_info=self.runtime)
        self.link.send_report(result.report, payload)
        if result.failed_event is not None:
            why = f"{result.report.error_kind}: {result.report.error}"
            self.health.note_error(result.report.error or why)
            self.link.event(result.failed_event, deployment_id=dep.deployment_id, version=dep.manifest.version,
                            reason=why)
            self._finish(dep, promoted=False, reason=why)
            return
        dep.candidate, dep.loaded = result.candidate, result.loaded
        self._enter(dep, _P.AWAITING_VERDICT)
        dep.verdict_deadline = time.monotonic() + self.config.verdict_timeout_s
        self.link.hold_report(dep.deployment_id, payload)

    # -- verdicts and commands -------------------------------------------------------------------------
    def on_verdict(self, payload: bytes) -> None:
        dep = self.deployment
        try:
            verdict = decode_verdict(payload, self._server_key)
        except Refused as exc:
            self.link.event(_E.VERDICT_REJECTED, deployment_id=exc.deployment_id, reason=exc.reason)
            return
        problem = verdict_problem(verdict, self.device_id, dep, self.store.finished())
        if problem == LATE:
            _LOGGER.info("verdict_late deployment=%s verdict=%s: already finished", verdict.deployment_id,
                         verdict.verdict)
            return
        if problem or dep is None:
            self.link.event(_E.VERDICT_REJECTED, deployment_id=verdict.deployment_id, reason=problem,
                            version=verdict.version)
            return
        if verdict.passed:
            self._finish(dep, promoted=True, reason=verdict.reason or "PASS")
        else:
            self._finish(dep, promoted=False, reason=f"verdict FAIL: {verdict.reason}")

    def on_command(self, payload: bytes) -> None:
        try:
            command = decode_command(payload, self._server_key, self.device_id)
        except Refused as exc:
            self.link.event(_E.COMMAND_REJECTED, reason=exc.reason)
            return
        _LOGGER.info("command name=%s deployment=%s", command.command, command.deployment_id)
        if command.command == CommandName.REPORT_STATE:
            self.publish_state()
        elif command.command == CommandName.CANCEL:
            dep = self.deployment
            if dep is None or (command.deployment_id and command.deployment_id != dep.deployment_id):
                self.link.event(_E.COMMAND_REJECTED, deployment_id=command.deployment_id,
                                reason=f"nothing to cancel (current: {dep.deployment_id if dep else None})")
                return
            self._finish(dep, promoted=False, reason="cancelled by the server")
        elif command.command == CommandName.ROLLBACK:
            self._rollback_to_previous(command.deployment_id)

    def _rollback_to_previous(self, deployment_id: str | None) -> None:
        """Undo the deployment the command names, only while it is the active one: a replayed
        rollback must not undo a later promotion."""
        pointer = self.store.active()
        try:
            if pointer is None or pointer.previous is None:
                raise StoreError("no previous model to roll back to")
            if deployment_id is None or deployment_id != pointer.current.deployment_id:
                raise StoreError(f"the command rolls back deployment {deployment_id}, the active model came from "
                                 f"{pointer.current.deployment_id}")
            model = open_slot(self.store, pointer.previous, self.config)
            self.store.rollback()
        except (StoreError, ModelLoadError) as exc:
            self.link.event(_E.COMMAND_REJECTED, reason=f"rollback impossible: {exc}")
            return
        self._swap_in(model)
        self.link.event(_E.ROLLED_BACK, version=model.version, reason="rollback command", durable=True)
        self.publish_state()

    # -- the end of a deployment ------------------------------------------------------------------------
    def _finish(self, dep: Deployment, *, promoted: bool, reason: str) -> None:
        """End a deployment: promote + swap serving, or discard the candidate; tell the server."""
        AGENT_TRANSITIONS.check(dep.phase, _P.IDLE)
        self.link.drop_report()
        if promoted and dep.candidate is not None and dep.loaded is not None:
            try:
                self.store.promote(dep.candidate)
            except StoreError as exc:
                _LOGGER.error("promote_failed deployment=%s error=%s", dep.deployment_id, exc)
                self.health.note_error(str(exc))
                promoted = False
                reason = f"promote failed: {exc}"
            else:
                model, dep.loaded = dep.loaded, None
                self._swap_in(model)
        if not promoted:
            dep.release()
            if dep.candidate is not None:
                try:
                    self.store.discard_candidate(dep.candidate)
                except StoreError as exc:
                    _LOGGER.error("discard_failed deployment=%s error=%s", dep.deployment_id, exc)
        # Outcome first (durable), then bookkeeping: a kill between these steps leaves either the
        # staging (redone on restart) or an unfinished active pointer (resume_staging reports it).
        try:
            self.link.event(_E.PROMOTED if promoted else _E.ROLLED_BACK, deployment_id=dep.deployment_id,
                            version=dep.manifest.version, reason=reason, durable=True)
            self.store.mark_finished(dep.deployment_id)
            dep.receiver.close()
            self.store.remove_staging(dep.deployment_id)
        except (StoreError, OSError) as exc:
            # A full disk must not leave the deployment stuck in memory; a restart redoes the staging
            # and the server de-duplicates a second report by deployment id.
            self.health.note_error(f"finishing {dep.deployment_id}: {exc}")
            _LOGGER.error("finish_bookkeeping_failed deployment=%s error=%s", dep.deployment_id, exc)
        finally:
            dep.phase = _P.IDLE
            if self.deployment is dep:
                self.deployment = None
            self._publish_snapshot()
        self.publish_state()
        _LOGGER.info("deployment_finished deployment=%s promoted=%s reason=%s active_version=%s",
                     dep.deployment_id, promoted, reason, self.active_model.version if self.active_model else None)
