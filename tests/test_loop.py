"""The whole loop against a real mosquitto: server in-process, agent as a real child process.

deploy -> chunks -> on-device measurement -> report -> gate -> signed verdict -> promote/discard
-> recommendation over the agent's HTTP API; plus the ways it must fail safely.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocol.artifact import read_golden, read_items
from server.deployer import DeployerConfig, IncompatibleRuntimeError, UnknownDeviceError
from server.keys import export_public_key
from server.local_agent import LocalAgent
from server.policy import parse_policy
from server.registry import ArtifactRecord, Registry
from server.service import EdgeGuideServer, ServerConfig

pytestmark = [pytest.mark.network, pytest.mark.slow]

DEVICE = "loop-dev"
TIMEOUT = 120.0


class Loop:
    """One test's registry, server and agent, all on the session broker under a unique topic prefix."""

    def __init__(self, tmp: Path, broker_url: str, prefix: str, artifact: Path) -> None:
        self.tmp = tmp
        self.broker_url = broker_url
        self.prefix = prefix
        self.artifact = artifact
        self.registry = Registry(tmp / "server")
        self.key_file = export_public_key(self.registry.data_dir, tmp / "server.pem")
        self.server: EdgeGuideServer | None = None
        self.agent: LocalAgent | None = None

    def start_server(self, **kwargs: object) -> EdgeGuideServer:
        config = ServerConfig(broker_url=self.broker_url, topic_prefix=self.prefix, client_id=f"srv-{self.prefix}")
        self.server = EdgeGuideServer(self.registry, config, **kwargs).start()  # type: ignore[arg-type]
        return self.server

    def start_agent(self) -> LocalAgent:
        self.agent = LocalAgent(DEVICE, self.broker_url, self.tmp / "agent", self.key_file, topic_prefix=self.prefix)
        return self.agent.start()

    def register(self, folder: Path | None = None) -> ArtifactRecord:
        return self.registry.register(folder or self.artifact)

    def deploy(self, record: ArtifactRecord, **kwargs: object):
        assert self.server is not None
        dep = self.server.deploy(record.model_id, DEVICE, version=record.version, wait_seen_s=10.0, **kwargs)
        try:
            return self.server.wait(dep.deployment_id, TIMEOUT)
        except TimeoutError as exc:
            agent_log = self.agent.log_tail() if self.agent else ""
            raise AssertionError(f"{exc}\nevents: {self.registry.events(deployment_id=dep.deployment_id)}\n"
                                 f"agent log:\n{agent_log}") from exc

    def history(self) -> list[str]:
        items = read_items(self.artifact)["items"]
        return [items[i][0] for i in read_golden(self.artifact)["histories"][0] if i > 0]

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        if self.server is not None:
            self.server.stop()


@pytest.fixture
def loop(tmp_path: Path, mosquitto, topic_prefix: str, tiny_artifact: Path) -> Iterator[Loop]:
    env = Loop(tmp_path, mosquitto.url, topic_prefix, tiny_artifact)
    try:
        yield env
    finally:
        env.stop()


def _event_kinds(registry: Registry, deployment_id: str) -> list[str]:
    return [e["kind"] for e in registry.events(deployment_id=deployment_id)]


def test_pass_is_promoted_and_the_device_serves_it(loop: Loop, tiny_artifact_int8: Path) -> None:
    loop.start_server()
    agent = loop.start_agent()
    record = loop.register(tiny_artifact_int8)  # the demo's kind of model: full-integer int8
    final = loop.deploy(record, chunk_size=32 * 1024)  # several chunks even for a tiny model
    assert final.status == "promoted", final.reason
    assert final.verdict["verdict"] == "PASS"
    assert final.report["load_ok"] is True and final.report["latency_ms"]["p90"] > 0
    assert final.report["runtime"]["name"] == "ai-edge-litert"
    kinds = _event_kinds(loop.registry, final.deployment_id)
    for step in ("status:transferring", "device:manifest_accepted", "status:measuring", "status:passed",
                 "device:promoted", "status:promoted"):
        assert step in kinds, kinds
    assert agent.model()["version"] == record.version
    answer = agent.recommend(loop.history(), k=5)
    assert len(answer["items"]) == 5 and all(item["stock_code"] for item in answer["items"])
    folder = loop.registry.reports_dir / final.deployment_id
    deadline = time.monotonic() + 20  # the final report files are written just after the status changes
    while time.monotonic() < deadline:
        if json.loads((folder / "report.json").read_text())["deployment"]["status"] == "promoted":
            break
        time.sleep(0.1)
    assert json.loads((folder / "report.json").read_text())["deployment"]["status"] == "promoted"
    assert (folder / "latency.png").read_bytes().startswith(b"\x89PNG")
    assert "| p90_ms |" in (folder / "report.md").read_text()


