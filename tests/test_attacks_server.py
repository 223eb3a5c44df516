"""A device attacking the real server: forged reports, floods, oversized and undecodable payloads.

The server is the real `EdgeGuideServer` (registry, deployer, gate) on the session's real
mosquitto; the device side is a raw MQTT client, because an attacker does not run our agent.
The `serve` command and the agent run as real processes where what they print is the point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from attack_support import wait_until

from protocol.messages import DeviceState, Event, Heartbeat, Report
from protocol.mqtt import MqttLink
from server.deployer import DeployerConfig
from server.mosquitto import free_port
from server.registry import Registry
from server.service import EdgeGuideServer, ServerConfig

pytestmark = pytest.mark.network
REPO = Path(__file__).resolve().parents[1]
SECRET = "S3cret-Broker-Pw"


def _until(condition: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> object:
    return wait_until(condition, timeout, what)


def _server(data: Path, mosquitto, prefix: str, limits: object = None) -> EdgeGuideServer:
    extra = {"ingest_limits": limits} if limits is not None else {}
    server = EdgeGuideServer(Registry(data), ServerConfig(broker_url=mosquitto.url, topic_prefix=prefix,
                                                          client_id=f"srv-{prefix}", tick_s=0.1),
                             deployer_config=DeployerConfig(deadline_s=120), **extra).start()
    # start() returns once SUBSCRIBE is sent, not acknowledged: a device message published right
    # away can reach the broker first and be lost (seen under load). One round trip proves it.
    probe = MqttLink(mosquitto.url, f"probe-{prefix}", clean_start=True)
    probe.start()
    try:
        deadline = time.monotonic() + 60
        while server.registry.find_device(f"probe-{prefix}") is None:
            assert time.monotonic() < deadline, "the server never received a message after start()"
            probe.publish(server.topics.up(f"probe-{prefix}", "heartbeat"),
                          Heartbeat(device_id=f"probe-{prefix}", uptime_s=1.0).to_json()).wait(5)
            time.sleep(0.2)
    finally:
        probe.stop()
    return server


@pytest.fixture
def device(mosquitto, topic_prefix: str) -> Iterator[MqttLink]:
    link = MqttLink(mosquitto.url, f"dev-{topic_prefix}", clean_start=True)
    link.start()
    yield link
    link.stop()


def _drain(server: EdgeGuideServer, device: MqttLink, tag: str) -> None:
    """Wait until the server's worker handled everything `device` sent so far (same connection: in order)."""
    marker = float(int(time.time() * 1000) % 10**6) + 0.5
    device.publish(server.topics.up(f"marker-{tag}", "heartbeat"),
                   Heartbeat(device_id=f"marker-{tag}", uptime_s=marker).to_json()).wait(5)
    _until(lambda: (d := server.registry.find_device(f"marker-{tag}")) is not None and d.uptime_s == marker,
           60, "the server to catch up")


