"""The server on the PostgreSQL registry under the server-side attacks: forged, duplicate and
oversized reports, and a report for a deployment that already ended.

A real PostgreSQL 15 (conftest's `postgres_url`, a fresh schema per test), the real server on the
session's mosquitto, and a raw MQTT client playing the devices (this broker is anonymous: the
ACL that binds a device to its topics is tested in test_broker_security.py / test_attack_tls.py;
here the server's own checks are under test, as a device with valid credentials would meet them).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from attack_support import Recorder, raw_link, start_server, wait_until

from protocol.limits import DEFAULT_LIMITS
from protocol.messages import Event, Report, Verdict
from protocol.mqtt import MqttLink
from server.registry import ArtifactRecord, DeploymentRecord, Registry
from server.service import EdgeGuideServer

pytestmark = pytest.mark.network


@dataclass
class PgSite:
    registry: Registry
    server: EdgeGuideServer
    recorder: Recorder
    device: MqttLink
    record: ArtifactRecord

    def up(self, device_id: str, kind: str, payload: bytes) -> None:
        self.device.publish(self.server.topics.up(device_id, kind), payload).wait(5)

    def deploy(self, device_id: str) -> DeploymentRecord:
        dep = self.server.deploy(self.record.model_id, device_id, version=self.record.version, force=True)
        wait_until(lambda: self.registry.deployment(dep.deployment_id).status == "transferring", 10, "transferring")
        return self.registry.deployment(dep.deployment_id)

    def report(self, dep: DeploymentRecord, **changes: object) -> Report:
        fields = {"device_id": dep.device_id, "deployment_id": dep.deployment_id, "model_id": dep.model_id,
                  "version": dep.version, "load_ok": True, "mode": "quick",
                  "latency_ms": {"p50": 0.1, "p90": 0.2, "p99": 0.3}, "quality": {"agreement_at_k": 1.0}}
        return Report(**(fields | changes))  # type: ignore[arg-type]

    def fence(self, device_id: str) -> None:
        """Wait until the server handled everything this client sent before (one worker, in order)."""
        marker = f"fence-{time.monotonic_ns()}"
        self.up(device_id, "event", Event(device_id=device_id, type="error", reason=marker).to_json())
        wait_until(lambda: any(e["detail"] == marker for e in self.registry.events(device_id=device_id,
                                                                                  kind_prefix="device:error")),
                   10, "the server to catch up")


def _unchanged(before: DeploymentRecord, after: DeploymentRecord) -> None:
    assert (after.status, after.reason, after.report, after.verdict) == \
        (before.status, before.reason, before.report, before.verdict), (before, after)


@pytest.fixture
def pg_site(pg_registry: Registry, mosquitto, topic_prefix: str, tiny_artifact) -> Iterator[PgSite]:
    record = pg_registry.register(tiny_artifact)
    server, recorder = start_server(pg_registry, mosquitto.url, topic_prefix)
    with raw_link(mosquitto.url) as device:
        try:
            yield PgSite(pg_registry, server, recorder, device, record)
        finally:
            server.stop()


def test_forged_reports_change_nothing_on_postgres(pg_site: PgSite) -> None:
    dep = pg_site.deploy("pg-a")
    malformed = pg_site.server.malformed
    # Another device reports on the victim's deployment from its own topic ...
    pg_site.up("pg-b", "report", pg_site.report(dep, device_id="pg-b").to_json())
    # ... or names the victim in the body of a message on its own topic.
    pg_site.up("pg-b", "report", pg_site.report(dep).to_json())
    # The right device, the wrong model or version.
    pg_site.up("pg-a", "report", pg_site.report(dep, version=dep.version + 1).to_json())
    pg_site.up("pg-a", "report", pg_site.report(dep, model_id="other-model").to_json())
    pg_site.fence("pg-a")
    pg_site.fence("pg-b")
    _unchanged(dep, pg_site.registry.deployment(dep.deployment_id))
    kinds = [e["kind"] for e in pg_site.registry.events()]
    assert kinds.count("wrong_device") == 1 and kinds.count("report_mismatch") == 2, kinds
    assert pg_site.server.malformed == malformed + 1  # the body naming another device than its topic
    assert not pg_site.recorder.payloads("pg-a", "verdict") and not pg_site.recorder.payloads("pg-b", "verdict")


def test_duplicate_reports_are_gated_once_on_postgres(pg_site: PgSite) -> None:
    dep = pg_site.deploy("pg-c")
    report = pg_site.report(dep).to_json()
    for _ in range(5):
        pg_site.up("pg-c", "report", report)
    wait_until(lambda: len(pg_site.recorder.payloads("pg-c", "verdict")) == 5, 15, "an answer to every copy")
    # One verdict, re-sent: PostgreSQL's JSON column may reorder the keys of the stored copy, so
    # compare the signed (canonical) form; every copy carries the server's valid signature.
    verdicts = [Verdict.from_json(p) for p in pg_site.recorder.payloads("pg-c", "verdict")]
    assert len({v.canonical() for v in verdicts}) == 1, verdicts
    for v in verdicts:
        v.verify(pg_site.server.key.public_key())
    assert verdicts[0].verdict == "PASS"
    events = [e["kind"] for e in pg_site.registry.events(deployment_id=dep.deployment_id)]
    assert events.count("status:passed") == 1, events
    assert pg_site.registry.deployment(dep.deployment_id).status == "passed"


def test_oversized_report_is_refused_before_decoding_on_postgres(pg_site: PgSite) -> None:
    dep = pg_site.deploy("pg-d")
    malformed = pg_site.server.malformed
    padded = pg_site.report(dep, error="x" * (DEFAULT_LIMITS.max_json_bytes + 1)).to_json()
    assert len(padded) > DEFAULT_LIMITS.max_json_bytes
    pg_site.up("pg-d", "report", padded)
    pg_site.fence("pg-d")
    assert pg_site.server.malformed == malformed + 1
    recorded = pg_site.registry.events(kind_prefix="malformed")
    assert recorded and len(recorded[-1]["detail"]) < 2000, "the oversized payload was stored"
    _unchanged(dep, pg_site.registry.deployment(dep.deployment_id))


def test_report_for_a_terminal_deployment_changes_nothing_on_postgres(pg_site: PgSite, mosquitto,
                                                                      topic_prefix: str) -> None:
    """A device whose agent rejected a manifest then reports PASS figures for it: the record stays
    `rejected` with no verdict, and neither this server nor a restarted one answers it.

    Needs the server-side fix of issue 13's defect 1 (a report for a terminal deployment must never
    change its record)."""
    dep = pg_site.deploy("pg-e")
    pg_site.up("pg-e", "event", Event(device_id="pg-e", type="manifest_rejected", deployment_id=dep.deployment_id,
                                      reason="bad signature").to_json())
    wait_until(lambda: pg_site.registry.deployment(dep.deployment_id).status == "rejected", 10, "rejected")
    ended = pg_site.registry.deployment(dep.deployment_id)
    pg_site.up("pg-e", "report", pg_site.report(ended).to_json())
    pg_site.fence("pg-e")
    _unchanged(ended, pg_site.registry.deployment(dep.deployment_id))
    pg_site.server.stop()
    restarted, recorder = start_server(pg_site.registry, mosquitto.url, topic_prefix,
                                       client_id=pg_site.server.config.client_id)
    try:
        pg_site.up("pg-e", "report", pg_site.report(ended).to_json())
        pg_site.fence("pg-e")
        _unchanged(ended, pg_site.registry.deployment(dep.deployment_id))
        assert not pg_site.recorder.payloads("pg-e", "verdict") and not recorder.payloads("pg-e", "verdict")
    finally:
        restarted.stop()
