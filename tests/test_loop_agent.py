"""The device agent in the whole loop, against the real mosquitto and real tiny LiteRT models.

The server side is played by `ServerPeer` (protocol/ directly); the agent is the real one, in
process for most tests and as a real subprocess (kill -9, SIGTERM) where process death matters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_agent_support import (
    TINY_MEASURE,
    ServerPeer,
    build_artifacts,
    new_keypair,
    staging_bitmap,
)

from agent.config import AgentConfig
from agent.daemon import Agent
from agent.measure import MeasureConfig
from agent.store import ModelStore
from agent.transfer import Receiver
from protocol import artifact, chunking
from protocol.states import AgentPhase
from protocol.topics import Topics

pytestmark = pytest.mark.network
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_artifacts(str(tmp_path_factory.getbasetemp() / "agent-artifacts"))


@pytest.fixture(scope="module")
def blobs(artifacts: dict[str, Path]) -> dict[str, bytes]:
    return {name: artifact.pack_artifact(path) for name, path in artifacts.items()}


class Rig:
    """One device: its config, its agent (in process) and the server stand-in talking to it."""

    def __init__(self, mosquitto_url: str, prefix: str, tmp: Path) -> None:
        self.tmp = tmp
        self.key, self.pub = new_keypair(tmp)
        self.device_id = f"dev-{uuid.uuid4().hex[:8]}"
        self.state_dir = tmp / "state"
        self.config = AgentConfig(device_id=self.device_id, broker_url=mosquitto_url, state_dir=self.state_dir,
                                  server_key=self.pub, topic_prefix=prefix, http_port=0, heartbeat_s=1.0,
                                  chunk_stall_s=1.0, verdict_timeout_s=60.0, measure_mode="quick")
        self.server = ServerPeer(mosquitto_url, Topics(prefix), self.device_id, self.key).start()
        self.agent: Agent | None = None

    def start(self, **changes: object) -> Agent:
        for name, value in changes.items():
            setattr(self.config, name, value)
        self.config.validate()
        self.agent = Agent(self.config, measure_config=MeasureConfig(**TINY_MEASURE), power_source=None)
        self.agent.start()
        self.server.wait_for("state", lambda s: s["status"] == "online")
        return self.agent

    def preinstall(self, blob: bytes, version: int, model_id: str = "tiny-float") -> None:
        """Make `blob` the active model before the agent starts (as a past deployment would have)."""
        store = ModelStore(self.state_dir)
        ref = store.install_candidate(blob, model_id=model_id, version=version, deployment_id="d-00000000000a",
                                      max_unpacked_bytes=64 << 20)
        store.promote(ref)

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        self.server.stop()


@pytest.fixture
def rig(mosquitto, topic_prefix: str, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(mosquitto.url, topic_prefix, tmp_path)
    yield r
    r.close()


def _http_recommend(port: int, history: list[str]) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", data=json.dumps({"history": history}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def test_signed_model_is_downloaded_measured_promoted_and_served(rig: Rig, blobs: dict[str, bytes],
                                                                 artifacts: dict[str, Path]) -> None:
    agent = rig.start()
    assert agent.active_model is None
    manifest = rig.server.deploy(blobs["float"], version=1)
    accepted = rig.server.wait_event("manifest_accepted", manifest.deployment_id)
    assert accepted["missing"] == list(range(manifest.chunk_count))
    report = rig.server.wait_for("report", lambda r: r["deployment_id"] == manifest.deployment_id)
    assert report["load_ok"] is True and report.get("error_kind") is None
    assert report["runtime"]["name"] == "ai-edge-litert"
    assert report["latency_ms"]["p50"] > 0 and report["latency_ms"]["n"] >= TINY_MEASURE["timed_min_runs"]
    assert report["quality"]["agreement_at_k"] == 1.0  # same runtime family as the export host
    assert report["model_bytes"] == (artifacts["float"] / "model.tflite").stat().st_size
    assert agent.active_model is None  # nothing is promoted before the verdict
    rig.server.send_verdict(manifest, "PASS")
    rig.server.wait_event("promoted", manifest.deployment_id)
    state = rig.server.wait_for("state", lambda s: s.get("active_version") == 1)
    assert state["active_model_id"] == "tiny-float" and state["status"] == "online"
    store = ModelStore(rig.state_dir)
    assert store.active().current.version == 1
    assert not store.staging(manifest.deployment_id).exists()
    items = json.loads((artifacts["float"] / "items.json").read_text())["items"]
    answer = _http_recommend(agent.http_port, [items[5][0], items[9][0]])
    assert answer["model"] == {"model_id": "tiny-float", "version": 1} and len(answer["items"]) == 10
    beat = rig.server.wait_for("heartbeat", lambda h: h.get("active_version") == 1, timeout=5)
    assert beat["uptime_s"] > 0


@pytest.mark.parametrize("case", ["unsigned", "wrong_key", "other_device", "older_version", "over_quota"])
def test_bad_manifests_are_rejected_before_any_download(rig: Rig, blobs: dict[str, bytes], case: str) -> None:
    from protocol.signing import generate_private_key

    if case == "older_version":
        rig.preinstall(blobs["float"], version=5)
    rig.start(quota_bytes=1000 if case == "over_quota" else 64 << 20)
    kwargs: dict = {"version": 3 if case == "older_version" else 7}
    if case == "unsigned":
        kwargs["key"] = False
    elif case == "wrong_key":
        kwargs["key"] = generate_private_key()
    elif case == "other_device":
        kwargs["device_id"] = "someone-else"
    manifest = rig.server.deploy(blobs["float"], **kwargs)
    event = rig.server.wait_event("manifest_rejected", manifest.deployment_id)
    expected = {"unsigned": "not signed", "wrong_key": "does not match the pinned server key",
                "other_device": "someone-else", "older_version": "not newer than the active version 5",
                "over_quota": "exceeds the device quota 1000"}[case]
    assert expected in event["reason"]
    assert [e["type"] for e in rig.server.events(manifest.deployment_id)] == ["manifest_rejected"]
    assert not (rig.state_dir / "staging" / manifest.deployment_id).exists()


def test_fail_verdict_discards_candidate_and_forged_verdicts_are_ignored(rig: Rig, blobs: dict[str, bytes]) -> None:
    from protocol.signing import generate_private_key

    rig.preinstall(blobs["float"], version=1)
    agent = rig.start()
    assert agent.active_model.version == 1
    manifest = rig.server.deploy(blobs["dynamic"], version=2, model_id="tiny-dyn")
    report = rig.server.wait_for("report", lambda r: r["deployment_id"] == manifest.deployment_id)
    assert report["load_ok"] is True
    assert report["paired"]["incumbent_version"] == 1 and report["paired"]["median_ratio_p50"] > 0
    rig.server.send_verdict(manifest, "PASS", key=False)
    assert "not signed" in rig.server.wait_event("verdict_rejected", manifest.deployment_id)["reason"]
    rig.server.send_verdict(manifest, "PASS", key=generate_private_key())
    rig.server.wait_for("event", lambda e: e["type"] == "verdict_rejected" and "pinned" in e["reason"])
    rig.server.send_verdict(manifest, "PASS", deployment_id="d-0123456789ab")
    rig.server.wait_event("verdict_rejected", "d-0123456789ab")
    assert agent.active_model.version == 1  # none of the forged PASSes promoted anything
    rig.server.send_verdict(manifest, "FAIL", reason="p90 too slow")
    event = rig.server.wait_event("rolled_back", manifest.deployment_id)
    assert "p90 too slow" in event["reason"]
    store = ModelStore(rig.state_dir)
    assert store.active().current.version == 1
    assert store.slot_contents(store.inactive_slot()) is None  # candidate slot emptied
    assert agent.service.model_info()["version"] == 1


def test_model_the_runtime_cannot_load_is_reported_and_incumbent_keeps_serving(rig: Rig,
                                                                              blobs: dict[str, bytes]) -> None:
    rig.preinstall(blobs["float"], version=1)
    agent = rig.start()
    manifest = rig.server.deploy(blobs["opversion"], version=2, model_id="tiny-dyn")
    report = rig.server.wait_for("report", lambda r: r["deployment_id"] == manifest.deployment_id)
    assert report["load_ok"] is False and report["error_kind"] == "op_version"
    assert "FULLY_CONNECTED version 99" in report["error"]
    assert report["runtime"] == {"name": "ai-edge-litert", "version": "2.3.0"}
    rig.server.wait_event("load_failed", manifest.deployment_id)
    rig.server.wait_event("rolled_back", manifest.deployment_id)
    assert agent.active_model.version == 1
    assert ModelStore(rig.state_dir).active().current.version == 1
    assert agent.service.recommend([], k=3)["model"]["version"] == 1


def test_corrupt_chunks_are_rejected_and_requested_again(rig: Rig, blobs: dict[str, bytes]) -> None:
    sent_bad: set[int] = set()

    def corrupt(dep: str, index: int, frame: bytes) -> bytes:
        if index in sent_bad:
            return frame
        sent_bad.add(index)
        if index == 1:  # a self-consistent frame whose data is not what the manifest signed
            pieces = chunking.split(rig.server.blobs[dep][0], rig.server.blobs[dep][1])
            return chunking.encode_chunk(dep, 1, len(pieces), b"x" * len(pieces[1]))
        if index == 2:  # bit rot in transit: the frame's own digest fails
            return frame[:-1] + bytes([frame[-1] ^ 0xFF])
        return frame

    rig.server.chunk_filter = corrupt
    rig.start()
    manifest = rig.server.deploy(blobs["float"], version=1, chunk_size=8192)
    need = rig.server.wait_for("event", lambda e: e["type"] == "need_chunks" and e.get("missing") == [1])
    assert need["deployment_id"] == manifest.deployment_id
    rejected = [e["reason"] for e in rig.server.events(manifest.deployment_id) if e["type"] == "chunk_rejected"]
    assert any("differs from the manifest" in r for r in rejected)
    rig.server.wait_for("event", lambda e: e["type"] == "chunk_rejected" and "does not match its digest" in e["reason"])
    # The frame with bit rot named no trustworthy index: the stall timer asks for what is missing.
    rig.server.wait_for("event", lambda e: e["type"] == "need_chunks" and 2 in (e.get("missing") or []))
    report = rig.server.wait_for("report", lambda r: r["deployment_id"] == manifest.deployment_id)
    assert report["load_ok"] is True


def test_no_verdict_in_time_discards_the_candidate(rig: Rig, blobs: dict[str, bytes]) -> None:
    agent = rig.start(verdict_timeout_s=1.0)
    manifest = rig.server.deploy(blobs["float"], version=1)
    rig.server.wait_for("report", lambda r: r["deployment_id"] == manifest.deployment_id)
    event = rig.server.wait_event("rolled_back", manifest.deployment_id, timeout=15)
    assert "no verdict" in event["reason"]
    assert agent.active_model is None and ModelStore(rig.state_dir).active() is None
    rig.server.send_verdict(manifest, "PASS")  # too late: ignored, nothing promoted
    time.sleep(0.5)
    assert agent.active_model is None


def test_corrupt_active_slot_falls_back_to_previous(rig: Rig, blobs: dict[str, bytes]) -> None:
    rig.preinstall(blobs["float"], version=1)
    rig.preinstall(blobs["dynamic"], version=2, model_id="tiny-dyn")
    store = ModelStore(rig.state_dir)
    pointer = store.active()
    assert (pointer.current.version, pointer.previous.version) == (2, 1)
    (store.model_dir(pointer.current) / "model.tflite").write_bytes(b"truncated")
    agent = rig.start()
    assert agent.active_model.version == 1 and agent.active_model.model_id == "tiny-float"
    assert store.active().current.version == 1
    assert "active model unusable" in agent.last_error
    rig.server.wait_for("state", lambda s: s.get("active_version") == 1)


# -- the agent as a real process ----------------------------------------------------------------

def _spawn(rig: Rig, ready: Path, modules: Path, log: Path) -> subprocess.Popen:
    ready.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "agent", "--device-id", rig.device_id, "--broker", rig.config.broker_url,
           "--state-dir", str(rig.state_dir), "--server-key", str(rig.pub), "--topic-prefix",
           rig.config.topic_prefix, "--http-port", "0", "--chunk-stall-s", "30", "--heartbeat-s", "5",
           "--once-ready-file", str(ready), "--debug-modules-file", str(modules), "--measure-mode", "quick"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "ab"), cwd=REPO)  # noqa: SIM115
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"agent did not get ready: {log.read_text()[-3000:]}")
        time.sleep(0.05)
    return proc


def _wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_download_resumes_after_kill_9_and_agent_never_loads_tensorflow(rig: Rig, blobs: dict[str, bytes]) -> None:
    ready, modules, log = rig.tmp / "ready.json", rig.tmp / "modules.txt", rig.tmp / "agent.log"
    rig.server.auto_chunks = False
    proc = _spawn(rig, ready, modules, log)
    manifest = rig.server.deploy(blobs["float"], version=1, chunk_size=8192)
    n = manifest.chunk_count
    assert n >= 6
    assert rig.server.wait_event("manifest_accepted", manifest.deployment_id)["missing"] == list(range(n))
    first = list(range(n // 2))
    rig.server.send_chunks(manifest.deployment_id, first)
    _wait_until(lambda: staging_bitmap(rig.state_dir, manifest.deployment_id).count("1") == len(first), 20,
                "the first half of the chunks on disk")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    rig.server.wait_for("state", lambda s: s["status"] == "offline")  # the Last Will
    mark = rig.server.mark()
    proc = _spawn(rig, ready, modules, log)
    try:
        need = rig.server.wait_event("need_chunks", manifest.deployment_id, start=mark)
        assert need["missing"] == list(range(len(first), n))  # nothing received before the kill is asked again
        rig.server.send_chunks(manifest.deployment_id, need["missing"])
        report = rig.server.wait_for("report", lambda r: r["deployment_id"] == manifest.deployment_id, timeout=60)
        assert report["load_ok"] is True and report["mode"] == "quick"
        rig.server.send_verdict(manifest, "PASS")
        rig.server.wait_event("promoted", manifest.deployment_id)
        port = json.loads(ready.read_text())["http_port"]
        assert _http_recommend(port, [])["model"]["version"] == 1
        mark = rig.server.mark()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    rig.server.wait_for("state", lambda s: s["status"] == "offline", start=mark)
    loaded = modules.read_text().split()
    assert "ai_edge_litert" in loaded and "agent.measure" in loaded and "agent.serving" in loaded
    assert not [m for m in loaded if m.split(".")[0] in {"tensorflow", "tf_keras", "keras"}]


def test_restart_after_promotion_but_before_cleanup_keeps_the_promotion(rig: Rig, blobs: dict[str, bytes]) -> None:
    manifest = rig.server.make_manifest(blobs["float"], version=4)
    store = ModelStore(rig.state_dir)
    Receiver.start(store, manifest)  # the finished download still on disk
    ref = store.install_candidate(blobs["float"], model_id="tiny-float", version=4,
                                  deployment_id=manifest.deployment_id, max_unpacked_bytes=64 << 20)
    store.promote(ref)  # ...and the process died right here
    agent = rig.start()
    event = rig.server.wait_event("promoted", manifest.deployment_id)
    assert "before a restart" in event["reason"]
    assert agent.active_model.version == 4
    # the outcome event goes out before the agent's bookkeeping (daemon._finish), so wait for the latter
    _wait_until(lambda: manifest.deployment_id in store.finished(), 10, "the deployment marked finished")
    _wait_until(lambda: not store.staging(manifest.deployment_id).exists(), 10, "the staging removed")
    assert not [e for e in rig.server.events(manifest.deployment_id) if e["type"] == "need_chunks"]


def _reports(rig: Rig, deployment_id: str, start: int = 0) -> int:
    with rig.server._cond:
        return sum(1 for m in rig.server.received[start:] if m.kind == "report"
                   and m.json["deployment_id"] == deployment_id)


def _start_with_resend(rig: Rig, resend_s: float) -> Agent:
    rig.config.validate()
    rig.agent = Agent(rig.config, measure_config=MeasureConfig(**TINY_MEASURE), power_source=None,
                      report_resend_s=resend_s)
    rig.agent.start()
    rig.server.wait_for("state", lambda s: s["status"] == "online")
    return rig.agent


def test_unanswered_report_is_sent_again_until_the_verdict_comes(rig: Rig, blobs: dict[str, bytes]) -> None:
    """A report the broker dropped (no subscriber yet after a restart) must not strand the deployment."""
    agent = _start_with_resend(rig, 0.3)
    manifest = rig.server.deploy(blobs["float"], version=1)
    first = rig.server.wait_for("report", lambda r: r["deployment_id"] == manifest.deployment_id)
    _wait_until(lambda: _reports(rig, manifest.deployment_id) >= 3, 10, "two re-sent reports")
    assert first["load_ok"] is True
    rig.server.send_verdict(manifest, "PASS")
    rig.server.wait_event("promoted", manifest.deployment_id)
    assert agent.active_model is not None and agent.active_model.version == 1
    after = _reports(rig, manifest.deployment_id)
    time.sleep(1.0)
    assert _reports(rig, manifest.deployment_id) == after  # answered: no more re-sends


def test_report_is_sent_again_after_a_reconnect(rig: Rig, blobs: dict[str, bytes]) -> None:
    agent = _start_with_resend(rig, 3600.0)
    manifest = rig.server.deploy(blobs["float"], version=1)
    rig.server.wait_for("report", lambda r: r["deployment_id"] == manifest.deployment_id)
    _wait_until(lambda: not agent.outbox.pending(), 10, "the report acknowledged by the broker")
    mark = rig.server.mark()
    agent.link._client.socket().shutdown(socket.SHUT_RDWR)  # the connection dies under the agent
    again = rig.server.wait_for("report", lambda r: r["deployment_id"] == manifest.deployment_id, start=mark,
                                timeout=20)
    assert again["version"] == 1 and again["load_ok"] is True
    rig.server.send_verdict(manifest, "PASS")
    rig.server.wait_event("promoted", manifest.deployment_id)


def test_candidate_whose_golden_set_breaks_evaluation_is_reported_and_incumbent_keeps_serving(
        rig: Rig, blobs: dict[str, bytes], artifacts: dict[str, Path]) -> None:
    """An exception while evaluating used to leave no report: the server waited for its deadline."""
    broken = rig.tmp / "broken-golden"
    shutil.copytree(artifacts["float"], broken)
    golden = json.loads((broken / artifact.GOLDEN_FILE).read_text())
    golden["histories"][0][-1] = 2 ** 40  # an item id no int32 tensor can hold
    (broken / artifact.GOLDEN_FILE).write_text(json.dumps(golden))
    rig.preinstall(blobs["float"], version=1)
    agent = rig.start()
    manifest = rig.server.deploy(artifact.pack_artifact(broken), version=2)
    report = rig.server.wait_for("report", lambda r: r["deployment_id"] == manifest.deployment_id)
    assert report["load_ok"] is False and report["error_kind"] == "load_error"
    assert "golden.json unusable: OverflowError" in report["error"]
    rig.server.wait_event("load_failed", manifest.deployment_id)
    rig.server.wait_event("rolled_back", manifest.deployment_id)
    # the outcome event goes out before the agent's bookkeeping (daemon._finish), so wait for the latter
    _wait_until(lambda: agent.deployment is None, 10, "the agent to drop the deployment")
    assert manifest.deployment_id in ModelStore(rig.state_dir).finished()
    store = ModelStore(rig.state_dir)
    assert store.active().current.version == 1 and store.slot_contents(store.inactive_slot()) is None
    assert _http_recommend(agent.http_port, [])["model"]["version"] == 1  # the incumbent never stopped


def test_configured_mqtt_protocol_and_report_resend_reach_the_running_agent(rig: Rig,
                                                                          blobs: dict[str, bytes]) -> None:
    agent = rig.start(mqtt_protocol="3.1.1", report_resend_s=0.3)
    assert agent.link.connected and agent.link.is_v5 is False  # mosquitto speaks 5: only the config chose 3.1.1
    manifest = rig.server.deploy(blobs["float"], version=1)
    rig.server.wait_for("report", lambda r: r["deployment_id"] == manifest.deployment_id)
    _wait_until(lambda: _reports(rig, manifest.deployment_id) >= 3, 10, "reports re-sent every 0.3 s")


def test_stop_during_a_measurement_leaves_the_deployment_to_the_busy_worker(rig: Rig, blobs: dict[str, bytes]) -> None:
    """stop(timeout) returns on time while a measurement runs, and touches nothing the worker owns;
    the worker finishes the job, then releases the candidate itself."""
    from agent.measure import measure_model

    started, release = threading.Event(), threading.Event()

    def held_measure(*args: object, **kwargs: object) -> dict:
        started.set()
        release.wait(60)
        return measure_model(*args, **kwargs)  # the real measurement, only later

    rig.preinstall(blobs["float"], version=1)  # the incumbent the paired comparison will use
    rig.config.validate()
    agent = rig.agent = Agent(rig.config, measure=held_measure, measure_config=MeasureConfig(**TINY_MEASURE),
                              power_source=None)
    agent.start()
    rig.server.wait_for("state", lambda s: s["status"] == "online")
    manifest = rig.server.deploy(blobs["float"], version=2)
    assert started.wait(60), "the measurement never started"
    began = time.monotonic()
    agent.stop(timeout=0.5)
    assert agent.stopped.is_set() and time.monotonic() - began < 15
    dep = agent.deployment
    assert dep is not None and dep.phase is AgentPhase.MEASURING  # left as the running job has it
    assert agent.active_model is not None and agent.active_model.version == 1  # not closed under the job
    assert agent.worker.alive
    assert ModelStore(rig.state_dir).staging(manifest.deployment_id).exists()
    release.set()
    _wait_until(lambda: not agent.worker.alive, 60, "the worker to finish the measurement and end")
    assert agent.active_model is None and agent.deployment is not None  # released by the worker's close job
    assert agent.deployment.loaded is None