def test_fail_policy_rolls_back_and_the_old_model_keeps_serving(loop: Loop) -> None:
    loop.start_server()
    agent = loop.start_agent()
    v1 = loop.register()
    assert loop.deploy(v1).status == "promoted"
    v2 = loop.register()
    strict = parse_policy("name = 'impossible'\n[limits.p90_ms]\nmax = 0.000001\n")
    final = loop.deploy(v2, policy=strict)
    assert final.status == "rolled_back", final.reason
    assert final.verdict["verdict"] == "FAIL"
    assert "p90_ms" in final.verdict["reason"]
    assert final.policy["name"] == "impossible"  # the deployment keeps the policy it was gated with
    assert agent.model()["version"] == v1.version
    assert agent.recommend(loop.history(), k=3)["items"]
    assert loop.registry.device(DEVICE).active_version == v1.version


def test_unknown_device_is_refused_with_a_clear_message(loop: Loop) -> None:
    loop.start_server()
    record = loop.register()
    with pytest.raises(UnknownDeviceError, match=r"device 'ghost' has never been seen.*force"):
        loop.server.deploy(record.model_id, "ghost")
    assert loop.registry.deployments() == []


def _corrupt(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:]


def test_tampered_chunk_is_requested_again_and_the_deployment_completes(loop: Loop) -> None:
    tampered: list[int] = []

    def tamper_first_send_of_chunk_1(dep_id: str, index: int, data: bytes) -> bytes:
        if index == 1 and not tampered:
            tampered.append(index)
            return _corrupt(data)
        return data

    loop.start_server(chunk_transform=tamper_first_send_of_chunk_1)
    agent = loop.start_agent()
    record = loop.register()
    final = loop.deploy(record, chunk_size=32 * 1024)
    assert tampered == [1]
    assert final.status == "promoted", final.reason
    assert final.resends["1"] == 1 and final.resends["0"] == 0
    kinds = _event_kinds(loop.registry, final.deployment_id)
    assert "device:chunk_rejected" in kinds and "device:need_chunks" in kinds
    assert agent.model()["version"] == record.version


def test_chunk_corrupted_every_time_is_rejected_and_the_agent_keeps_its_model(loop: Loop) -> None:
    server = loop.start_server(deployer_config=DeployerConfig(max_resends=2))
    agent = loop.start_agent()
    v1 = loop.register()
    assert loop.deploy(v1).status == "promoted"
    server.deployer.chunk_transform = lambda dep_id, index, data: _corrupt(data) if index == 0 else data
    final = loop.deploy(loop.register(), chunk_size=32 * 1024)
    assert final.status == "rejected"
    assert "chunk 0 was requested again after 2 re-sends" in final.reason
    assert agent.model()["version"] == v1.version
    assert agent.recommend(loop.history(), k=3)["items"]


def test_model_the_runtime_cannot_load_is_refused_or_fails_with_the_load_error(
        loop: Loop, tmp_path: Path, tiny_artifacts: dict[str, Path]) -> None:
    loop.start_server()
    agent = loop.start_agent()
    v1 = loop.register()
    assert loop.deploy(v1).status == "promoted"
    bad = tmp_path / "op-version-99"  # FULLY_CONNECTED raised to version 99: a real op-version mismatch
    shutil.copytree(tiny_artifacts["opversion"], bad)
    runtime_key = loop.registry.device(DEVICE).runtime_key
    metrics = json.loads((bad / "metrics.json").read_text())
    metrics["runtimes"] = {runtime_key: {"loads": False, "error": "Didn't find op for builtin opcode "
                                                                  "'FULLY_CONNECTED' version '99'"}}
    (bad / "metrics.json").write_text(json.dumps(metrics))
    record = loop.register(bad)

    # The export-time check already says this runtime cannot load it: refused, and recorded why.
    with pytest.raises(IncompatibleRuntimeError, match=rf"does not load on {runtime_key}.*FULLY_CONNECTED"):
        loop.server.deploy(record.model_id, DEVICE, version=record.version)
    refused = loop.registry.deployments(limit=1)[0]
    assert refused.status == "rejected" and refused.reason.startswith("op_version:")

    # Forced anyway: the device tries, fails to load it, and the gate fails it with the device's error.
    final = loop.deploy(record, force=True)
    assert final.status == "rolled_back", final.reason
    assert final.report["load_ok"] is False and final.report["error_kind"] == "op_version"
    assert final.verdict["verdict"] == "FAIL"
    assert final.verdict["checks"][0]["name"] == "load"
    assert "op_version" in final.verdict["reason"] and "FULLY_CONNECTED" in final.verdict["reason"]
    assert agent.model()["version"] == v1.version


def test_a_restarted_server_finishes_the_deployment(loop: Loop) -> None:
    """Stop the server while the device measures; the report waits in the broker for the new server."""
    server = loop.start_server()
    loop.start_agent()
    record = loop.register()
    dep = server.deploy(record.model_id, DEVICE, version=record.version, wait_seen_s=10.0)
    _wait_until(lambda: loop.registry.deployment(dep.deployment_id).status in {"measuring", "passed"})
    server.stop()
    loop.registry.log_event("test:server-restarted", deployment_id=dep.deployment_id)
    loop.start_server()  # same data dir, same client id: a persistent session
    final = loop.server.wait(dep.deployment_id, TIMEOUT)
    assert final.status == "promoted", final.reason
    assert final.verdict["verdict"] == "PASS"
    kinds = _event_kinds(loop.registry, dep.deployment_id)
    assert kinds.index("test:server-restarted") < kinds.index("status:passed"), kinds  # gated by the new server


def _wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)
