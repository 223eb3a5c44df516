"""Fleet-scale ingestion: two server processes split device reports through an MQTT 5 $share group.

Both `python -m server serve` children share one registry; every report must be ingested (gated
and recorded) exactly once, and both processes must have taken some. On an MQTT 3.1.1 link the
server falls back to a plain subscription and still ingests.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from protocol.messages import Report
from protocol.mqtt import MqttLink
from protocol.topics import Topics
from server.registry import ArtifactRecord, Registry
from server.service import EdgeGuideServer, ServerConfig

pytestmark = pytest.mark.network

REPO = Path(__file__).resolve().parents[1]
REPORTS = 40


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:.0f} s"
        time.sleep(0.1)


def _report(device_id: str, deployment_id: str, artifact: ArtifactRecord) -> Report:
    """A well-formed device report that passes the default policy."""
    return Report(device_id=device_id, deployment_id=deployment_id, model_id=artifact.model_id,
                  version=artifact.version, load_ok=True, mode="quick",
                  runtime={"name": "ai-edge-litert", "version": "2.3.0"}, model_bytes=artifact.size,
                  latency_ms={"p50": 0.2, "p90": 0.3, "p99": 0.5, "mean": 0.22, "std": 0.05, "min": 0.15,
                              "max": 0.9, "n": 1024, "duration_s": 60.0, "cold_start_ms": 3.0},
                  memory={"peak_rss_mib": 45.0, "load_delta_mib": 2.0},
                  energy={"source": "unavailable", "available": False},
                  quality={"agreement_at_k": 1.0, "ndcg_vs_reference": 1.0, "golden_n": 64})


def _measuring_deployments(registry: Registry, artifact: ArtifactRecord, n: int) -> dict[str, str]:
    """`n` deployments already waiting for their report: device id -> deployment id."""
    return {f"fl-{i:03d}": registry.create_deployment(artifact, f"fl-{i:03d}", chunk_size=65536, policy=None,
                                                      deadline_s=600, status="measuring").deployment_id
            for i in range(n)}


def _serve(data_dir: Path, broker_url: str, prefix: str, client_id: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server", "--data-dir", str(data_dir), "-v", "serve", "--broker", broker_url,
           "--topic-prefix", prefix, "--client-id", client_id, "--protocol", "5"]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=str(REPO), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": str(REPO)})


def test_two_server_processes_split_reports_and_ingest_each_once(mosquitto, topic_prefix: str, tmp_path: Path,
                                                                 tiny_artifact: Path) -> None:
    registry = Registry(tmp_path / "server")
    artifact = registry.register(tiny_artifact)
    deployments = _measuring_deployments(registry, artifact, REPORTS)
    procs = {cid: _serve(registry.data_dir, mosquitto.url, topic_prefix, cid, tmp_path / f"{cid}.log")
             for cid in (f"srvA-{topic_prefix}", f"srvB-{topic_prefix}")}
    device = MqttLink(mosquitto.url, f"fleet-{topic_prefix}", clean_start=True)
    device.start()
    try:
        # Both servers subscribed: each logs "subscribed to $share/..." once connected.
        _until(lambda: all("subscribed to $share/edgeguide-servers/" in (tmp_path / f"{cid}.log").read_text()
                           for cid in procs), 30, "both servers subscribed to the $share group")
        topics = Topics(topic_prefix)
        for device_id, dep_id in deployments.items():
            device.publish(topics.up(device_id, "report"), _report(device_id, dep_id, artifact).to_json())
        _until(lambda: all(d.status == "passed" for d in registry.deployments()), 60,
               "every deployment gated PASS")
        ingested = registry.events(kind_prefix="ingest:report", limit=10 * REPORTS)
        per_deployment = collections.Counter(e["deployment_id"] for e in ingested)
        assert per_deployment == dict.fromkeys(deployments.values(), 1)  # each report exactly once
        per_server = collections.Counter(e["detail"] for e in ingested)
        assert set(per_server) == set(procs) and min(per_server.values()) > 0, per_server
        assert sum(per_server.values()) == REPORTS
    finally:
        device.stop()
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_mqtt_311_falls_back_to_a_plain_subscription(mosquitto, topic_prefix: str, tmp_path: Path,
                                                     tiny_artifact: Path) -> None:
    registry = Registry(tmp_path / "server")
    artifact = registry.register(tiny_artifact)
    deployments = _measuring_deployments(registry, artifact, 3)
    server = EdgeGuideServer(registry, ServerConfig(broker_url=mosquitto.url, topic_prefix=topic_prefix,
                                                    client_id=f"srv311-{topic_prefix}", protocol="3.1.1",
                                                    clean_start=True)).start()
    device = MqttLink(mosquitto.url, f"dev311-{topic_prefix}", clean_start=True)
    device.start()
    try:
        assert server.link.is_v5 is False
        time.sleep(0.3)
        topics = Topics(topic_prefix)
        for device_id, dep_id in deployments.items():
            device.publish(topics.up(device_id, "report"), _report(device_id, dep_id, artifact).to_json())
        _until(lambda: server.reports_ingested == 3, 30, "three reports ingested over MQTT 3.1.1")
        assert all(d.status == "passed" for d in registry.deployments())
    finally:
        device.stop()
        server.stop()