# -- 1. a report never changes a finished deployment ---------------------------------------------------
def test_a_report_for_a_finished_deployment_changes_nothing_also_after_a_restart(
        tmp_path: Path, mosquitto, topic_prefix: str, device: MqttLink, tiny_artifact: Path) -> None:
    data = tmp_path / "data"
    server = _server(data, mosquitto, topic_prefix)
    topics = server.topics
    verdicts: list[bytes] = []
    device.subscribe(topics.down("pi-x", "verdict"), lambda _t, p: verdicts.append(p))
    try:
        artifact = server.registry.register(tiny_artifact)
        state = DeviceState(device_id="pi-x", status="online", runtime={"name": "ai-edge-litert", "version": "2.3.0"})
        device.publish(topics.up("pi-x", "state"), state.to_json()).wait(5)
        _until(lambda: server.registry.find_device("pi-x"), what="the device")
        dep = server.deploy(artifact.model_id, "pi-x")
        rejected = Event(device_id="pi-x", type="manifest_rejected", deployment_id=dep.deployment_id,
                         reason="bad signature")
        device.publish(topics.up("pi-x", "event"), rejected.to_json()).wait(5)
        _until(lambda: server.registry.deployment(dep.deployment_id).status == "rejected", what="rejected")
        before = server.registry.deployment(dep.deployment_id)
        forged = Report(device_id="pi-x", deployment_id=dep.deployment_id, model_id=artifact.model_id,
                        version=artifact.version, load_ok=True, mode="quick",
                        latency_ms={"p50": 0.1, "p90": 0.1, "p99": 0.1}, memory={"peak_rss_mb": 1.0},
                        model_bytes=1000, quality={"agreement_top10": 1.0})
        device.publish(topics.up("pi-x", "report"), forged.to_json()).wait(5)
        _drain(server, device, topic_prefix)
        after = server.registry.deployment(dep.deployment_id)
        assert (after.status, after.verdict, after.report, after.reason) == \
            (before.status, None, None, before.reason), f"a report changed finished {dep.deployment_id}: {after}"
        assert any(e["kind"] == "report_ignored" for e in server.registry.events(deployment_id=dep.deployment_id))
    finally:
        server.stop()
        server.registry.close()
    # A restarted server resumes what is recorded, and a replayed report still changes nothing.
    server = _server(data, mosquitto, topic_prefix)
    try:
        device.publish(topics.up("pi-x", "report"), forged.to_json()).wait(5)
        _drain(server, device, topic_prefix + "-2")
        after = server.registry.deployment(dep.deployment_id)
        assert (after.status, after.verdict, after.report) == ("rejected", None, None), after
        # A marker sent by the server's own connection after it handled the report, on the verdict topic:
        # once it is here, any verdict published before it would be too.
        marker = f"marker-{uuid.uuid4().hex[:8]}".encode()
        server.link.publish(topics.down("pi-x", "verdict"), marker)
        _until(lambda: marker in verdicts, what="the marker on the verdict topic")
        verdicts.remove(marker)
        assert verdicts == [], f"the server sent a verdict for a rejected deployment: {verdicts}"
    finally:
        server.stop()
        server.registry.close()


# -- 3. what one device can write is bounded -----------------------------------------------------------
def test_an_event_flood_is_rate_limited_bounded_in_size_and_pruned(tmp_path: Path, mosquitto, topic_prefix: str,
                                                                   device: MqttLink) -> None:
    from server.ingest import IngestLimits

    limits = IngestLimits(burst=40, per_second=5.0, max_events_per_device=60, prune_interval_s=0.5)
    server = _server(tmp_path / "data", mosquitto, topic_prefix, limits)
    try:
        topic = server.topics.up("pi-flood", "event")
        started = time.monotonic()
        for i in range(1000):
            event = Event(device_id="pi-flood", type="error", reason=f"{i:04d}" + "x" * 3996)
            device.publish(topic, event.to_json())
        _drain(server, device, topic_prefix)
        elapsed = time.monotonic() - started
        rows = server.registry.events(device_id="pi-flood", limit=100_000)
        stored = sum(len(r["detail"]) for r in rows)
        allowed = limits.burst + limits.per_second * elapsed + 5
        assert len(rows) <= allowed, f"{len(rows)} event rows from one device in {elapsed:.1f} s, {allowed:.0f} allowed"
        assert max(len(r["detail"]) for r in rows) <= limits.max_detail_chars, "a stored reason is not bounded"
        assert stored <= allowed * limits.max_detail_chars
        assert any(r["kind"] == "rate_limited" for r in rows), [r["kind"] for r in rows][:20]
        # Retention: the periodic prune keeps only the newest rows of each device.
        _until(lambda: len(server.registry.events(device_id="pi-flood", limit=100_000))
               <= limits.max_events_per_device, 10, "the prune")
        # A fresh device (its own budget): what one state or heartbeat can store is bounded too.
        big_state = DeviceState(device_id="pi-big", status="online", agent_version="1",
                                runtime={"name": "r", "version": "1", "junk": "y" * 200_000})
        device.publish(server.topics.up("pi-big", "state"), big_state.to_json()).wait(5)
        beat = Heartbeat(device_id="pi-big", uptime_s=1.0, last_error="e" * 4000)
        device.publish(server.topics.up("pi-big", "heartbeat"), beat.to_json()).wait(5)
        record = _until(lambda: (d := server.registry.find_device("pi-big")) is not None and d.last_error and d,
                        what="pi-big's heartbeat")
        assert len(json.dumps(record.runtime)) <= limits.max_runtime_chars, len(json.dumps(record.runtime))
        assert len(record.last_error) <= limits.max_detail_chars
    finally:
        server.stop()
        server.registry.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_retention_deletes_old_events_and_keeps_each_devices_newest(request: pytest.FixtureRequest, tmp_path: Path,
                                                                   engine: str) -> None:
    registry = Registry(tmp_path / "data") if engine == "sqlite" else request.getfixturevalue("pg_registry")
    try:
        registry.log_event("device:error", device_id="pi-old", detail="old")
        registry.db.execute("UPDATE events SET ts = ts - ?", (10 * 86400,))
        for i in range(5):
            registry.log_event("device:error", device_id="pi-old", detail=f"new-{i}")
            registry.log_event("device:error", device_id="pi-other", detail=f"other-{i}")
        registry.log_event("registered", detail="server-side, no device")
        assert registry.prune_events(max_per_device=3, max_age_s=86400) == 1 + 2 + 2
        assert [e["detail"] for e in registry.events(device_id="pi-old")] == ["new-2", "new-3", "new-4"]
        assert [e["detail"] for e in registry.events(device_id="pi-other")] == ["other-2", "other-3", "other-4"]
        assert [e["detail"] for e in registry.events(kind_prefix="registered")] == ["server-side, no device"]
    finally:
        if engine == "sqlite":
            registry.close()


