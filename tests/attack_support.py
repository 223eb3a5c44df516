"""Shared parts of the attack tests: a real server whose down traffic is recorded, in-process agents.

The server (`EdgeGuideServer`: registry, deployer, gate) and the agents (`agent.daemon.Agent`) are
the real code on a real mosquitto. `Recorder` sits where `FaultyNetwork` does in
test_delivery_faults.py (between the deployer and the broker): it keeps every manifest, chunk,
verdict and command the server sends, so a test can replay them later as an attacker would, and
can hold one kind of message back or pace the chunks.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from test_agent_support import TINY_MEASURE

from agent.config import AgentConfig
from agent.daemon import Agent
from agent.measure import MeasureConfig
from agent.store import ModelStore
from protocol.messages import Event
from protocol.mqtt import MqttLink
from server.deployer import DeployerConfig
from server.keys import export_public_key
from server.policy import parse_policy
from server.registry import ArtifactRecord, Registry
from server.service import EdgeGuideServer, ServerConfig

# In-process agents measure the test process's RSS (TensorFlow is loaded here): gate on latency only.
POLICY = parse_policy("name = 'attack-test'\n[limits.p90_ms]\nmax = 1000.0\n")
INCUMBENT_DEPLOYMENT = "d-00000000000a"


def wait_until(cond: Callable[[], Any], timeout: float, what: str, poll_s: float = 0.02) -> Any:
    """Poll `cond` until it returns something truthy (returned); AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll_s)


class Recorder:
    """The deployer's publish function, recording what goes down; can hold a kind back or pace chunks."""

    def __init__(self, publish: Callable[[str, bytes], None]) -> None:
        self._publish = publish
        self._lock = threading.Lock()
        self.sent: list[tuple[float, str, bytes]] = []
        self.held: list[tuple[str, bytes]] = []
        self.hold_kinds: set[str] = set()
        self.chunk_delay_s = 0.0

    def __call__(self, topic: str, payload: bytes) -> None:
        kind = topic.rsplit("/", 1)[-1]
        with self._lock:
            self.sent.append((time.time(), topic, bytes(payload)))
            if kind in self.hold_kinds:
                self.held.append((topic, bytes(payload)))
                return
        if kind == "chunk" and self.chunk_delay_s:
            time.sleep(self.chunk_delay_s)
        self._publish(topic, payload)

    def release(self) -> None:
        """Stop holding anything back and send what was held, in order."""
        with self._lock:
            held, self.held, self.hold_kinds = self.held, [], set()
        for topic, payload in held:
            self._publish(topic, payload)

    def payloads(self, device_id: str, kind: str) -> list[bytes]:
        return [p for _, p in self.timed_payloads(device_id, kind)]

    def timed_payloads(self, device_id: str, kind: str) -> list[tuple[float, bytes]]:
        """(time.time() when sent, payload) of every `kind` message sent to `device_id`."""
        with self._lock:
            return [(ts, p) for ts, t, p in self.sent if t.endswith(f"/dev/{device_id}/down/{kind}")]


def start_server(registry: Registry, broker_url: str, prefix: str, *, deployer_config: DeployerConfig | None = None,
                 client_id: str | None = None, **config: Any) -> tuple[EdgeGuideServer, Recorder]:
    """A started server whose down traffic goes through a Recorder.

    A restart must pass the stopped server's `client_id`, as `serve` does: its persistent session stays in
    the broker's $share group, and messages the broker hands to that session wait for that client id."""
    server = EdgeGuideServer(registry, ServerConfig(broker_url=broker_url, topic_prefix=prefix,
                                                    client_id=client_id or f"srv-{uuid.uuid4().hex[:8]}", tick_s=0.2,
                                                    **config),
                             policy=POLICY, deployer_config=deployer_config)
    recorder = Recorder(server.deployer.publish)
    server.deployer.publish = recorder  # type: ignore[method-assign]
    server.start()
    return server, recorder


def preinstall(state_dir: Path, record: ArtifactRecord) -> None:
    """Give a device an incumbent model, as a finished earlier deployment would have (agent's own store code)."""
    store = ModelStore(state_dir)
    ref = store.install_candidate(record.packed_path.read_bytes(), model_id=record.model_id, version=record.version,
                                  deployment_id=INCUMBENT_DEPLOYMENT, max_unpacked_bytes=64 << 20)
    store.promote(ref)
    store.mark_finished(INCUMBENT_DEPLOYMENT)


