"""Faults aimed at the worst moments: kill -9 inside a slow download, a kill between the pointer
switch and the outcome event, a broker restart in the middle of a staged rollout.

Real parts throughout: a mosquitto of this module's own (persistence on, so it can be restarted),
the real server, agents as `python -m agent` processes killed with SIGKILL (or in-process agents
for the rollout). The download is slowed by `ThrottledRelay`, a byte-level TCP relay between the
agent and the broker that paces the broker-to-agent direction: chunks queued in the broker while
the agent is dead still arrive slowly after it restarts, so every kill lands inside the download.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from attack_support import (
    INCUMBENT_DEPLOYMENT,
    POLICY,
    EventTap,
    device_events,
    pointer_version,
    preinstall,
    public_key_file,
    start_agent,
    start_server,
    wait_until,
)
from test_delivery_faults import KillableAgent

from agent.store import ModelStore
from server.deployer import DeployerConfig
from server.mosquitto import MosquittoBroker
from server.registry import Registry
from server.rollout import RolloutPlan, Stage
from server.service import EdgeGuideServer

pytestmark = [pytest.mark.network, pytest.mark.slow]

CHUNK = 1024  # ~180 chunks for the tiny float model: many flushes, many kill points
RELAY_BYTES_PER_S = 48 * 1024
SETTLE_S = 90.0


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A broker of this module's own (restarted by one test), with persistence."""
    b = MosquittoBroker(workdir=tmp_path_factory.mktemp("storm-broker"))
    b.start()
    yield b
    b.stop()


class ThrottledRelay:
    """TCP relay to the broker that paces what the broker sends to the client (byte level, both ways open)."""

    def __init__(self, target_port: int, bytes_per_s: int) -> None:
        self.target_port = target_port
        self.bytes_per_s = bytes_per_s
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, 0), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.bytes_per_s), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, rate: int) -> None:
        piece = 1024 if rate else 65536
        try:
            while data := src.recv(piece):
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        self._server.close()
        for s in self._sockets:
            s.close()


def _agent_round_trip(server: EdgeGuideServer, registry: Registry, device_id: str) -> None:
    """A signed cancel of a deployment that does not exist goes down the server's connection, after
    everything the server sent before it; the agent handles its messages in order and answers with a
    direct `command_rejected` event. Once the registry has that, the agent has handled what came
    before, and the events it published directly before it are recorded."""
    marker = f"d-{uuid.uuid4().hex[:12]}"
    server.deployer.send_command(device_id, "cancel", marker)
    wait_until(lambda: any(e["deployment_id"] == marker
                           for e in device_events(registry, device_id, "command_rejected")),
               30, f"the agent's answer to marker {marker}")


def claimed(state_dir: Path, deployment_id: str) -> set[int]:
    """Chunk indices the on-disk staging bitmap claims (what survived the kill)."""
    try:
        have = json.loads((state_dir / "staging" / deployment_id / "bitmap.json").read_text())["have"]
    except (OSError, ValueError, KeyError):
        return set()
    return {i for i, c in enumerate(have) if c == "1"}