# -- 4. every undecodable payload is "malformed", never a traceback ---------------------------------------
UNDECODABLE = {
    "int beyond 4300 digits": b'{"device_id": "pi-m", "type": "error", "version": ' + b"9" * 5000 + b"}",
    "nested 100k deep": b"[" * 100_000 + b"]" * 100_000,
    "float overflowing to inf": b'{"device_id": "pi-m", "deployment_id": "d-0123456789ab", "model_id": "m", '
                                b'"version": 1, "load_ok": true, "latency_ms": {"p90": 1e999}}',
    "not utf-8": b"\xff\xfe{}",
}


def test_undecodable_payloads_are_malformed_not_tracebacks(tmp_path: Path, mosquitto, topic_prefix: str,
                                                           device: MqttLink,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    server = _server(tmp_path / "data", mosquitto, topic_prefix)
    try:
        kinds = ["event", "report", "report", "state"]
        for kind, payload in zip(kinds, UNDECODABLE.values(), strict=True):
            device.publish(server.topics.up("pi-m", kind), payload).wait(5)
        _drain(server, device, topic_prefix)
        kinds_logged = [e["kind"] for e in server.registry.events(limit=1000)]
        assert "handler_error" not in kinds_logged, [e["detail"] for e in server.registry.events(limit=1000)
                                                     if e["kind"] == "handler_error"]
        assert kinds_logged.count("malformed") == len(UNDECODABLE), kinds_logged
        assert server.malformed == len(UNDECODABLE)
        assert not [r for r in caplog.records if r.exc_info], [r.getMessage()[:200] for r in caplog.records
                                                               if r.exc_info]
    finally:
        server.stop()
        server.registry.close()


def test_a_report_with_a_huge_integer_figure_is_malformed_not_a_gate_crash(
        tmp_path: Path, mosquitto, topic_prefix: str, device: MqttLink, tiny_artifact: Path) -> None:
    """4,000 digits pass Python's limit but not float(): the gate used to raise OverflowError."""
    server = _server(tmp_path / "data", mosquitto, topic_prefix)
    try:
        artifact = server.registry.register(tiny_artifact)
        state = DeviceState(device_id="pi-g", status="online", runtime={"name": "ai-edge-litert", "version": "2.3.0"})
        device.publish(server.topics.up("pi-g", "state"), state.to_json()).wait(5)
        _until(lambda: server.registry.find_device("pi-g"), what="the device")
        dep = server.deploy(artifact.model_id, "pi-g")
        _until(lambda: server.registry.deployment(dep.deployment_id).status == "transferring", what="transferring")
        body = Report(device_id="pi-g", deployment_id=dep.deployment_id, model_id=artifact.model_id,
                      version=artifact.version, load_ok=True, latency_ms={"p90": 1.0}).to_dict()
        payload = json.dumps(body).replace('"p90": 1.0', '"p90": ' + "9" * 4000).encode()
        device.publish(server.topics.up("pi-g", "report"), payload).wait(5)
        _drain(server, device, topic_prefix)
        kinds = [e["kind"] for e in server.registry.events(limit=1000)]
        assert "handler_error" not in kinds, [e["detail"][:200] for e in server.registry.events(limit=1000)
                                              if e["kind"] == "handler_error"]
        assert "malformed" in kinds
        after = server.registry.deployment(dep.deployment_id)
        assert (after.status, after.report, after.verdict) == ("transferring", None, None), after
    finally:
        server.stop()
        server.registry.close()


# -- 2. no secret in what the server prints -----------------------------------------------------------
def _serve(args: list[str], env: dict[str, str] | None = None, timeout: float = 60.0) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "server", *args], cwd=REPO, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_serve_never_prints_the_broker_password(tmp_path: Path, mosquitto) -> None:
    url = f"mqtt://edge:{SECRET}@127.0.0.1:{mosquitto.port}"
    proc = _serve(["-v", "--data-dir", str(tmp_path / "d"), "serve", "--broker", url, "--client-id",
                   f"srv-{uuid.uuid4().hex[:6]}"])
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "serving on" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines) + out
    assert "serving on mqtt://edge:***@127.0.0.1" in text, text[-2000:]
    assert SECRET not in text, f"serve printed its broker password:\n{text[-2000:]}"
    # A URL the parser refuses, and the --help text with the secret in the environment.
    bad = _serve(["--data-dir", str(tmp_path / "d"), "serve", "--broker", f"mqtx://edge:{SECRET}@host:1"])
    bad_out, _ = bad.communicate(timeout=60)
    assert bad.returncode == 2 and "mqtx://edge:***@host:1" in bad_out and SECRET not in bad_out, bad_out
    helped = _serve(["serve", "--help"], env={"EDGEGUIDE_BROKER": url,
                                              "EDGEGUIDE_DATABASE": f"postgresql://u:{SECRET}@h/db"})
    help_out, _ = helped.communicate(timeout=60)
    assert helped.returncode == 0 and SECRET not in help_out, help_out