def start_agent(device_id: str, broker_url: str, state_dir: Path, key_file: Path, prefix: str,
                **changes: Any) -> Agent:
    """An in-process agent with short timers and the tiny measurement settings."""
    config = AgentConfig(device_id=device_id, broker_url=broker_url, state_dir=state_dir, server_key=key_file,
                         topic_prefix=prefix, http_port=None, heartbeat_s=5.0, chunk_stall_s=2.0,
                         verdict_timeout_s=60.0, report_resend_s=2.0, measure_mode="quick", **changes)
    agent = Agent(config.validate(), measure_config=MeasureConfig(**TINY_MEASURE), power_source=None)
    agent.start()
    return agent


def public_key_file(registry: Registry, tmp: Path) -> Path:
    return export_public_key(registry.data_dir, tmp / "server_pub.pem")


def pointer_version(state_dir: Path) -> int | None:
    """The version the on-disk active pointer names (read only: the agent owns the store)."""
    path = state_dir / "active.json"
    return json.loads(path.read_text())["version"] if path.exists() else None


def device_events(registry: Registry, device_id: str, kind: str, since: float = 0.0) -> list[dict[str, Any]]:
    """Registry events `device:<kind>` of one device recorded at or after `since` (time.time())."""
    return [e for e in registry.events(device_id=device_id, kind_prefix=f"device:{kind}") if e["ts"] >= since]


@contextmanager
def raw_link(broker_url: str, **kw: Any) -> Iterator[MqttLink]:
    """A plain MQTT client (an attacker, or a device played by hand), stopped on exit."""
    link = MqttLink(broker_url, kw.pop("client_id", f"raw-{uuid.uuid4().hex[:8]}"), clean_start=True, **kw)
    link.start()
    try:
        yield link
    finally:
        link.stop()


def prove_subscribed(link: MqttLink, probe_topic: str, received: threading.Event, what: str,
                     timeout: float = 20.0) -> None:
    """Publish probes on `probe_topic` (which the link's subscription matches) until one comes back.

    A SUBSCRIBE is not in force until the broker has processed it; a fixed sleep can be too short on a
    loaded machine, and then a "nothing arrived" assertion passes without anything having listened."""
    deadline = time.monotonic() + timeout
    while True:
        link.publish(probe_topic, b"probe")
        if received.wait(0.5):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: no probe on {probe_topic} came back within {timeout:.0f} s")


class EventTap:
    """Every event one device publishes, with the time it arrived (a plain, non-shared subscription, so
    the server's per-device rate limit does not hide what the agent said).

    It subscribes to `topic/#` (which matches `topic` itself) and proves the subscription with a probe
    on a sub-topic that neither the server (`.../up/+`) nor any agent subscribes to."""

    def __init__(self, broker_url: str, topic: str) -> None:
        self.events: list[tuple[float, Event]] = []
        self._lock = threading.Lock()
        self._topic = topic
        self._probe = f"{topic}/probe-{uuid.uuid4().hex[:8]}"
        self._probed = threading.Event()
        self.link = MqttLink(broker_url, f"tap-{uuid.uuid4().hex[:8]}", clean_start=True)
        self.link.start()
        self.link.subscribe(f"{topic}/#", self._on)
        prove_subscribed(self.link, self._probe, self._probed, f"event tap on {topic}")

    def _on(self, topic: str, payload: bytes) -> None:
        if topic != self._topic:
            if topic == self._probe:
                self._probed.set()
            return
        with self._lock:
            self.events.append((time.time(), Event.from_json(payload)))

    def of(self, deployment_id: str, kind: str, since: float = 0.0) -> list[Event]:
        """Events `kind` about `deployment_id` that arrived at or after `since` (time.time())."""
        with self._lock:
            return [e for t, e in self.events if t >= since and e.deployment_id == deployment_id and e.type == kind]

    def first_reconnect_request(self, since: float, deployment_id: str) -> Event | None:
        """The first `need_chunks` a (re)started agent sends on connecting, after `since`."""
        with self._lock:
            return next((e for t, e in self.events if t >= since and e.deployment_id == deployment_id
                         and e.type == "need_chunks" and e.reason == "reconnected"), None)
