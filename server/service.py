"""The running server: one MQTT link, one worker thread, the registry and the deployer.

MQTT callbacks only enqueue; a single worker thread decodes, records and acts, so gating never
stalls paho's network loop and the registry sees one writer per process (report files are drawn
on the deployer's own background thread). Anything malformed is logged with its topic and a
payload preview, recorded in the event log, and dropped: a device can never crash the server.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from protocol.errors import ProtocolError
from protocol.messages import DeviceState, Event, Heartbeat, Report
from protocol.mqtt import MqttLink
from protocol.redact import redact_url
from protocol.topics import Topics
from server import keys
from server.db import DatabaseUnavailable
from server.deployer import ChunkTransform, Deployer, DeployerConfig
from server.ingest import DeviceRateLimiter, IngestLimits, bounded
from server.policy import Policy, load_policy
from server.registry import DeploymentRecord, Registry
from server.rollout import RolloutManager

_LOGGER = logging.getLogger(__name__)

_DECODERS = {"state": DeviceState, "heartbeat": Heartbeat, "event": Event, "report": Report}


# How often a running server stamps its row in the registry (`edgeguide-server deploy --wait` reads it).
SERVER_ALIVE_S = 5.0


@dataclass(frozen=True)
class ServerConfig:
    """How the server reaches its broker and paces its periodic work."""

    broker_url: str = "mqtt://127.0.0.1:1883"
    client_id: str = "edgeguide-server"
    clean_start: bool = False  # True only for one-off processes: a persistent session would queue for nobody
    topic_prefix: str = "edgeguide"
    protocol: str = "auto"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    shared_subscription: bool = True  # used only on MQTT 5 brokers
    tick_s: float = 1.0


class EdgeGuideServer:
    """Registry + deployer + MQTT ingestion; `start()`, `deploy()`, `wait()`, `stop()`."""

    def __init__(self, registry: Registry, config: ServerConfig | None = None, *, policy: Policy | None = None,
                 deployer_config: DeployerConfig | None = None, chunk_transform: ChunkTransform | None = None,
                 ingest_limits: IngestLimits | None = None) -> None:
        self.registry = registry
        self.ingest_limits = ingest_limits or IngestLimits()
        self.limiter = DeviceRateLimiter(self.ingest_limits)
        self.rate_limited = 0
        self.config = config or ServerConfig()
        self.topics = Topics(prefix=self.config.topic_prefix)
        self.key = keys.server_key(registry.data_dir)
        self.link = MqttLink(self.config.broker_url, self.config.client_id, username=self.config.username,
                             password=self.config.password, tls_ca=self.config.tls_ca, tls_cert=self.config.tls_cert,
                             tls_key=self.config.tls_key, protocol=self.config.protocol,
                             clean_start=self.config.clean_start)
        self.deployer = Deployer(registry, self.key, self._publish, topics=self.topics,
                                 policy=policy or load_policy(), config=deployer_config,
                                 chunk_transform=chunk_transform)
        self.rollouts = RolloutManager(registry, self.deployer)
        # Work for the single worker thread: a received message, a callable, or None to stop.
        self._inbox: queue.Queue[tuple[str, bytes] | Callable[[], object] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._subscribed = False
        self.malformed = 0
        self.reports_ingested = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> EdgeGuideServer:
        """Connect, subscribe to every device's up topics, resume recorded deployments."""
        # Subscribing from the connect listener runs before paho dispatches any message queued in our
        # persistent session, so nothing that arrived while we were down is dropped unrouted.
        self.link.add_connect_listener(self._ensure_subscribed)
        self.link.start(timeout=timeout)
        self._stopping.clear()
        self._worker = threading.Thread(target=self._run, name="edgeguide-server-worker", daemon=True)
        self._worker.start()
        self._call(self.deployer.resume)
        _LOGGER.info("server up: broker %s, prefix %r, data dir %s", redact_url(self.config.broker_url),
                     self.topics.prefix,
                     self.registry.data_dir)
        return self

    def stop(self) -> None:
        """Stop the worker (after it finishes the current message) and disconnect."""
        self._stopping.set()
        self._inbox.put(None)
        if self._worker is not None:
            self._worker.join(timeout=30)
            self._worker = None
        self.deployer.close()
        self.link.stop()

    def __enter__(self) -> EdgeGuideServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ensure_subscribed(self) -> None:
        if self._subscribed:
            return
        self._subscribed = True
        if self.link.is_v5 and self.config.shared_subscription:
            topic_filter = self.topics.shared_up_filter()
        else:
            topic_filter = self.topics.all_up_filter()
        self.link.subscribe(topic_filter, self._enqueue, qos=1)
        _LOGGER.info("subscribed to %s", topic_filter)

    def _publish(self, topic: str, payload: bytes) -> None:
        self.link.publish(topic, payload, qos=1)

    def _enqueue(self, topic: str, payload: bytes) -> None:
        # Rate-limited here, on paho's thread, so a flood never even grows the inbox.
        parts = topic.split("/")
        device = parts[-3] if len(parts) >= 3 else ""
        if not self.limiter.allow(device):
            self.rate_limited += 1
            dropped = self.limiter.take_notice(device)
            if dropped:
                self._call(lambda d=device[:64], n=dropped: self._record_rate_limited(d, n))
            return
        self._inbox.put((topic, payload))

    def _record_rate_limited(self, device: str, dropped: int) -> None:
        lim = self.ingest_limits
        _LOGGER.warning("device %r exceeds %d messages at once / %g per second: dropped %d message(s)", device,
                        lim.burst, lim.per_second, dropped)
        self.registry.log_event("rate_limited", device_id=device or None,
                                detail=f"dropped {dropped} message(s) beyond {lim.burst} at once / "
                                       f"{lim.per_second:g} per second")

    def _prune(self) -> None:
        lim = self.ingest_limits
        deleted = self.registry.prune_events(max_per_device=lim.max_events_per_device, max_age_s=lim.max_event_age_s)
        if deleted:
            _LOGGER.info("pruned %d event rows (keeping %d per device, %g days)", deleted, lim.max_events_per_device,
                         lim.max_event_age_s / 86400)

    # ---- worker ------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the worker thread, in order with the messages (one writer, no races)."""
        self._inbox.put(fn)

    def _run(self) -> None:
        next_tick = time.monotonic()
        next_prune = next_tick
        next_alive = next_tick
        while not self._stopping.is_set():
            try:
                item = self._inbox.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                item = ()
            if item is None:
                break
            if callable(item):
                self._guarded(getattr(item, "__name__", "call"), b"", item)
            elif item:
                topic, payload = item
                self._guarded(topic, payload, lambda t=topic, p=payload: self._handle_until_stored(t, p))
            if time.monotonic() >= next_tick:
                if time.monotonic() >= next_alive:
                    self._guarded("alive", b"", lambda: self.registry.server_alive(self.config.client_id))
                    next_alive = time.monotonic() + SERVER_ALIVE_S
                self._guarded("tick", b"", self.deployer.tick)
                self._guarded("rollout tick", b"", self.rollouts.tick)
                next_tick = time.monotonic() + self.config.tick_s
                if next_tick >= next_prune:
                    self._guarded("prune", b"", self._prune)
                    next_prune = time.monotonic() + self.ingest_limits.prune_interval_s

    def _handle_until_stored(self, topic: str, payload: bytes) -> None:
        """handle(), retried while the registry database is unreachable (a restart, a failover).

        The broker already counts the message as delivered: dropping it would lose a report or an
        event. Handling is idempotent per message (a repeated report re-sends the recorded verdict).
        One transaction per message: its writes land together (one commit, one WAL flush on
        PostgreSQL instead of one per statement) or not at all, and then the retry redoes them.
        """
        delay = 0.2
        while True:
            try:
                with self.registry.db.transaction():
                    self.handle(topic, payload)
                return
            except DatabaseUnavailable as exc:
                if self._stopping.is_set():
                    raise
                _LOGGER.warning("registry unavailable while handling %r, retrying in %.1f s: %s", topic, delay, exc)
                self._stopping.wait(delay)
                delay = min(5.0, delay * 2)

    def _guarded(self, topic: str, payload: bytes, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # a bug or a bad message must not stop the worker
            _LOGGER.exception("error handling %r (payload %r)", topic, payload[:200])
            try:
                self.registry.log_event("handler_error", detail=f"{topic}: {type(exc).__name__}: {exc}")
            except Exception:
                _LOGGER.exception("could not record the handler error")

    def handle(self, topic: str, payload: bytes) -> None:
        """Decode and dispatch one up message (also callable directly, e.g. from tests)."""
        try:
            ref = self.topics.parse(topic)
            if ref.direction != "up":
                raise ProtocolError(f"topic {topic!r} is not an up topic")
            message = _DECODERS[ref.kind].from_json(payload)
            if message.device_id != ref.device_id:
                raise ProtocolError(f"{ref.kind} on {topic!r} claims device_id {message.device_id!r}")
            message = bounded(message, self.ingest_limits)
        except ProtocolError as exc:
            self.malformed += 1
            _LOGGER.warning("malformed message on %r (%s); payload %r", topic, exc, payload[:200])
            device = topic.split("/")[-3] if topic.count("/") >= 3 else None
            self.registry.log_event("malformed", device_id=device if device and len(device) <= 64 else None,
                                    detail=f"{topic[:200]}: {exc}")
            return
        if isinstance(message, DeviceState):
            before = self.registry.find_device(message.device_id)
            if before is None or (before.status, before.active_model_id, before.active_version) != (
                    message.status, message.active_model_id, message.active_version):
                _LOGGER.info("device %s %s, active %s@%s", message.device_id, message.status,
                             message.active_model_id, message.active_version)
            self.registry.upsert_device(message.device_id, status=message.status,
                                        active_model_id=message.active_model_id,
                                        active_version=message.active_version, runtime=message.runtime,
                                        agent_version=message.agent_version, from_state=True)
            active = f"{message.active_model_id}@{message.active_version}"
            self.registry.log_event("device:state", device_id=message.device_id,
                                    detail=f"{message.status} active={active}")
        elif isinstance(message, Heartbeat):
            self.registry.upsert_device(message.device_id, uptime_s=message.uptime_s,
                                        active_version=message.active_version, last_error=message.last_error)
        elif isinstance(message, Event):
            self.deployer.handle_event(message)
        else:
            self.reports_ingested += 1
            # Which server process took the report: with a $share group each report goes to exactly one.
            self.registry.log_event("ingest:report", device_id=message.device_id,
                                    deployment_id=message.deployment_id, detail=self.config.client_id)
            self.deployer.handle_report(message)

    # ---- API -----------------------------------------------------------------------------------
    def deploy(self, model_id: str, device_id: str, *, version: int | None = None, policy: Policy | None = None,
               force: bool = False, chunk_size: int | None = None, wait_seen_s: float = 0.0) -> DeploymentRecord:
        """Create a deployment and start it now; waits up to `wait_seen_s` for an unseen device to appear."""
        deadline = time.monotonic() + wait_seen_s
        while self.registry.find_device(device_id) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        record = self.deployer.create(model_id, device_id, version=version, policy=policy, force=force,
                                      chunk_size=chunk_size)
        self._call(lambda: self.deployer.start(record.deployment_id))
        return record

    def wait(self, deployment_id: str, timeout: float = 600.0, poll_s: float = 0.1) -> DeploymentRecord:
        """Block until the deployment reaches a terminal status; TimeoutError names its last status."""
        return wait_for_deployment(self.registry, deployment_id, timeout, poll_s)


def stall_reason(registry: Registry, dep: DeploymentRecord, now: float | None = None) -> str:
    """Why a deployment has not ended yet, from what the registry records (server stamps, device state)."""
    now = time.time() if now is None else now
    why = []
    seen = registry.last_server_seen()
    if seen is None or now - seen > 3 * SERVER_ALIVE_S:
        since = "never" if seen is None else f"last {now - seen:.0f} s ago"
        why.append(f"no server heartbeat seen ({since}): no `edgeguide-server serve` runs on this registry; start "
                   "one, or pass --broker to run the deployment in this command")
    device = registry.find_device(dep.device_id)
    if device is None:
        why.append(f"device {dep.device_id!r} has never been seen")
    elif device.status == "offline":
        why.append(f"device {dep.device_id!r} is offline (its agent disconnected {now - device.last_seen:.0f} s ago)")
    elif device.last_error:
        why.append(f"device {dep.device_id!r} last error: {device.last_error}")
    if dep.reason:
        why.append(f"last reason: {dep.reason}")
    return "; ".join(why) or "no reason recorded"


def wait_for_deployment(registry: Registry, deployment_id: str, timeout: float, poll_s: float = 0.2,
                        on_change: Callable[[DeploymentRecord], object] | None = None) -> DeploymentRecord:
    """Poll the registry (works across processes) until `deployment_id` is promoted/rolled back/rejected/timed out.

    TimeoutError says why it is stuck (no server running, device offline, the device's last error).
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        dep = registry.deployment(deployment_id)
        if dep.status != last:
            last = dep.status
            if on_change is not None:
                on_change(dep)
        if dep.terminal:
            return dep
        if time.monotonic() > deadline:
            raise TimeoutError(f"deployment {deployment_id} still {dep.status!r} after {timeout:.0f} s: "
                               f"{stall_reason(registry, dep)}. It stays queued; `edgeguide-server cancel "
                               f"{deployment_id}` ends it")
        time.sleep(poll_s)