def test_the_agent_never_prints_the_broker_password(tmp_path: Path) -> None:
    from test_agent_support import new_keypair

    _, pub = new_keypair(tmp_path)
    port = free_port()  # nothing listens: the agent logs that the broker is unreachable, with its URL
    url = f"mqtt://pi-1:{SECRET}@127.0.0.1:{port}"
    base = [sys.executable, "-m", "agent", "--device-id", "pi-1", "--broker", url, "--state-dir",
            str(tmp_path / "state"), "--server-key", str(pub), "--http-port", "0", "--mqtt-protocol", "3.1.1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    checked = subprocess.run([*base, "--check-config"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120, check=False)
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert SECRET not in checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["config"]["broker_url"] == f"mqtt://pi-1:***@127.0.0.1:{port}"
    bad = subprocess.run([*base[:6], f"mqtx://pi-1:{SECRET}@h", *base[7:], "--check-config"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and SECRET not in bad.stdout + bad.stderr and "***" in bad.stderr, bad.stderr
    log = tmp_path / "agent.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*base, "--log-level", "info"], cwd=REPO, env=env, stdout=out, stderr=out)
    try:
        _until(lambda: "broker_unreachable" in log.read_text(), 60, "the agent to try the broker")
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text()
    assert "pi-1:***@127.0.0.1" in text and SECRET not in text, text[-2000:]
