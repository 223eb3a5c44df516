"""The device's link to the server: connection, durable outbox, and the report awaiting a verdict.

Owns the MQTT session (paho's thread plus a connect thread for the first connection), the outbox
flusher thread, and the one report held while a verdict is awaited. Everything it sends goes up
on this device's own topics. Nothing here decides about a deployment: the controller calls
`event`, `send_report` and `hold_report`; the worker thread calls `resend_if_due`.

Why resend a report: mosquitto 2.0 does not restore `$share` subscriptions after a restart, so a
report sent before the server re-subscribed is dropped by the broker even though it acknowledged
it. While awaiting a verdict the report is published again on every reconnect and after
`report_resend_s`, then after ever longer waits (doubling, up to `REPORT_RESEND_MAX_FACTOR` times
it, each +-20 % jitter): a slow server facing thousands of devices is not buried under their
retries. The server de-duplicates by deployment id and answers a repeat with its verdict.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import AgentConfig
from agent.deployment import encode_report
from agent.health import Health
from agent.outbox import Outbox, OutboxFlusher
from protocol.backoff import Backoff
from protocol.errors import ProtocolError
from protocol.messages import Event, Report
from protocol.mqtt import ConnectError, MqttLink
from protocol.redact import redact_url
from protocol.topics import Topics

_LOGGER = logging.getLogger(__name__)

REPORT_RESEND_MAX_FACTOR = 8  # the longest wait between re-sends, in units of `report_resend_s`

EVENT_REASON_MAX_CHARS = 1000  # an event's reason text is cut to this (error texts can quote payloads)
MessageHandler = Callable[[str, bytes], None]


class DeviceLink:
    """Connection, outbox and report resends of one device. `open()` does the I/O, `start()` connects."""

    def __init__(self, config: AgentConfig, health: Health, report_resend_s: float) -> None:
        if not report_resend_s > 0:
            raise ValueError(f"report_resend_s must be > 0, got {report_resend_s}")
        self.config = config
        self.device_id = config.device_id
        self.topics: Topics = config.topics
        self.report_resend_s = report_resend_s
        self._resend_backoff = Backoff(report_resend_s, REPORT_RESEND_MAX_FACTOR * report_resend_s, jitter=0.2)
        self._health = health
        self._stopping = threading.Event()
        self._connect_thread: threading.Thread | None = None
        self._mqtt: MqttLink | None = None
        self._outbox: Outbox | None = None
        self._flusher: OutboxFlusher | None = None
        # The report awaiting a verdict: touched by the worker thread only.
        self._held: tuple[str, bytes] | None = None
        self._next_resend: float | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def open(self, offline_state: bytes) -> None:
        """Create the outbox folder and the MQTT session (`offline_state` is its Last Will)."""
        config = self.config
        self._outbox = Outbox(Path(config.state_dir) / "outbox", config.outbox_max_bytes)
        self._mqtt = MqttLink(
            config.broker_url, client_id=f"agent-{self.device_id}", username=config.username,
            password=config.password,
            tls_ca=str(config.tls_ca) if config.tls_ca else None,
            tls_cert=str(config.tls_cert) if config.tls_cert else None,
            tls_key=str(config.tls_key) if config.tls_key else None,
            clean_start=False,
            will=(self.topics.up(self.device_id, "state"), offline_state, 1, True),
            protocol=config.mqtt_protocol,
        )
        self._flusher = OutboxFlusher(self._outbox, self._send_acked, lambda: self.mqtt.connected)

    @property
    def mqtt(self) -> MqttLink:
        if self._mqtt is None:
            raise RuntimeError("the device link is not open: call open() first")
        return self._mqtt

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            raise RuntimeError("the device link is not open: call open() first")
        return self._outbox

    @property
    def connected(self) -> bool:
        return self._mqtt is not None and self._mqtt.connected

    def start(self, on_message: MessageHandler, on_connected: Callable[[], None]) -> None:
        """Route down messages to `on_message` (paho's thread), then connect in the background."""
        self.mqtt.subscribe(self.topics.device_down_filter(self.device_id), on_message, qos=1)
        self.mqtt.add_connect_listener(on_connected)
        assert self._flusher is not None
        self._flusher.start()
        thread = threading.Thread(target=self._health.guarded("connect", self._connect_loop, self._stopping),
                                  name="edgeguide-connect", daemon=True)
        thread.start()
        self._connect_thread = thread

    def stop(self, offline_state: bytes, timeout: float) -> None:
        """Stop retrying, drain nothing more, say we go offline (retained), disconnect."""
        self._stopping.set()
        if self._connect_thread is not None:
            self._connect_thread.join(timeout)
        if self._flusher is not None:
            self._flusher.stop()
        if self._mqtt is None:
            return
        if self._mqtt.connected:
            try:
                self._mqtt.publish(self.topics.up(self.device_id, "state"), offline_state, qos=1, retain=True).wait(3.0)
            except ConnectError as exc:
                _LOGGER.warning("offline_state_not_sent error=%s", exc)
        self._mqtt.stop()

    def _connect_loop(self) -> None:
        """Keep trying the first connection (paho handles reconnects afterwards).

        Only ConnectError (unreachable, refused, no CONNACK) is transient and retried with backoff;
        anything else (e.g. "can't start new thread" from paho's loop_start) escapes to
        `Health.guarded`, which declares the agent fatal: a process that stays up but never
        connects is invisible to its supervisor.
        """
        retries = Backoff(1.0, 60.0)
        while not self._stopping.is_set():
            try:
                self.mqtt.start(timeout=10)
                return
            except ConnectError as exc:
                self._health.note_error(str(exc))
                if exc.refused_credentials:
                    _LOGGER.error("broker_refused_credentials broker=%s reason=%s: not retrying",
                                  redact_url(self.config.broker_url), exc.reason)
                    return
                delay = retries.next()
                _LOGGER.warning("broker_unreachable broker=%s error=%s retry_in_s=%.0f",
                                redact_url(self.config.broker_url), exc, delay)
                self._stopping.wait(delay)

    # -- sending ----------------------------------------------------------------------------------
    def down_kind(self, topic: str) -> str | None:
        """The kind of a message received on this device's down topics (None: not one of them)."""
        try:
            ref = self.topics.parse(topic)
        except ProtocolError as exc:
            _LOGGER.warning("message_ignored topic=%r error=%s", topic[:200], exc)
            return None
        if ref.direction != "down" or ref.device_id != self.device_id:
            _LOGGER.warning("message_ignored topic=%r: not this device's down topic", topic[:200])
            return None
        return ref.kind

    def publish(self, kind: str, payload: bytes, retain: bool = False) -> None:
        """Fire and forget (QoS 1, resent by paho after a reconnect); a stopped link only logs."""
        try:
            self.mqtt.publish(self.topics.up(self.device_id, kind), payload, qos=1, retain=retain)
        except ConnectError as exc:
            _LOGGER.warning("publish_dropped kind=%s error=%s", kind, exc)

    def _send_acked(self, topic: str, payload: bytes) -> bool:
        """Outbox sender: True only once the broker acknowledged the message."""
        if not self.connected:
            return False
        try:
            return self.mqtt.publish(topic, payload, qos=1).wait(10.0)
        except ConnectError as exc:
            _LOGGER.info("outbox_send_failed topic=%s error=%s", topic, exc)
            return False

    def _durable(self, kind: str, payload: bytes, what: str) -> None:
        """Queue on disk and kick the flusher; if the outbox cannot take it (full disk), publish now."""
        try:
            self.outbox.put(self.topics.up(self.device_id, kind), payload)
        except (OSError, ValueError) as exc:
            _LOGGER.error("outbox_put_failed %s error=%s: publishing it directly", what, exc)
            self.publish(kind, payload)
        else:
            self.kick_outbox()

    def kick_outbox(self) -> None:
        if self._flusher is not None:
            self._flusher.kick()

    def event(self, type_: str, *, deployment_id: str | None = None, reason: str | None = None,
              missing: list[int] | None = None, version: int | None = None, durable: bool = False) -> None:
        """Tell the server about a deployment step; `durable` ones go through the outbox."""
        event = Event(device_id=self.device_id, type=type_, deployment_id=deployment_id,
                      reason=reason[:EVENT_REASON_MAX_CHARS] if reason else None, missing=missing, version=version)
        _LOGGER.info("event type=%s deployment=%s version=%s reason=%s missing=%s", type_, deployment_id, version,
                     reason, len(missing) if missing is not None else None)
        if durable:
            self._durable("event", event.to_json(), f"event={type_}")
        else:
            self.publish("event", event.to_json())

    def send_report(self, report: Report, payload: bytes | None = None) -> bytes:
        """Queue the report durably (see `_durable`); returns the bytes sent."""
        payload = encode_report(report) if payload is None else payload
        self._durable("report", payload, f"deployment={report.deployment_id}")
        _LOGGER.info("report_queued deployment=%s load_ok=%s error_kind=%s bytes=%d", report.deployment_id,
                     report.load_ok, report.error_kind, len(payload))
        return payload

    # -- the report awaiting a verdict (worker thread) ----------------------------------------------
    def hold_report(self, deployment_id: str, payload: bytes) -> None:
        """Keep re-publishing `payload` until `drop_report` (the verdict came or the deployment ended)."""
        self._held = (deployment_id, payload)
        self._resend_backoff.reset()
        self._next_resend = time.monotonic() + self._resend_backoff.next()

    def drop_report(self) -> None:
        self._held = None
        self._next_resend = None

    def resend_report(self, why: str) -> None:
        """Publish the held report again (at-least-once; the server de-duplicates by deployment id)."""
        if self._held is None:
            return
        self._next_resend = time.monotonic() + self._resend_backoff.next()
        if not self.connected:
            return
        deployment_id, payload = self._held
        _LOGGER.info("report_resent deployment=%s reason=%s", deployment_id, why)
        self.publish("report", payload)

    def resend_due_in(self) -> float | None:
        """Seconds until the held report is due again (None: none held)."""
        return None if self._next_resend is None else self._next_resend - time.monotonic()

    def resend_if_due(self) -> None:
        if self._next_resend is not None and time.monotonic() >= self._next_resend:
            self.resend_report("no verdict yet")
