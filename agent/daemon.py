"""The device agent process: MQTT link, deployment state machine, serving, heartbeats.

Threads and why: paho's network thread only enqueues received messages (a handler must never
block the MQTT loop); one worker thread owns the store and the deployment (so no state is shared
between threads); the heartbeat and the outbox flusher have their own threads so a long
measurement never silences liveness or delays a queued report. The active model keeps serving
from agent.serving while all of this happens.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.deployment import (
    AWAITING_VERDICT,
    DOWNLOADING,
    MEASURING,
    Deployment,
    EvalSettings,
    Evaluation,
    MeasureFn,
    PairedFn,
    evaluate_candidate,
    failed_evaluation,
)
from agent.model import LoadedModel, open_model
from agent.outbox import Outbox, OutboxFlusher
from agent.runtime import ModelLoadError, RuntimeInfo, detect_runtime
from agent.store import ModelStore, SlotRef, StoreError
from agent.transfer import PROGRESS_REASON, Admission, ChunkRejected, ManifestRejected, Receiver, check_manifest
from protocol import chunking, signing
from protocol.errors import ProtocolError, SignatureError
from protocol.limits import DEFAULT_LIMITS
from protocol.messages import Command, DeviceState, Event, Heartbeat, Report, Verdict
from protocol.mqtt import ConnectError, MqttLink
from protocol.names import peek_deployment_id
from protocol.redact import redact_url
from protocol.schema import decode_object

_LOGGER = logging.getLogger(__name__)

_STOP = object()
EVENT_REASON_MAX_CHARS = 1000  # an event's reason text is cut to this (error texts can quote payloads)
# While awaiting a verdict the report is published again this often (and on every reconnect):
# mosquitto 2.0 does not restore `$share` subscriptions after a restart, so a report sent before
# the server re-subscribed is dropped by the broker even though it acknowledged it. The server
# de-duplicates by deployment id and answers a repeat with the verdict it already gave.
# The default comes from AgentConfig.report_resend_s (30 s).


@dataclass
class _Work:
    kind: str
    payload: Any = None


class Agent:
    """One device's agent. `start()` returns at once; `stop()` publishes offline state and shuts down.

    `measure`, `paired`, `measure_config` and `power_source` default to agent.measure's real
    implementations; tests pass a shorter MeasureConfig, never a fake measurement.
    `report_resend_s` is how often an unanswered report is published again (default: the config's).
    `fatal_error` is set when the agent can no longer work (its connect loop or worker died); the
    CLI then exits non-zero so the supervisor restarts the process.
    """

    def __init__(self, config: AgentConfig, *, measure: MeasureFn | None = None, paired: PairedFn | None = None,
                 measure_config: Any = None, power_source: Any = "detect", service: Any = None,
                 report_resend_s: float | None = None) -> None:
        if report_resend_s is None:
            report_resend_s = config.report_resend_s
        if not report_resend_s > 0:
            raise ValueError(f"report_resend_s must be > 0, got {report_resend_s}")
        self.config = config
        self.report_resend_s = report_resend_s
        self.topics = config.topics
        self.device_id = config.device_id
        self.server_key = signing.load_public_key(config.server_key)
        self.store = ModelStore(config.state_dir)
        self.outbox = Outbox(Path(config.state_dir) / "outbox", config.outbox_max_bytes)
        if measure is None or paired is None:
            from agent.measure import measure_model, paired_compare
            measure = measure or measure_model
            paired = paired or paired_compare
        self._measure = measure
        self._paired = paired
        self._measure_config = measure_config
        self._power_source = power_source
        if service is None:
            from agent.serving import RecommendService
            service = RecommendService()
        self.service = service
        self.http: Any = None
        self.runtime: RuntimeInfo = detect_runtime(config.runtime)
        self.active_model: LoadedModel | None = None
        self.deployment: Deployment | None = None
        self.last_error: str | None = None
        self.fatal_error: str | None = None
        self.started_at = time.monotonic()
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.link = MqttLink(
            config.broker_url, client_id=f"agent-{self.device_id}", username=config.username,
            password=config.password,
            tls_ca=str(config.tls_ca) if config.tls_ca else None,
            tls_cert=str(config.tls_cert) if config.tls_cert else None,
            tls_key=str(config.tls_key) if config.tls_key else None,
            clean_start=False,
            will=(self.topics.up(self.device_id, "state"), self._state("offline").to_json(), 1, True),
            protocol=config.mqtt_protocol,
        )
        self.flusher = OutboxFlusher(self.outbox, self._send_acked, lambda: self.link.connected)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Open the active model, start serving, resume staging, then connect in the background."""
        _LOGGER.info("agent_starting device=%s broker=%s state_dir=%s runtime=%s measure_mode=%s", self.device_id,
                     redact_url(self.config.broker_url), self.config.state_dir, self.runtime,
                     self.config.measure_mode)
        # Compare with what `edgeguide-server export-key` printed: a mismatch refuses every manifest.
        _LOGGER.info("server_key_pinned path=%s fingerprint=%s", self.config.server_key,
                     signing.fingerprint(self.server_key))
        if self._power_source == "detect":
            from agent.measure import detect_power_source
            self._power_source = detect_power_source()
        self._open_active()
        if self.config.http_port is not None:
            from agent.serving.http import start_http_server
            self.http = start_http_server(self.service, self.config.http_host, self.config.http_port,
                                          allowed_hosts=self.config.allowed_hosts)
        down = self.topics.device_down_filter(self.device_id)
        self.link.subscribe(down, self._on_message, qos=1)
        self.link.add_connect_listener(lambda: self._queue.put(_Work("connected")))
        self._queue.put(_Work("resume"))
        self.flusher.start()
        for name, target in (("worker", self._work_loop), ("heartbeat", self._heartbeat_loop),
                             ("connect", self._connect_loop)):
            thread = threading.Thread(target=self._guarded(name, target), name=f"edgeguide-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop: finish the current step, publish offline state, stop HTTP and MQTT."""
        if self.stopped.is_set():
            return
        _LOGGER.info("agent_stopping device=%s", self.device_id)
        self._stop.set()
        self._queue.put(_STOP)
        for thread in self._threads:
            thread.join(timeout)
        self.flusher.stop()
        if self.deployment is not None and self.deployment.phase == DOWNLOADING:
            try:
                self.deployment.receiver.flush()  # a planned stop keeps every chunk received
            except StoreError as exc:
                _LOGGER.warning("staging_flush_failed deployment=%s error=%s", self.deployment.deployment_id, exc)
            finally:
                self.deployment.receiver.close()
        if self.link.connected:
            try:
                info = self.link.publish(self.topics.up(self.device_id, "state"), self._state("offline").to_json(),
                                         qos=1, retain=True)
                info.wait_for_publish(3.0)
            except (ConnectError, RuntimeError, ValueError) as exc:
                _LOGGER.warning("offline_state_not_sent error=%s", exc)
        self.link.stop()
        if self.http is not None:
            self.http.stop()
        if self.deployment is not None:
            self.deployment.release()
        self.service.swap(None)
        self.active_model = None
        self.stopped.set()
        _LOGGER.info("agent_stopped device=%s", self.device_id)

    def wait(self, timeout: float | None = None) -> bool:
        return self.stopped.wait(timeout)

    # -- startup ------------------------------------------------------------------------------
    def _open_active(self) -> None:
        """Serve the active slot; if it is broken, fall back to the previous model, loudly."""
        pointer = self.store.active()
        if pointer is None:
            _LOGGER.info("no_active_model device=%s: serving nothing until a model is promoted", self.device_id)
            return
        try:
            self._swap_in(self._open_slot(pointer.current))
            return
        except (ModelLoadError, StoreError) as exc:
            self.last_error = f"active model unusable: {exc}"
            _LOGGER.error("ACTIVE_MODEL_CORRUPT slot=%s model_id=%s version=%s error=%s", pointer.current.slot,
                          pointer.current.model_id, pointer.current.version, exc)
        if pointer.previous is None:
            _LOGGER.error("no_previous_model: serving nothing until a new model is promoted")
            return
        try:
            model = self._open_slot(pointer.previous)
            self.store.rollback()
            self._swap_in(model)
            _LOGGER.error("FELL_BACK_TO_PREVIOUS model_id=%s version=%s", model.model_id, model.version)
        except (ModelLoadError, StoreError) as exc:
            _LOGGER.error("previous_model_unusable error=%s: serving nothing", exc)

    def _open_slot(self, ref: SlotRef) -> LoadedModel:
        held = self.store.slot_contents(ref.slot)
        if held is None or (held.model_id, held.version) != (ref.model_id, ref.version):
            raise StoreError(f"slot {ref.slot} holds {held}, pointer says {ref.model_id} v{ref.version}")
        return open_model(self.store.model_dir(ref), model_id=ref.model_id, version=ref.version,
                          threads=self.config.threads, runtime=self.config.runtime)

    def _swap_in(self, model: LoadedModel | None) -> None:
        self.service.swap(model)
        self.active_model = model

    def _guarded(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        """Run a thread's loop; if it dies while the agent is meant to run, the agent is broken."""
        def run() -> None:
            try:
                target()
            except Exception as exc:
                if self._stop.is_set():
                    _LOGGER.warning("thread_failed_while_stopping thread=%s error=%r", name, exc)
                    return
                _LOGGER.exception("thread_died thread=%s", name)
                self.declare_fatal(f"{name} thread died: {type(exc).__name__}: {exc}")
        return run

    def declare_fatal(self, reason: str) -> None:
        """Record an error the process cannot recover from; the CLI exits non-zero on it."""
        if self.fatal_error is None:
            self.fatal_error = reason
            self.last_error = reason
            _LOGGER.critical("AGENT_FATAL device=%s reason=%s: exiting so the supervisor restarts the agent",
                             self.device_id, reason)

    def _connect_loop(self) -> None:
        """Keep trying the first connection (paho handles reconnects afterwards).

        Only ConnectError (unreachable, refused, no CONNACK) is transient and retried with backoff;
        anything else (e.g. "can't start new thread" from paho's loop_start) escapes to `_guarded`,
        which declares the agent fatal: a process that stays up but never connects is invisible to
        its supervisor.
        """
        delay = 1.0
        while not self._stop.is_set():
            try:
                self.link.start(timeout=10)
                return
            except ConnectError as exc:
                self.last_error = str(exc)
                if exc.refused_credentials:
                    _LOGGER.error("broker_refused_credentials broker=%s reason=%s: not retrying",
                                  redact_url(self.config.broker_url), exc.reason)
                    return
                _LOGGER.warning("broker_unreachable broker=%s error=%s retry_in_s=%.0f",
                                redact_url(self.config.broker_url), exc, delay)
                self._stop.wait(delay)
                delay = min(60.0, delay * 2)

    # -- MQTT plumbing ------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        """paho's thread: route by kind into the worker queue, nothing more."""
        kind = topic.rsplit("/", 1)[-1]
        self._queue.put(_Work(kind, payload))

    def _publish(self, kind: str, payload: bytes, retain: bool = False) -> None:
        try:
            self.link.publish(self.topics.up(self.device_id, kind), payload, qos=1, retain=retain)
        except ConnectError as exc:
            _LOGGER.warning("publish_dropped kind=%s error=%s", kind, exc)

    def _send_acked(self, topic: str, payload: bytes) -> bool:
        """Outbox sender: True only once the broker acknowledged the message."""
        if not self.link.connected:
            return False
        try:
            info = self.link.publish(topic, payload, qos=1)
            info.wait_for_publish(10.0)
            return info.is_published()
        except (ConnectError, RuntimeError, ValueError) as exc:
            _LOGGER.info("outbox_send_failed topic=%s error=%s", topic, exc)
            return False

    def _state(self, status: str) -> DeviceState:
        model = self.active_model if status == "online" else None
        return DeviceState(device_id=self.device_id, status=status,
                           active_model_id=model.model_id if model else None,
                           active_version=model.version if model else None,
                           runtime=self.runtime.to_dict(), agent_version=__version__)

    def publish_state(self) -> None:
        self._publish("state", self._state("online").to_json(), retain=True)

    def _event(self, type_: str, *, deployment_id: str | None = None, reason: str | None = None,
               missing: list[int] | None = None, version: int | None = None, durable: bool = False) -> None:
        event = Event(device_id=self.device_id, type=type_, deployment_id=deployment_id,
                      reason=reason[:EVENT_REASON_MAX_CHARS] if reason else None, missing=missing, version=version)
        _LOGGER.info("event type=%s deployment=%s version=%s reason=%s missing=%s", type_, deployment_id, version,
                     reason, len(missing) if missing is not None else None)
        if durable:
            try:
                self.outbox.put(self.topics.up(self.device_id, "event"), event.to_json())
            except (OSError, ValueError) as exc:
                _LOGGER.error("outbox_put_failed event=%s error=%s: publishing it directly", type_, exc)
                self._publish("event", event.to_json())
            else:
                self.flusher.kick()
        else:
            self._publish("event", event.to_json())

    def _send_report(self, report: Report, payload: bytes | None = None) -> bytes:
        """Queue the report durably; if the outbox cannot take it (full disk), publish it directly."""
        payload = _encode_report(report) if payload is None else payload
        try:
            self.outbox.put(self.topics.up(self.device_id, "report"), payload)
        except (OSError, ValueError) as exc:
            _LOGGER.error("outbox_put_failed deployment=%s error=%s: publishing the report directly",
                          report.deployment_id, exc)
            self._publish("report", payload)
        else:
            self.flusher.kick()
        _LOGGER.info("report_queued deployment=%s load_ok=%s error_kind=%s bytes=%d", report.deployment_id,
                     report.load_ok, report.error_kind, len(payload))
        return payload

    def _resend_report(self, dep: Deployment, why: str) -> None:
        """Publish the pending report again (at-least-once; the server de-duplicates by deployment id)."""
        dep.next_report_resend = time.monotonic() + self.report_resend_s
        if dep.report_payload is None or not self.link.connected:
            return
        _LOGGER.info("report_resent deployment=%s reason=%s", dep.deployment_id, why)
        self._publish("report", dep.report_payload)

    # -- worker -------------------------------------------------------------------------------
    def _work_loop(self) -> None:
        handlers: dict[str, Callable[[Any], None]] = {
            "connected": self._on_connected, "resume": self._on_resume, "manifest": self._on_manifest,
            "chunk": self._on_chunk, "verdict": self._on_verdict, "command": self._on_command,
        }
        while True:
            try:
                item = self._queue.get(timeout=self._next_timeout())
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is not None:
                handler = handlers.get(item.kind)
                if handler is None:
                    _LOGGER.warning("unknown_work kind=%s", item.kind)
                    continue
                try:
                    handler(item.payload)
                except Exception as exc:
                    self.last_error = f"{item.kind}: {type(exc).__name__}: {exc}"
                    _LOGGER.exception("handler_failed kind=%s payload=%r", item.kind, bytes(item.payload or b"")[:120])
            try:
                self._check_deadlines()
            except Exception:
                _LOGGER.exception("deadline_check_failed")

    def _next_timeout(self) -> float:
        dep = self.deployment
        if dep is None:
            return 5.0
        if dep.phase == DOWNLOADING:
            due = dep.last_progress + self.config.chunk_stall_s
            if dep.receiver.staging.unflushed:
                due = min(due, time.monotonic() + dep.receiver.staging.flush_interval_s)
            return max(0.05, min(5.0, due - time.monotonic()))
        if dep.phase == AWAITING_VERDICT:
            due = min(t for t in (dep.verdict_deadline, dep.next_report_resend, time.monotonic() + 5.0)
                      if t is not None)
            return max(0.05, due - time.monotonic())
        return 5.0

    def _check_deadlines(self) -> None:
        dep = self.deployment
        if dep is None:
            return
        now = time.monotonic()
        if dep.phase == DOWNLOADING:
            try:
                dep.receiver.staging.flush_if_due()
            except StoreError as exc:
                self._fail_download(dep, exc)
                return
            if now - dep.last_progress >= self.config.chunk_stall_s:
                dep.last_progress = now
                if self.link.connected:
                    self._event("need_chunks", deployment_id=dep.deployment_id, missing=dep.receiver.missing(),
                                version=dep.manifest.version, reason="stalled")
        elif dep.phase == AWAITING_VERDICT and dep.verdict_deadline is not None and now >= dep.verdict_deadline:
            self._finish(dep, promoted=False, reason=f"no verdict within {self.config.verdict_timeout_s:.0f} s")
        elif dep.phase == AWAITING_VERDICT and dep.next_report_resend is not None and now >= dep.next_report_resend:
            self._resend_report(dep, "no verdict yet")

    def _on_connected(self, _payload: Any) -> None:
        self.publish_state()
        dep = self.deployment
        if dep is not None and dep.phase == DOWNLOADING:
            dep.last_progress = time.monotonic()
            self._event("need_chunks", deployment_id=dep.deployment_id, missing=dep.receiver.missing(),
                        version=dep.manifest.version, reason="reconnected")
        elif dep is not None and dep.phase == AWAITING_VERDICT:
            self._resend_report(dep, "reconnected")
        self.flusher.kick()
        self.ready.set()

    def _on_resume(self, _payload: Any) -> None:
        """After a restart: continue the newest unfinished download (older leftovers are dropped)."""
        finished = set(self.store.finished())
        staged = self.store.staged_deployments()
        for dep_id in staged:
            if dep_id in finished:
                self.store.remove_staging(dep_id)
        pointer = self.store.active()
        if pointer is not None and pointer.current.deployment_id is not None and \
                pointer.current.deployment_id not in finished:
            # Killed between promoting and cleaning up (staging may already be gone): the promotion
            # stands, finish the bookkeeping and tell the server, which would otherwise wait forever.
            dep_id = pointer.current.deployment_id
            self.store.remove_staging(dep_id)
            self.store.mark_finished(dep_id)
            finished.add(dep_id)
            self._event("promoted", deployment_id=dep_id, version=pointer.current.version,
                        reason="promotion completed before a restart", durable=True)
        pending = [d for d in staged if d not in finished]
        for dep_id in pending[:-1]:
            _LOGGER.warning("staging_dropped deployment=%s reason=superseded", dep_id)
            self.store.remove_staging(dep_id)
        if not pending:
            return
        try:
            receiver = Receiver.resume(self.store, pending[-1])
        except (OSError, ValueError, ProtocolError, StoreError) as exc:
            _LOGGER.error("staging_unusable deployment=%s error=%s: dropped", pending[-1], exc)
            self.store.remove_staging(pending[-1])
            return
        self.deployment = Deployment(receiver.manifest, receiver)
        _LOGGER.info("download_resumed deployment=%s missing=%d", receiver.deployment_id, len(receiver.missing()))
        if receiver.complete:
            self._complete(self.deployment)

    # -- deployment steps ---------------------------------------------------------------------
    def _admission(self) -> Admission:
        pointer = self.store.active()
        return Admission(device_id=self.device_id, server_key=self.server_key,
                         active_version=pointer.current.version if pointer else None,
                         quota_bytes=self.config.quota_bytes, free_bytes=self.store.free_bytes(),
                         newest_admitted=self.store.newest_admitted())

    def _on_manifest(self, payload: bytes) -> None:
        try:
            manifest = check_manifest(payload, self._admission())
        except ManifestRejected as exc:
            self._event("manifest_rejected", deployment_id=exc.deployment_id, reason=exc.reason,
                        version=exc.manifest.version if exc.manifest else None)
            return
        dep_id = manifest.deployment_id
        if dep_id in self.store.finished():
            self._event("manifest_rejected", deployment_id=dep_id, reason=f"deployment {dep_id} already finished",
                        version=manifest.version)
            return
        current = self.deployment
        if current is not None and current.deployment_id == dep_id:
            missing = current.receiver.missing() if current.phase == DOWNLOADING else []
            self._event("manifest_accepted", deployment_id=dep_id, missing=missing, version=manifest.version,
                        reason=f"already {current.phase}")
            return
        if current is not None:
            _LOGGER.warning("deployment_superseded old=%s new=%s", current.deployment_id, dep_id)
            self._finish(current, promoted=False, reason=f"superseded by {dep_id}")
        try:
            self.store.note_admitted(manifest.created)
            receiver = Receiver.start(self.store, manifest)
        except StoreError as exc:
            self._event("manifest_rejected", deployment_id=dep_id, reason=f"{exc.kind}: {exc}",
                        version=manifest.version)
            return
        self.deployment = Deployment(manifest, receiver)
        self._event("manifest_accepted", deployment_id=dep_id, missing=receiver.missing(), version=manifest.version)
        if receiver.complete:
            self._complete(self.deployment)

    def _on_chunk(self, payload: bytes) -> None:
        dep = self.deployment
        try:
            chunk = chunking.decode_chunk(payload, DEFAULT_LIMITS.max_chunk_bytes)
        except ProtocolError as exc:
            self._event("chunk_rejected", deployment_id=dep.deployment_id if dep else None, reason=str(exc))
            return  # its index is not trustworthy: the stall timer re-requests whatever is missing
        if dep is None or dep.phase != DOWNLOADING or chunk.deployment_id != dep.deployment_id:
            _LOGGER.debug("chunk_ignored deployment=%s index=%d", chunk.deployment_id, chunk.index)
            return
        try:
            fresh = dep.receiver.accept(chunk)
        except ChunkRejected as exc:
            self._event("chunk_rejected", deployment_id=dep.deployment_id, reason=exc.reason)
            if exc.index is not None:
                self._event("need_chunks", deployment_id=dep.deployment_id, missing=[exc.index],
                            version=dep.manifest.version, reason="chunk rejected")
            return
        except StoreError as exc:
            self._fail_download(dep, exc)
            return
        if fresh:
            dep.last_progress = time.monotonic()
            if dep.receiver.ack_due():  # the server's window moves on (server/window.py)
                self._event("need_chunks", deployment_id=dep.deployment_id, missing=dep.receiver.missing(),
                            version=dep.manifest.version, reason=PROGRESS_REASON)
        if dep.receiver.complete:
            self._complete(dep)

    def _fail_download(self, dep: Deployment, exc: StoreError) -> None:
        m = dep.manifest
        self._send_report(Report(device_id=self.device_id, deployment_id=m.deployment_id, model_id=m.model_id,
                                 version=m.version, load_ok=False,
                                 error_kind="disk_full" if exc.kind == "disk_full" else "verify_error",
                                 error=str(exc), mode=self.config.measure_mode, runtime=self.runtime.to_dict()))
        self._finish(dep, promoted=False, reason=str(exc))

    def _complete(self, dep: Deployment) -> None:
        """All chunks are here: evaluate the candidate and queue its report."""
        self._event("download_complete", deployment_id=dep.deployment_id, version=dep.manifest.version)
        dep.phase = MEASURING
        self._event("measuring", deployment_id=dep.deployment_id, version=dep.manifest.version)
        settings = EvalSettings(device_id=self.device_id, threads=self.config.threads,
                                mode=self.config.measure_mode, max_unpacked_bytes=DEFAULT_LIMITS.max_unpacked_bytes,
                                runtime=self.config.runtime, measure_config=self._measure_config,
                                power_source=self._power_source,
                                paired_pairs=20 if self.config.measure_mode == "quick" else 100)
        result: Evaluation | None = None
        try:
            result = evaluate_candidate(dep, self.store, settings, measure=self._measure, paired=self._paired,
                                        incumbent=self.active_model, runtime_info=self.runtime)
            payload = _encode_report(result.report)
        except Exception as exc:  # evaluate_candidate reports model failures itself; this is an agent bug
            _LOGGER.exception("evaluation_failed deployment=%s", dep.deployment_id)
            self._drop_candidate(dep, result)
            result = failed_evaluation(dep, settings, exc, "measure_error" if result else "load_error", self.runtime,
                                       prefix="agent error while evaluating: ")
            payload = _encode_report(result.report)
        self._send_report(result.report, payload)
        if result.failed_event is not None:
            self.last_error = result.report.error
            self._event(result.failed_event, deployment_id=dep.deployment_id, version=dep.manifest.version,
                        reason=f"{result.report.error_kind}: {result.report.error}")
            self._finish(dep, promoted=False, reason=f"{result.report.error_kind}: {result.report.error}")
            return
        dep.candidate, dep.loaded = result.candidate, result.loaded
        dep.phase = AWAITING_VERDICT
        dep.verdict_deadline = time.monotonic() + self.config.verdict_timeout_s
        dep.report_payload = payload
        dep.next_report_resend = time.monotonic() + self.report_resend_s

    def _drop_candidate(self, dep: Deployment, result: Evaluation | None) -> None:
        """Close and delete a candidate whose evaluation broke down (never the active or previous model)."""
        try:
            if result is not None and result.loaded is not None:
                result.loaded.close()
            candidate = result.candidate if result else None
            if candidate is None:
                held = self.store.slot_contents(self.store.inactive_slot())
                candidate = held if held is not None and held.deployment_id == dep.deployment_id else None
            if candidate is not None:
                self.store.discard_candidate(candidate)
        except Exception:  # cleanup only: the report and the incumbent matter more
            _LOGGER.exception("discard_failed deployment=%s", dep.deployment_id)

    def _on_verdict(self, payload: bytes) -> None:
        dep = self.deployment
        obj = None  # decoded once: a payload refused for size or JSON is never parsed again
        try:
            obj = decode_object(payload, "verdict", DEFAULT_LIMITS.max_json_bytes)
            verdict = Verdict.from_dict(obj)
            verdict.verify(self.server_key)
        except SignatureError as exc:
            self._event("verdict_rejected", deployment_id=peek_deployment_id(obj), reason=f"bad signature: {exc}")
            return
        except ProtocolError as exc:
            self._event("verdict_rejected", deployment_id=peek_deployment_id(obj), reason=f"malformed: {exc}")
            return
        problem = None
        if verdict.device_id != self.device_id:
            problem = f"verdict is for device {verdict.device_id!r}"
        elif dep is None or dep.deployment_id != verdict.deployment_id:
            if verdict.deployment_id in self.store.finished():
                _LOGGER.info("verdict_late deployment=%s verdict=%s: already finished", verdict.deployment_id,
                             verdict.verdict)
                return
            problem = (f"no deployment {verdict.deployment_id} in progress "
                       f"(current: {dep.deployment_id if dep else None})")
        elif (verdict.model_id, verdict.version) != (dep.manifest.model_id, dep.manifest.version):
            problem = (f"verdict names {verdict.model_id} v{verdict.version}, deployment has "
                       f"{dep.manifest.model_id} v{dep.manifest.version}")
        elif dep.phase != AWAITING_VERDICT:
            problem = f"deployment {dep.deployment_id} is {dep.phase}, not awaiting a verdict"
        if problem:
            self._event("verdict_rejected", deployment_id=verdict.deployment_id, reason=problem,
                        version=verdict.version)
            return
        assert dep is not None
        if verdict.passed:
            self._finish(dep, promoted=True, reason=verdict.reason or "PASS")
        else:
            self._finish(dep, promoted=False, reason=f"verdict FAIL: {verdict.reason}")

    def _finish(self, dep: Deployment, *, promoted: bool, reason: str) -> None:
        """End a deployment: promote + swap serving, or discard the candidate; tell the server."""
        if promoted and dep.candidate is not None and dep.loaded is not None:
            try:
                self.store.promote(dep.candidate)
            except StoreError as exc:
                _LOGGER.error("promote_failed deployment=%s error=%s", dep.deployment_id, exc)
                self.last_error = str(exc)
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
        # staging (redone on restart) or an unfinished active pointer (_on_resume reports it).
        try:
            self._event("promoted" if promoted else "rolled_back", deployment_id=dep.deployment_id,
                        version=dep.manifest.version, reason=reason, durable=True)
            self.store.mark_finished(dep.deployment_id)
            dep.receiver.close()
            self.store.remove_staging(dep.deployment_id)
        except (StoreError, OSError) as exc:
            # A full disk must not leave the deployment stuck in memory; a restart redoes the staging
            # and the server de-duplicates a second report by deployment id.
            self.last_error = f"finishing {dep.deployment_id}: {exc}"
            _LOGGER.error("finish_bookkeeping_failed deployment=%s error=%s", dep.deployment_id, exc)
        finally:
            if self.deployment is dep:
                self.deployment = None
        self.publish_state()
        _LOGGER.info("deployment_finished deployment=%s promoted=%s reason=%s active_version=%s",
                     dep.deployment_id, promoted, reason, self.active_model.version if self.active_model else None)

    def _on_command(self, payload: bytes) -> None:
        try:
            command = Command.from_json(payload)
            command.verify(self.server_key)
            if command.device_id != self.device_id:
                raise ProtocolError(f"command is for device {command.device_id!r}")
        except ProtocolError as exc:
            self._event("command_rejected", reason=str(exc))
            return
        _LOGGER.info("command name=%s deployment=%s", command.command, command.deployment_id)
        if command.command == "report_state":
            self.publish_state()
        elif command.command == "cancel":
            dep = self.deployment
            if dep is None or (command.deployment_id and command.deployment_id != dep.deployment_id):
                self._event("command_rejected", deployment_id=command.deployment_id,
                            reason=f"nothing to cancel (current: {dep.deployment_id if dep else None})")
                return
            self._finish(dep, promoted=False, reason="cancelled by the server")
        elif command.command == "rollback":
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
            model = self._open_slot(pointer.previous)
            self.store.rollback()
        except (StoreError, ModelLoadError) as exc:
            self._event("command_rejected", reason=f"rollback impossible: {exc}")
            return
        self._swap_in(model)
        self._event("rolled_back", version=model.version, reason="rollback command", durable=True)
        self.publish_state()

    # -- heartbeat ----------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            if not self.link.connected:
                continue
            model = self.active_model
            beat = Heartbeat(device_id=self.device_id, uptime_s=round(time.monotonic() - self.started_at, 3),
                             active_version=model.version if model else None, last_error=self.last_error)
            self._publish("heartbeat", beat.to_json())


def _finite(obj: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None: an unavailable figure, never a made-up one."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays
        return _finite(obj.tolist())
    return obj


def _encode_report(report: Report) -> bytes:
    return json.dumps(_finite(report.to_dict()), separators=(",", ":"), allow_nan=False).encode()