def test_kill_9_storm_inside_a_slow_download_resumes_without_refetching_verified_chunks(
        broker: MosquittoBroker, tiny_artifacts: dict[str, Path], tmp_path: Path) -> None:
    prefix = f"eg-storm-{uuid.uuid4().hex[:6]}"
    registry = Registry(tmp_path / "server")
    base, new = registry.register(tiny_artifacts["dynamic"]), registry.register(tiny_artifacts["float"])
    server, recorder = start_server(registry, broker.url, prefix)
    relay = ThrottledRelay(broker.port, RELAY_BYTES_PER_S)
    device_id = f"storm-{uuid.uuid4().hex[:6]}"
    state = tmp_path / device_id / "state"
    preinstall(state, base)
    tap = EventTap(broker.url, server.topics.up(device_id, "event"))
    agent = KillableAgent(device_id, relay.url, state, public_key_file(registry, tmp_path), topic_prefix=prefix,
                          log_path=tmp_path / f"{device_id}.log",
                          extra_args=["--chunk-stall-s", "1", "--heartbeat-s", "2", "--verdict-timeout-s", "60"])
    kills: list[dict] = []
    try:
        agent.start()
        wait_until(lambda: registry.find_device(device_id) is not None, 15, "the device seen by the server")
        dep_id = server.deploy(new.model_id, device_id, version=new.version, chunk_size=CHUNK).deployment_id
        chunks = -(-new.size // CHUNK)
        for fraction in (0.15, 0.35, 0.55, 0.75):
            target = int(chunks * fraction)
            wait_until(lambda t=target: len(claimed(state, dep_id)) >= t, 60, f"{target} of {chunks} chunks on disk")
            agent.kill9()
            killed_at = time.time()
            on_disk = claimed(state, dep_id)
            agent.start()
            request = wait_until(lambda k=killed_at: tap.first_reconnect_request(k, dep_id), 20,
                                 "the restarted agent's request")
            kills.append({"at": killed_at, "claimed": on_disk, "asked": set(request.missing or [])})
        final = server.wait(dep_id, timeout=SETTLE_S, poll_s=0.05)
        assert final.status == "promoted", (final.status, final.reason, agent.log_tail())
        assert agent.model()["version"] == new.version and pointer_version(state) == new.version
        wait_until(lambda: registry.device(device_id).active_version == new.version, 15, "the registry's record")
    finally:
        agent.stop()
        tap.link.stop()
        server.stop()
        relay.close()
    every = set(range(chunks))
    for i, kill in enumerate(kills):
        assert 0 < len(kill["claimed"]) < chunks, (i, len(kill["claimed"]), chunks)  # the kill hit mid-download
        # The restarted agent asks for exactly what the bitmap did not claim: verified chunks are kept.
        assert kill["asked"] == every - kill["claimed"], (i, sorted(kill["asked"] & kill["claimed"])[:10])
        if i:
            assert kills[i - 1]["claimed"] <= kill["claimed"], i  # nothing verified is ever lost
    # ... and the server never sent a chunk again once a restarted agent held it verified.
    sends = [(t, int.from_bytes(p[18:22], "big")) for t, p in recorder.timed_payloads(device_id, "chunk")]
    for kill in kills:
        resent = sorted({i for t, i in sends if t > kill["at"] and i in kill["claimed"]})
        assert not resent, f"chunks {resent[:10]} re-sent after the kill at {kill['at']:.2f} although verified"


def test_kill_between_the_pointer_switch_and_the_outcome_event(broker: MosquittoBroker,
                                                               tiny_artifacts: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """The agent dies right after switching its active pointer, before it queued `promoted`.

    The verdict is held back so the agent is surely awaiting it when it is killed; the switch is
    then made with the agent's own store code (`ModelStore.promote`, the first step of ending a
    deployment), which leaves the disk exactly as a kill at that instant would. On restart the
    agent must report the promotion and the registry must end `promoted`, in line with the device.
    """
    prefix = f"eg-swap-{uuid.uuid4().hex[:6]}"
    registry = Registry(tmp_path / "server")
    base, new = registry.register(tiny_artifacts["dynamic"]), registry.register(tiny_artifacts["float"])
    server, recorder = start_server(registry, broker.url, prefix)
    device_id = f"swap-{uuid.uuid4().hex[:6]}"
    state = tmp_path / device_id / "state"
    preinstall(state, base)
    agent = KillableAgent(device_id, broker.url, state, public_key_file(registry, tmp_path), topic_prefix=prefix,
                          log_path=tmp_path / f"{device_id}.log",
                          extra_args=["--chunk-stall-s", "1", "--heartbeat-s", "2", "--verdict-timeout-s", "60"])
    try:
        agent.start()
        wait_until(lambda: registry.find_device(device_id) is not None, 15, "the device seen by the server")
        recorder.hold_kinds = {"verdict"}
        dep_id = server.deploy(new.model_id, device_id, version=new.version).deployment_id
        wait_until(lambda: registry.deployment(dep_id).status == "passed", 60, "the PASS verdict (held back)")
        agent.kill9()
        store = ModelStore(state)
        candidate = store.slot_contents(store.inactive_slot())
        assert candidate is not None and candidate.deployment_id == dep_id, candidate
        store.promote(candidate)  # the switch; the process died before the outcome event
        queued = [p for p in (state / "outbox").rglob("*") if p.is_file() and b"promoted" in p.read_bytes()]
        assert dep_id not in store.finished() and not queued, queued
        restarted_at = time.time()
        agent.start()
        recorder.release()  # the verdict arrives late (redelivered by the broker in a real kill)
        final = server.wait(dep_id, timeout=SETTLE_S, poll_s=0.05)
        assert final.status == "promoted", (final.status, final.reason)
        promoted = device_events(registry, device_id, "promoted", restarted_at)
        assert [e["deployment_id"] for e in promoted] == [dep_id], promoted
        assert "before a restart" in promoted[0]["detail"], promoted
        assert agent.model()["version"] == new.version and pointer_version(state) == new.version
        wait_until(lambda: registry.device(device_id).active_version == new.version, 15, "the registry's record")
        wait_until(lambda: dep_id in ModelStore(state).finished() and not (state / "staging" / dep_id).exists(), 10,
                   "the agent's bookkeeping")
        # The late verdict is ignored, not rejected or acted on twice: two marker round trips through the
        # agent prove it was handled and that whatever it caused has reached the registry.
        _agent_round_trip(server, registry, device_id)
        wait_until(lambda: not [p for p in (state / "outbox").rglob("*") if p.is_file()], 15, "the outbox to empty")
        _agent_round_trip(server, registry, device_id)
        assert not device_events(registry, device_id, "verdict_rejected", restarted_at)
        assert len(device_events(registry, device_id, "promoted", restarted_at)) == 1
        assert json.loads((state / "active.json").read_text())["previous"]["deployment_id"] == INCUMBENT_DEPLOYMENT
    finally:
        agent.stop()
        server.stop()


def test_broker_restart_with_persistence_during_a_rollout(broker: MosquittoBroker, tiny_artifact: Path,
                                                          tmp_path: Path) -> None:
    """mosquitto restarts while the rollout's second stage is downloading; the rollout completes."""
    prefix = f"eg-roll-{uuid.uuid4().hex[:6]}"
    registry = Registry(tmp_path / "server")
    v1, v2 = registry.register(tiny_artifact), registry.register(tiny_artifact)
    server, recorder = start_server(registry, broker.url, prefix, deployer_config=DeployerConfig(chunk_size=4096))
    key_file = public_key_file(registry, tmp_path)
    devices = [f"{role}-{uuid.uuid4().hex[:4]}" for role in ("canary", "wave-a", "wave-b")]
    agents = []
    try:
        for device in devices:
            preinstall(tmp_path / device, v1)
            agents.append(start_agent(device, broker.url, tmp_path / device, key_file, prefix))
        wait_until(lambda: all(registry.find_device(d) for d in devices), 20, "all devices seen")
        recorder.chunk_delay_s = 0.02  # ~48 chunks of 4 KiB per device: the restart lands in the transfer
        plan = RolloutPlan((Stage("canary", (devices[0],)), Stage("wave-1", tuple(devices[1:]))),
                           max_failure_pct=0)
        rollout = server.rollouts.create(v2.model_id, plan, version=v2.version, policy=POLICY)

        def wave_downloading() -> bool:
            if server.rollouts.get(rollout.rollout_id).stage != 1:
                return False
            bitmaps = [p for d in devices[1:] for p in (tmp_path / d / "staging").glob("d-*/bitmap.json")]
            return any("0" in json.loads(p.read_text())["have"] for p in bitmaps if p.stat().st_size)
        wait_until(wave_downloading, 60, "wave-1 downloading")
        broker.restart()
        restarted_at = time.time()
        wait_until(lambda: server.rollouts.get(rollout.rollout_id).finished, SETTLE_S, "the rollout to finish")
        final = server.rollouts.get(rollout.rollout_id)
        assert final.status == "completed", (final.status, final.reason, final.devices)
        assert {d: m["outcome"] for d, m in final.devices.items()} == dict.fromkeys(devices, "promoted")
        for device, agent in zip(devices, agents, strict=True):
            assert pointer_version(tmp_path / device) == v2.version and agent.active_model.version == v2.version
            wait_until(lambda d=device: registry.device(d).active_version == v2.version, 15, f"{device} on v2")
            assert len(registry.deployments(device_id=device)) == 1, device
        heard = {e["device_id"] for e in registry.events(kind_prefix="device:state") if e["ts"] > restarted_at}
        assert set(devices) <= heard, heard  # every device came back by itself
    finally:
        for agent in agents:
            agent.stop()
        server.stop()
