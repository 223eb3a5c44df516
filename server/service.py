"""The running server: one MQTT link, one worker thread, the registry and the deployer.

MQTT callbacks only submit jobs; a single `protocol.worker.Worker` thread decodes, records and
acts, and runs the periodic ticks as its timers, so gating never stalls paho's network loop and
the registry sees one writer per process (report files are drawn on the deployer's own
background thread). Anything malformed is logged with its topic and a
payload preview, recorded in the event log, and dropped: a device can never crash the server.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from protocol.errors import ProtocolError
from protocol.messages import DeviceState, Event, Heartbeat, Report
from protocol.mqtt import MqttLink
from protocol.redact import redact_url
from protocol.topics import Topics
from protocol.worker import Worker
from server import keys
from server.deployer import ChunkTransform, Deployer, DeployerConfig
from server.inbox import Inbox
from server.ingest import DeviceRateLimiter, IngestLimits, bounded
from server.policy import Policy, load_policy
from server.registry import DeploymentRecord, Registry
from server.rollout import RolloutManager

_LOGGER = logging.getLogger(__name__)

_DECODERS: dict[str, type[DeviceState | Heartbeat | Event | Report]] = {
    "state": DeviceState, "heartbeat": Heartbeat, "event": Event, "report": Report}


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
    rollout_starts_per_tick: int = 100  # devices a tick starts per rollout: a wave starts in slices
    ingest_group: int = 64  # device messages per transaction (PostgreSQL; server/inbox.py)


CHUNK_TOPIC_SUFFIX = "/down/chunk"


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
        self._stopping = threading.Event()  # ends a retry while the database is down
        # Device messages, handled in groups of one transaction each (group commit) on PostgreSQL.
        self.inbox = Inbox(self.handle, registry.unit_of_work, self._publish_now,
                           lambda job: self._worker.submit(job, "inbox"), on_error=self._record_error,
                           stopping=self._stopping,
                           max_messages=self.config.ingest_group if registry.spans_messages else 1)
        self.rollouts = RolloutManager(registry, self.deployer, starts_per_tick=self.config.rollout_starts_per_tick)
        # The single thread that owns the server's work; a new one per start() (a thread runs once).
        self._worker = self._new_worker()
        self._worker_started = False
        self._subscribed = False
        self._subscribe_sent = threading.Event()
        self.malformed = 0
        self.reports_ingested = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> EdgeGuideServer:
        """Connect, subscribe to every device's up topics, resume recorded deployments."""
        # Subscribing from the connect listener runs before paho dispatches any message queued in our
        # persistent session, so nothing that arrived while we were down is dropped unrouted.
        if self._worker_started:  # a restart after stop(): the old thread has ended for good
            self._worker = self._new_worker()
        self._worker_started = True
        self._stopping.clear()
        self.link.add_connect_listener(self._ensure_subscribed)
        self.link.start(timeout=timeout)
        # Return only once the broker routes device traffic to us: a report published right after start()
        # must not fall through an unacknowledged subscription.
        if not (self._subscribe_sent.wait(timeout) and self.link.wait_subscribed(timeout)):
            _LOGGER.warning("the broker has not acknowledged the up-topic subscription after %.0f s", timeout)
        # Resume first (before the first tick starts pending deployments), in order after any message
        # the persistent session delivered while we were down.
        self._call(self.deployer.resume)
        lim = self.ingest_limits
        self._worker.every(SERVER_ALIVE_S, lambda: self.registry.server_alive(self.config.client_id), "alive")
        self._worker.every(self.config.tick_s, self.deployer.tick, "tick")
        self._worker.every(self.config.tick_s, self.rollouts.tick, "rollout tick")
        self._worker.every(lim.prune_interval_s, self._prune, "prune")
        self._worker.start()
        _LOGGER.info("server up: broker %s, prefix %r, data dir %s", redact_url(self.config.broker_url),
                     self.topics.prefix,
                     self.registry.data_dir)
        return self

    def stop(self) -> None:
        """Stop the worker (after it finishes the current message) and disconnect."""
        self._stopping.set()
        if not self._worker.stop(timeout=30):
            _LOGGER.warning("the server worker is still busy after 30 s; stopping the link under it")
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
        self._subscribe_sent.set()
        _LOGGER.info("subscribed to %s", topic_filter)

    def _publish(self, topic: str, payload: bytes) -> None:
        if topic.endswith(CHUNK_TOPIC_SUFFIX):
            # Pieces of an artifact whose deployment is already recorded as sending: nothing about
            # them can roll back, and holding a window of them would only delay the download.
            self._publish_now(topic, payload)
        else:  # verdicts, commands: held until the commit while device messages are handled
            self.inbox.publish(topic, payload)

    def _publish_now(self, topic: str, payload: bytes) -> None:
        self.link.publish(topic, payload, qos=1)

    def _enqueue(self, topic: str, payload: bytes) -> None:
        # Rate-limited here, on paho's thread, so a flood never even grows the inbox.
        parts = topic.split("/")
        device = parts[-3] if len(parts) >= 3 else ""
        if not self.limiter.allow(device):
            self.rate_limited += 1
            dropped = self.limiter.take_notice(device)
            if dropped:
                self._call(functools.partial(self._record_rate_limited, device[:64], dropped))
            return
        self.inbox.put(topic, payload)

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
    def _new_worker(self) -> Worker:
        return Worker("edgeguide-server-worker", on_error=self._record_error, idle_s=self.config.tick_s)

    def _call(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the worker thread, in order with the messages (one writer, no races)."""
        self._worker.submit(fn, getattr(fn, "__name__", "call"))

    def _record_error(self, label: str, exc: Exception) -> None:
        """A bug or a bad message must not stop the worker: it is logged (by the worker) and recorded here."""
        try:
            self.registry.log_event("handler_error", detail=f"{label}: {type(exc).__name__}: {exc}")
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
