"""The device agent process: wires the parts that each own one state, and starts and stops them.

    DeviceLink            agent/link.py        MQTT session, outbox, the report awaiting a verdict
    DeploymentController  agent/controller.py  model store, active model, the deployment and its phase
    HeartbeatLoop         agent/heartbeat.py   liveness, from the controller's published snapshot
    Health                agent/health.py      last and fatal error (the one state behind a lock)

Threads and why: paho's network thread only submits jobs to the worker (a handler must never
block the MQTT loop); the worker thread (protocol.worker) runs every controller method, so the
store and the deployment have one owner; heartbeat, outbox flusher and the first-connect loop have
their own threads so a long measurement never silences liveness or delays a queued report. The
active model keeps serving from agent.serving (its own HTTP threads) while all of this happens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.config import AgentConfig
from agent.controller import DeploymentController, Measuring
from agent.deployment import Deployment, MeasureFn, PairedFn
from agent.health import Health
from agent.heartbeat import HeartbeatLoop
from agent.link import EVENT_REASON_MAX_CHARS, DeviceLink
from agent.model import LoadedModel
from agent.outbox import Outbox
from agent.runtime import RuntimeInfo
from agent.store import ModelStore
from protocol.mqtt import MqttLink
from protocol.redact import redact_url
from protocol.states import DeviceStatus
from protocol.worker import Worker

__all__ = ["EVENT_REASON_MAX_CHARS", "Agent"]

_LOGGER = logging.getLogger(__name__)


class Agent:
    """One device's agent. `start()` returns at once; `stop()` publishes offline state and shuts down.

    The constructor does no I/O; `start()` reads the pinned key, opens the state directory, loads
    the active model and connects. `measure`, `paired`, `measure_config` and `power_source`
    default to agent.measure's real implementations; tests pass a shorter MeasureConfig, never a
    fake measurement. `report_resend_s` is how often an unanswered report is published again
    (default: the config's). `fatal_error` is set when the agent can no longer work (its connect
    loop or worker died); the CLI then exits non-zero so the supervisor restarts the process.
    """

    def __init__(self, config: AgentConfig, *, measure: MeasureFn | None = None, paired: PairedFn | None = None,
                 measure_config: Any = None, power_source: Any = "detect", service: Any = None,
                 report_resend_s: float | None = None) -> None:
        self.config = config
        self.device_id = config.device_id
        self.topics = config.topics
        self.report_resend_s = config.report_resend_s if report_resend_s is None else report_resend_s
        if measure is None or paired is None:
            from agent.measure import measure_model, paired_compare
            measure = measure or measure_model
            paired = paired or paired_compare
        if service is None:
            from agent.serving import RecommendService
            service = RecommendService()
        self.service = service
        self.health = Health(self.device_id)
        self.device_link = DeviceLink(config, self.health, self.report_resend_s)
        self.controller = DeploymentController(config, self.device_link, self.health, service,
                                               Measuring(measure, paired, measure_config, power_source))
        self.started_at = time.monotonic()
        self.heartbeat = HeartbeatLoop(self.device_link, self.health, lambda: self.controller.snapshot,
                                       config.heartbeat_s, self.started_at)
        self.worker = Worker("edgeguide-worker", on_error=self._job_failed, on_crash=self._worker_crashed)
        self.worker.add_deadline_check(self.controller.check_deadlines, self.controller.next_check_in)
        self.http: Any = None
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._stopping = threading.Event()
        self._handlers: dict[str, Callable[[bytes], None]] = {
            "manifest": self.controller.on_manifest, "chunk": self.controller.on_chunk,
            "verdict": self.controller.on_verdict, "command": self.controller.on_command,
        }

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Open the state and the active model, start serving, resume staging, then connect in the background."""
        _LOGGER.info("agent_starting device=%s broker=%s state_dir=%s measure_mode=%s", self.device_id,
                     redact_url(self.config.broker_url), self.config.state_dir, self.config.measure_mode)
        self.controller.open()
        _LOGGER.info("agent_runtime device=%s runtime=%s", self.device_id, self.controller.runtime)
        self.device_link.open(self._offline_state())
        self.controller.start_serving()
        if self.config.http_port is not None:
            from agent.serving.http import start_http_server
            self.http = start_http_server(self.service, self.config.http_host, self.config.http_port,
                                          allowed_hosts=self.config.allowed_hosts)
        self.worker.submit(self.controller.on_resume, "resume")
        self.worker.start()
        self.device_link.start(self._on_message, self._connected_listener)
        self.heartbeat.start()

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop: finish the current step, publish offline state, stop HTTP and MQTT.

        If the worker is still busy after `timeout` (a measurement), the deployment and the models
        it owns are left alone: touching them under a running job could corrupt them.
        """
        if self.stopped.is_set():
            return
        _LOGGER.info("agent_stopping device=%s", self.device_id)
        self._stopping.set()
        if self.worker.alive:
            self.worker.submit(self.controller.close, "close")
        ended = self.worker.stop(timeout)
        if not ended:
            _LOGGER.warning("worker_still_busy device=%s after_s=%.0f: its deployment is left as it is",
                            self.device_id, timeout)
        self.heartbeat.stop(timeout)
        try:
            offline = self._offline_state()
        except RuntimeError:  # never opened: nothing was announced either
            offline = None
        if offline is not None:
            self.device_link.stop(offline, timeout)
        if self.http is not None:
            self.http.stop()
        if ended and not self.worker.alive and self.controller.active_model is not None:
            self.controller.close()  # the worker never ran (start failed half-way): release here
        self.stopped.set()
        _LOGGER.info("agent_stopped device=%s", self.device_id)

    def wait(self, timeout: float | None = None) -> bool:
        return self.stopped.wait(timeout)

    # -- what callers read ------------------------------------------------------------------------
    @property
    def link(self) -> MqttLink:
        return self.device_link.mqtt

    @property
    def outbox(self) -> Outbox:
        return self.device_link.outbox

    @property
    def store(self) -> ModelStore:
        return self.controller.store

    @property
    def runtime(self) -> RuntimeInfo:
        return self.controller.runtime

    @property
    def active_model(self) -> LoadedModel | None:
        return self.controller.active_model

    @property
    def deployment(self) -> Deployment | None:
        return self.controller.deployment

    @property
    def last_error(self) -> str | None:
        return self.health.last_error

    @property
    def fatal_error(self) -> str | None:
        return self.health.fatal_error

    def declare_fatal(self, reason: str) -> None:
        """Record an error the process cannot recover from; the CLI exits non-zero on it."""
        self.health.declare_fatal(reason)

    def publish_state(self) -> None:
        """Publish the retained online state (runs on the worker, in order with everything else)."""
        self.worker.submit(self.controller.publish_state, "publish_state")

    # -- wiring -----------------------------------------------------------------------------------
    def _offline_state(self) -> bytes:
        return self.controller.state(DeviceStatus.OFFLINE).to_json()

    def _on_message(self, topic: str, payload: bytes) -> None:
        """paho's thread: route by kind onto the worker, nothing more."""
        kind = self.device_link.down_kind(topic)
        if kind is not None:
            self.worker.submit(lambda: self._dispatch(kind, payload), kind)

    def _dispatch(self, kind: str, payload: bytes) -> None:
        try:
            self._handlers[kind](payload)
        except Exception:
            _LOGGER.error("handler_failed kind=%s payload=%r", kind, bytes(payload or b"")[:120])
            raise

    def _connected_listener(self) -> None:
        """paho's thread, after every (re)connect: the reaction runs on the worker."""
        self.worker.submit(self._on_connected, "connected")

    def _on_connected(self) -> None:
        self.controller.on_connected()
        self.ready.set()

    def _job_failed(self, label: str, exc: Exception) -> None:
        self.health.note_error(f"{label}: {type(exc).__name__}: {exc}")

    def _worker_crashed(self, exc: Exception) -> None:
        if self._stopping.is_set():
            _LOGGER.warning("thread_failed_while_stopping thread=worker error=%r", exc)
            return
        self.health.declare_fatal(f"worker thread died: {type(exc).__name__}: {exc}")
