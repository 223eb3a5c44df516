"""Staged rollout against a real mosquitto and real agents (in-process `agent.daemon.Agent`).

Covers the plan (canary group, waves, TOML), a stage that fails past the threshold (stop, no next
stage, promoted devices of that stage told to roll back) and a server killed with SIGKILL
mid-rollout (a real `python -m server serve` child): the restarted server finishes the rollout
without re-sending anything to devices that were already done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from attack_support import prove_subscribed
from test_agent_support import TINY_MEASURE

from agent.config import AgentConfig
from agent.daemon import Agent
from agent.measure import MeasureConfig
from agent.store import ModelStore
from protocol.mqtt import MqttLink
from server.keys import export_public_key
from server.policy import parse_policy
from server.registry import Registry
from server.rollout import RolloutError, RolloutManager, RolloutPlan, Stage, load_plan, make_plan, parse_group
from server.service import EdgeGuideServer, ServerConfig

REPO = Path(__file__).resolve().parents[1]
# In-process agents measure the test process's RSS (TensorFlow is loaded here): gate on latency only.
POLICY = parse_policy("name = 'rollout-test'\n[limits.p90_ms]\nmax = 1000.0\n")


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:.0f} s"
        time.sleep(0.1)


# ---- plans ---------------------------------------------------------------------------------
def test_make_plan_puts_groups_first_then_even_waves() -> None:
    plan = make_plan([parse_group("canary=a,b")], ["a", "b", "c", "d", "e", "f", "g"], 3, 10)
    assert [(s.name, s.devices) for s in plan.stages] == [
        ("canary", ("a", "b")), ("wave-1", ("c",)), ("wave-2", ("d", "e")), ("wave-3", ("f", "g"))]
    assert plan.max_failure_pct == 10
    assert RolloutPlan.from_dict(plan.to_dict()) == plan
    # More waves than devices: one device per wave, no empty stage.
    assert [s.devices for s in make_plan([], ["x", "y"], 5).stages] == [("x",), ("y",)]


def test_plan_errors_name_the_offending_value(tmp_path: Path) -> None:
    with pytest.raises(RolloutError, match="NAME=DEV1"):
        parse_group("canary")
    with pytest.raises(RolloutError, match="'a' is in stage 'g1' and again in 'g2'"):
        RolloutPlan((Stage("g1", ("a",)), Stage("g2", ("a",))))
    with pytest.raises(RolloutError, match="max_failure_pct must be in"):
        make_plan([], ["a"], 1, 120)
    with pytest.raises(RolloutError, match="at least one stage"):
        make_plan([], [], 2)
    with pytest.raises(RolloutError, match="stage 'canary'"):
        make_plan([("canary", ["bad id!"])], [], 1)
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text('max_failure_pct = 5\nwaves = 2\n[[group]]\nname = "canary"\ndevices = ["k"]\n')
    plan = load_plan(plan_file, ["k", "l", "m"])
    assert [(s.name, s.devices) for s in plan.stages] == [("canary", ("k",)), ("wave-1", ("l",)), ("wave-2", ("m",))]
    plan_file.write_text("wavez = 2\n")
    with pytest.raises(RolloutError, match=r"unknown keys \['wavez'\]"):
        load_plan(plan_file, ["k"])


# ---- live rollouts -------------------------------------------------------------------------
class Fleet:
    """In-process agents sharing one broker and topic prefix, each with its own state dir."""

    def __init__(self, tmp: Path, broker_url: str, prefix: str, key_file: Path) -> None:
        self.tmp, self.broker_url, self.prefix, self.key_file = tmp, broker_url, prefix, key_file
        self.agents: dict[str, Agent] = {}

    def preinstall(self, device_id: str, blob: bytes, version: int, model_id: str) -> None:
        """Give a device an incumbent model, as an earlier deployment would have."""
        store = ModelStore(self.tmp / device_id)
        ref = store.install_candidate(blob, model_id=model_id, version=version, deployment_id="d-00000000000a",
                                      max_unpacked_bytes=64 << 20)
        store.promote(ref)

    def start(self, device_id: str, **changes: object) -> Agent:
        config = AgentConfig(device_id=device_id, broker_url=self.broker_url, state_dir=self.tmp / device_id,
                             server_key=self.key_file, topic_prefix=self.prefix, http_port=None, heartbeat_s=5.0,
                             chunk_stall_s=2.0, verdict_timeout_s=60.0, measure_mode="quick",
                             **changes)  # type: ignore[arg-type]
        agent = Agent(config.validate(), measure_config=MeasureConfig(**TINY_MEASURE), power_source=None)
        agent.start()
        self.agents[device_id] = agent
        return agent

    def active_version(self, device_id: str) -> int | None:
        pointer = ModelStore(self.tmp / device_id).active()
        return pointer.current.version if pointer else None

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()


@pytest.fixture
def fleet(tmp_path: Path, mosquitto, topic_prefix: str) -> Iterator[tuple[Fleet, Registry]]:
    registry = Registry(tmp_path / "server")
    key_file = export_public_key(registry.data_dir, tmp_path / "server.pem")
    env = Fleet(tmp_path / "agents", mosquitto.url, topic_prefix, key_file)
    try:
        yield env, registry
    finally:
        env.stop()


class ManifestSniffer:
    """Records every manifest the broker delivers to any device under the prefix: (time, device).

    Its subscription is proven in force (a probe manifest topic of a device nobody plays comes back)
    before it returns, so "no manifest after the kill" cannot pass because the sniffer was not listening."""

    def __init__(self, broker_url: str, prefix: str) -> None:
        self.seen: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._probe_device = f"sniff-probe-{uuid.uuid4().hex[:6]}"
        self._probed = threading.Event()
        self.link = MqttLink(broker_url, f"sniff-{prefix}", clean_start=True)
        self.link.start()
        self.link.subscribe(f"{prefix}/dev/+/down/manifest", self._on)
        prove_subscribed(self.link, f"{prefix}/dev/{self._probe_device}/down/manifest", self._probed,
                         "manifest sniffer")

    def _on(self, topic: str, _payload: bytes) -> None:
        device = topic.split("/")[-3]
        if device == self._probe_device:
            self._probed.set()
            return
        with self._lock:
            self.seen.append((time.time(), device))

    def devices_since(self, since: float) -> list[str]:
        with self._lock:
            return [d for t, d in self.seen if t >= since]


@pytest.mark.network
def test_failed_wave_stops_the_rollout_and_rolls_back_its_promoted_devices(
        fleet: tuple[Fleet, Registry], mosquitto, topic_prefix: str, tiny_artifact: Path) -> None:
    env, registry = fleet
    v1 = registry.register(tiny_artifact)
    v2 = registry.register(tiny_artifact)
    for device in ("ro-canary", "ro-good", "ro-small", "ro-late"):
        env.preinstall(device, v1.packed_path.read_bytes(), v1.version, v1.model_id)
    env.start("ro-canary")
    env.start("ro-good")
    env.start("ro-small", quota_bytes=1000)  # refuses the manifest: a real failure of that wave
    env.start("ro-late")
    server = EdgeGuideServer(registry, ServerConfig(broker_url=mosquitto.url, topic_prefix=topic_prefix,
                                                    client_id=f"srv-{topic_prefix}", tick_s=0.2)).start()
    try:
        _until(lambda: len(registry.devices()) == 4, 20, "all four devices seen")
        plan = RolloutPlan((Stage("canary", ("ro-canary",)), Stage("wave-1", ("ro-good", "ro-small")),
                            Stage("wave-2", ("ro-late",))), max_failure_pct=20)
        rollout = server.rollouts.create(v2.model_id, plan, version=v2.version, policy=POLICY)
        _until(lambda: server.rollouts.get(rollout.rollout_id).finished, 60, "rollout finished")
        final = server.rollouts.get(rollout.rollout_id)
        assert final.status == "aborted" and final.stage == 1, final
        assert "1 of 2 devices failed (50 % > 20 %)" in final.reason
        outcomes = {d: m["outcome"] for d, m in final.devices.items()}
        assert outcomes == {"ro-canary": "promoted", "ro-good": "rollback_sent", "ro-small": "failed",
                            "ro-late": None}
        assert "manifest" in final.devices["ro-small"]["detail"]
        # The promoted device of the failed wave went back to v1; the canary keeps v2; wave-2 never started.
        _until(lambda: env.active_version("ro-good") == v1.version, 20, "ro-good rolled back to v1")
        _until(lambda: registry.device("ro-good").active_version == v1.version, 20, "server sees ro-good on v1")
        assert env.active_version("ro-canary") == v2.version
        assert env.active_version("ro-late") == v1.version
        assert registry.deployments(device_id="ro-late") == []
        assert [e["device_id"] for e in registry.events(kind_prefix="rollout:rollback_sent")] == ["ro-good"]
        # The rolled_back event goes through the agent's outbox; its state (awaited above) is published
        # directly and may arrive first.
        _until(lambda: any(e["kind"] == "device:rolled_back" for e in registry.events(device_id="ro-good")), 10,
               "ro-good's rolled_back event")
    finally:
        server.stop()


@pytest.mark.network
def test_devices_already_on_the_version_are_skipped_and_unseen_devices_refused(
        fleet: tuple[Fleet, Registry], mosquitto, topic_prefix: str, tiny_artifact: Path) -> None:
    env, registry = fleet
    v1 = registry.register(tiny_artifact)
    v2 = registry.register(tiny_artifact)
    env.preinstall("sk-canary", v2.packed_path.read_bytes(), v2.version, v2.model_id)  # already on v2
    env.preinstall("sk-wave", v1.packed_path.read_bytes(), v1.version, v1.model_id)
    env.start("sk-canary")
    env.start("sk-wave")
    server = EdgeGuideServer(registry, ServerConfig(broker_url=mosquitto.url, topic_prefix=topic_prefix,
                                                    client_id=f"srv-{topic_prefix}", tick_s=0.2)).start()
    try:
        _until(lambda: len(registry.devices()) == 2 and registry.device("sk-canary").active_version == v2.version,
               20, "both devices seen")
        # Never-seen devices: refused up front, one reason per device, nothing recorded.
        plan = RolloutPlan((Stage("canary", ("sk-canary", "ghost-1")), Stage("wave-1", ("sk-wave", "ghost-2"))))
        with pytest.raises(RolloutError) as refused:
            server.rollouts.create(v2.model_id, plan, version=v2.version, policy=POLICY)
        assert "device 'ghost-1' has never been seen" in str(refused.value)
        assert "device 'ghost-2' has never been seen" in str(refused.value)
        assert server.rollouts.rollouts() == []
        # A canary already on the version counts as done (skipped), it does not abort the rollout.
        plan = RolloutPlan((Stage("canary", ("sk-canary",)), Stage("wave-1", ("sk-wave",))), max_failure_pct=0)
        rollout = server.rollouts.create(v2.model_id, plan, version=v2.version, policy=POLICY)
        assert rollout.devices["sk-canary"]["outcome"] == "skipped"
        assert f"already runs {v2.id}" in rollout.devices["sk-canary"]["detail"]
        _until(lambda: server.rollouts.get(rollout.rollout_id).finished, 60, "rollout finished")
        final = server.rollouts.get(rollout.rollout_id)
        assert final.status == "completed", final
        assert {d: m["outcome"] for d, m in final.devices.items()} == {"sk-canary": "skipped", "sk-wave": "promoted"}
        assert registry.deployments(device_id="sk-canary") == []  # nothing was sent to it
        assert env.active_version("sk-wave") == v2.version
    finally:
        server.stop()


def _serve(data_dir: Path, broker_url: str, prefix: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server", "--data-dir", str(data_dir), "-v", "serve", "--broker", broker_url,
           "--topic-prefix", prefix, "--client-id", f"srv-{prefix}"]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=str(REPO), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.network
def test_killed_server_resumes_the_rollout_without_resending_finished_work(
        fleet: tuple[Fleet, Registry], mosquitto, topic_prefix: str, tiny_artifact: Path, tmp_path: Path) -> None:
    env, registry = fleet
    record = registry.register(tiny_artifact)
    devices = ("rs-a", "rs-b", "rs-c")
    for device in devices:
        env.start(device)
    sniffer = ManifestSniffer(mosquitto.url, topic_prefix)
    log = tmp_path / "serve.log"
    proc = _serve(registry.data_dir, mosquitto.url, topic_prefix, log)
    try:
        _until(lambda: len(registry.devices()) == 3, 30, f"devices seen by the server (log {log})")
        manager = RolloutManager(registry, EdgeGuideServer(registry, ServerConfig(broker_url="mqtt://127.0.0.1:1",
                                                                                  topic_prefix=topic_prefix)).deployer)
        plan = make_plan([("canary", ["rs-a"])], ["rs-b", "rs-c"], 2, 0)
        rollout = manager.create(record.model_id, plan, policy=POLICY)
        # Kill the server as soon as the canary is done: the rollout is mid-way, wave-1 at most just begun.
        _until(lambda: manager.get(rollout.rollout_id).devices["rs-a"]["outcome"] == "promoted", 45,
               "canary promoted")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = time.time()
        mid = manager.get(rollout.rollout_id)
        assert mid.status == "running" and mid.stage <= 1, mid
        proc = _serve(registry.data_dir, mosquitto.url, topic_prefix, log)
        _until(lambda: manager.get(rollout.rollout_id).finished, 60, f"rollout finished after restart (log {log})")
        final = manager.get(rollout.rollout_id)
        assert final.status == "completed", final
        assert {d: m["outcome"] for d, m in final.devices.items()} == dict.fromkeys(devices, "promoted")
        # Finished work is not re-sent: the canary got no manifest after the kill, and every device
        # got exactly one deployment.
        assert "rs-a" not in sniffer.devices_since(killed_at)
        assert sorted(d for _t, d in sniffer.seen if d == "rs-a") == ["rs-a"]
        for device in devices:
            assert len(registry.deployments(device_id=device)) == 1, device
            assert env.active_version(device) == record.version
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        sniffer.link.stop()
