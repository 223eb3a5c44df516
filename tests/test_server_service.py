"""The server process without an agent: ingestion, malformed traffic, timeouts, manifests, the amqtt broker."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocol import chunking, signing
from protocol.messages import Command, DeviceState, Event, Heartbeat, Manifest, Report, Verdict
from protocol.mqtt import MqttLink
from protocol.topics import Topics
from server import keys
from server.deployer import Deployer, DeployerConfig, DeployError, runtime_incompatibility
from server.embedded_broker import EmbeddedBroker
from server.keys import key_paths
from server.policy import parse_policy
from server.registry import Registry
from server.service import EdgeGuideServer, ServerConfig

pytestmark = pytest.mark.network


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path, mosquitto, topic_prefix: str) -> Iterator[EdgeGuideServer]:
    """A started server; parametrize indirectly with a deployment deadline in seconds (default 60)."""
    deadline = getattr(request, "param", 60.0)
    srv = EdgeGuideServer(Registry(tmp_path / "data"),
                          ServerConfig(broker_url=mosquitto.url, topic_prefix=topic_prefix,
                                       client_id=f"srv-{topic_prefix}", tick_s=0.1),
                          deployer_config=DeployerConfig(deadline_s=deadline)).start()
    yield srv
    srv.stop()


def test_state_and_heartbeat_are_recorded(server: EdgeGuideServer, device_link: MqttLink) -> None:
    topics = server.topics
    state = DeviceState(device_id="pi-7", status="online", active_model_id="m", active_version=4,
                        runtime={"name": "tflite-runtime", "version": "2.14.0"}, agent_version="0.1.0")
    device_link.publish(topics.up("pi-7", "state"), state.to_json(), retain=True).wait(5)
    _until(lambda: server.registry.find_device("pi-7") is not None)
    assert server.registry.device("pi-7").runtime_key == "tflite-runtime==2.14.0"
    beat = Heartbeat(device_id="pi-7", uptime_s=33.0, active_version=4, last_error="sensor missing")
    device_link.publish(topics.up("pi-7", "heartbeat"), beat.to_json())
    _until(lambda: server.registry.device("pi-7").uptime_s == 33.0)
    assert server.registry.device("pi-7").last_error == "sensor missing"
    offline = DeviceState(device_id="pi-7", status="offline")
    device_link.publish(topics.up("pi-7", "state"), offline.to_json(), retain=True)
    _until(lambda: server.registry.device("pi-7").status == "offline")
    device_link.publish(topics.up("pi-7", "state"), b"", retain=True)  # clear the retained message


def test_malformed_traffic_is_logged_recorded_and_survived(server: EdgeGuideServer, device_link: MqttLink,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    topics = server.topics
    bad = [
        (topics.up("pi-8", "report"), b"\xff\xfe not utf-8"),
        (topics.up("pi-8", "state"), DeviceState(device_id="someone-else", status="online").to_json()),
        (topics.up("pi-8", "event"), b'{"device_id": "pi-8", "type": "exploded"}'),
        (topics.up("pi-8", "heartbeat"), b"[1, 2, 3]"),
        (topics.up("pi-8", "heartbeat"), b'{"device_id": "pi-8", "uptime_s": 1, "pad": "' + b"x" * 300_000 + b'"}'),
        (f"{topics.prefix}/dev/bad!id/up/state", b"{}"),
    ]
    for topic, payload in bad:
        device_link.publish(topic, payload)
    _until(lambda: server.malformed == len(bad))
    recorded = server.registry.events(kind_prefix="malformed")
    assert len(recorded) == len(bad)
    assert any("claims device_id 'someone-else'" in e["detail"] for e in recorded)
    assert any("exploded" in e["detail"] for e in recorded)
    assert "malformed message on" in caplog.text
    # An event about a deployment this server never made is recorded, not acted on.
    stray = Event(device_id="pi-8", type="promoted", deployment_id="d-0123456789ab", version=3)
    device_link.publish(topics.up("pi-8", "event"), stray.to_json())
    _until(lambda: bool(server.registry.events(kind_prefix="unknown_deployment")))
    # ... and the server still works.
    device_link.publish(topics.up("pi-8", "state"), DeviceState(device_id="pi-8", status="online").to_json())
    _until(lambda: server.registry.find_device("pi-8") is not None)


@pytest.mark.parametrize("server", [1.0], indirect=True)
def test_overdue_deployment_times_out_and_the_device_is_told_to_cancel(
        server: EdgeGuideServer, device_link: MqttLink, tiny_artifact: Path) -> None:
    """A device that never answers: the deployment ends `timeout` and a signed cancel goes down."""
    commands: queue.Queue[bytes] = queue.Queue()
    device_link.subscribe(server.topics.down("pi-9", "command"), lambda _t, p: commands.put(p))
    time.sleep(0.3)  # let the SUBSCRIBE land
    record = server.registry.register(tiny_artifact)
    dep = server.deploy(record.model_id, "pi-9", force=True)  # never seen: forced
    final = server.wait(dep.deployment_id, timeout=20)
    assert final.status == "timeout" and "last status transferring" in final.reason
    cancel = Command.from_json(commands.get(timeout=10))
    cancel.verify(signing.load_public_key(key_paths(server.registry.data_dir)[1]))
    assert (cancel.command, cancel.deployment_id) == ("cancel", dep.deployment_id)


def test_manifest_is_signed_deterministic_and_matches_the_chunks(tmp_path: Path, tiny_artifact: Path) -> None:
    registry = Registry(tmp_path)
    srv = EdgeGuideServer(registry, ServerConfig(broker_url="mqtt://127.0.0.1:1", topic_prefix="t"))
    record = registry.register(tiny_artifact)
    dep = srv.deployer.create(record.model_id, "pi-1", force=True, chunk_size=50_000)
    manifest = srv.deployer.manifest(dep)
    again = srv.deployer.manifest(registry.deployment(dep.deployment_id))
    assert manifest.to_json() == again.to_json()  # a re-sent manifest resumes the device's download
    decoded = Manifest.from_json(manifest.to_json())
    decoded.verify(signing.load_public_key(key_paths(tmp_path)[1]))
    blob = record.packed_path.read_bytes()
    assert decoded.sha256 == hashlib.sha256(blob).hexdigest() and decoded.total_size == len(blob)
    assert decoded.chunk_sha256 == chunking.digests(blob, 50_000)
    assert decoded.requirements["ops"] == record.metrics["ops"]
    assert decoded.version == record.version


def _recording_deployer(registry: Registry, data_dir: Path) -> tuple[Deployer, list[tuple[str, bytes]]]:
    """A deployer whose publishes land in the returned list (topic, payload), prefix "t"."""
    sent: list[tuple[str, bytes]] = []
    policy = parse_policy('name = "t"\n[limits.agreement_at_k]\nmin = 0.9\nrequired = true\n', "t")
    return Deployer(registry, keys.server_key(data_dir), lambda t, p: sent.append((t, p)), topics=Topics("t"),
                    policy=policy), sent


@pytest.mark.parametrize("chunk_size", [None, 50_000], ids=["recorded-digests", "whole-file-digest"])
def test_a_corrupted_registry_copy_is_never_sent(tmp_path: Path, tiny_artifact: Path, chunk_size: int | None) -> None:
    registry = Registry(tmp_path)
    deployer, _ = _recording_deployer(registry, tmp_path)
    record = registry.register(tiny_artifact)
    size = chunk_size or deployer.config.chunk_size
    # registration records the chunk digests of the default size only; other sizes check the whole file
    blob = record.packed_path.read_bytes()
    assert registry.chunk_digests(record, size) == (chunking.digests(blob, size) if chunk_size is None else None)
    corrupt = bytearray(blob)
    corrupt[len(corrupt) // 2] ^= 0x01
    record.packed_path.write_bytes(bytes(corrupt))
    with pytest.raises(DeployError, match="registry copy is corrupt"):
        # recorded digests: each chunk is checked as it is first sent; otherwise before any is
        deployer.prepare(record, size).checked_piece(len(blob) // 2 // size)
    record.packed_path.write_bytes(blob)
    deployer, _ = _recording_deployer(registry, tmp_path)  # a fresh cache reads the repaired copy
    prepared = deployer.prepare(record, size)
    assert [bytes(prepared.checked_piece(i)) for i in range(len(prepared.pieces))] == chunking.split(blob, size)
    assert prepared.digests == chunking.digests(blob, size) and not prepared.unchecked


def test_a_copy_corrupted_after_the_manifest_went_out_is_cancelled_not_sent(tmp_path: Path,
                                                                            tiny_artifact: Path) -> None:
    registry = Registry(tmp_path)
    deployer, sent = _recording_deployer(registry, tmp_path)
    record = registry.register(tiny_artifact)
    blob = record.packed_path.read_bytes()
    assert len(blob) > 2 * deployer.config.chunk_size
    record.packed_path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))  # the last chunk no longer matches
    dep = deployer.create(record.model_id, "pi-12", force=True)
    assert deployer.start(dep.deployment_id)  # the manifest comes from the digests recorded at registration
    manifest = Manifest.from_json(sent[0][1])
    assert [t for t, _ in sent] == ["t/dev/pi-12/down/manifest"]
    assert manifest.chunk_sha256 == chunking.digests(blob, deployer.config.chunk_size)
    deployer.handle_event(Event(device_id="pi-12", type="manifest_accepted", deployment_id=dep.deployment_id,
                                missing=list(range(manifest.chunk_count))))
    final = registry.deployment(dep.deployment_id)
    assert final.status == "rejected" and "registry copy is corrupt" in final.reason
    chunks = [chunking.decode_chunk(p) for t, p in sent if t.endswith("/chunk")]
    assert [c.index for c in chunks] == list(range(manifest.chunk_count - 1))  # the corrupt one never left
    assert all(c.digest.hex() == manifest.chunk_sha256[c.index] for c in chunks)
    assert sent[-1][0] == "t/dev/pi-12/down/command" and Command.from_json(sent[-1][1]).command == "cancel"
    deployer.close()


def test_runtime_compatibility_from_metrics(tmp_path: Path, tiny_artifact: Path) -> None:
    record = Registry(tmp_path).register(tiny_artifact)
    metrics = dict(record.metrics, runtimes={
        "tflite-runtime==2.14.0": {"loads": False, "error": "Didn't find op ... version '12'"},
        "ai-edge-litert==2.3.0": {"loads": True, "error": None},
    })
    record = type(record)(**{**record.__dict__, "metrics": metrics})
    assert "version '12'" in runtime_incompatibility(record, "tflite-runtime==2.14.0")
    assert runtime_incompatibility(record, "ai-edge-litert==2.3.0") is None
    assert runtime_incompatibility(record, "unknown-runtime==1") is None  # unknown: the device will find out
    assert runtime_incompatibility(record, None) is None


def test_deployer_config_is_validated() -> None:
    with pytest.raises(ValueError, match="chunk_size must be in"):
        DeployerConfig(chunk_size=0)
    with pytest.raises(ValueError, match="deadline_s must be > 0"):
        DeployerConfig(deadline_s=0)


def test_server_runs_on_the_embedded_amqtt_broker(tmp_path: Path) -> None:
    """MQTT 3.1.1 only (no shared subscriptions): the server falls back to it and still ingests device traffic."""
    with EmbeddedBroker(log_path=tmp_path / "amqtt.log") as broker:
        pid = broker.proc.pid
        srv = EdgeGuideServer(Registry(tmp_path / "data"), ServerConfig(broker_url=broker.url, topic_prefix="amq"))
        srv.start()
        link = MqttLink(broker.url, "amqtt-dev", clean_start=True, protocol="3.1.1")
        try:
            link.start()
            assert not link.is_v5 and not srv.link.is_v5
            link.publish(Topics("amq").up("pi-a", "state"),
                         DeviceState(device_id="pi-a", status="online").to_json(), retain=True)
            _until(lambda: srv.registry.find_device("pi-a") is not None)
        finally:
            link.stop()
            srv.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the broker process is gone


def test_manifest_too_big_for_the_device_is_rejected_with_the_fix(server: EdgeGuideServer,
                                                                   tiny_artifact: Path) -> None:
    record = server.registry.register(tiny_artifact)
    dep = server.deploy(record.model_id, "pi-10", force=True, chunk_size=16)
    final = server.wait(dep.deployment_id, timeout=10)
    assert final.status == "rejected"
    assert "exceeds the device limits" in final.reason and "larger chunk size than 16" in final.reason


def test_a_repeated_report_is_gated_once_and_answered_with_the_same_verdict(tmp_path: Path,
                                                                             tiny_artifact: Path) -> None:
    """Agents re-send an unanswered report (a broker restart can drop it): one gate run, one verdict."""
    registry = Registry(tmp_path)
    deployer, sent = _recording_deployer(registry, tmp_path)
    record = registry.register(tiny_artifact)
    dep = deployer.create(record.model_id, "pi-11", force=True)
    assert deployer.start(dep.deployment_id)
    report = Report(device_id="pi-11", deployment_id=dep.deployment_id, model_id=record.model_id,
                    version=record.version, load_ok=True, mode="quick", quality={"agreement_at_k": 1.0})
    for _ in range(3):
        deployer.handle_report(report)
    verdicts = [p for t, p in sent if t.endswith("/verdict")]
    decoded = [Verdict.from_json(v) for v in verdicts]
    assert len(decoded) == 3 and all(v == decoded[0] for v in decoded)  # the same signed verdict each time
    for v in decoded:
        v.verify(signing.load_public_key(key_paths(tmp_path)[1]))
    assert decoded[0].verdict == "PASS"
    assert registry.deployment(dep.deployment_id).status == "passed"
    assert [e["kind"] for e in registry.events(deployment_id=dep.deployment_id)].count("status:passed") == 1
    # report files are written on the deployer's report thread, in order; wait_reports() drains it
    deployer.handle_event(Event(device_id="pi-11", type="promoted", deployment_id=dep.deployment_id,
                                version=record.version))
    deployer.wait_reports()
    stored = json.loads((registry.reports_dir / dep.deployment_id / "report.json").read_text())
    assert stored["deployment"]["status"] == "promoted" and stored["verdict"]["verdict"] == "PASS"
    deployer.close()
