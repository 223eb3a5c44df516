"""A staged rollout over bridged brokers survives the faults a fleet back end meets.

Real parts at small scale (bench/fleetsim): 30 simulated devices, each its own MQTT 5 session, on
two edge mosquittos bridged to a core mosquitto (each bridge through the project's relay so it can
be dropped), PostgreSQL as the registry and two `edgeguide-server serve` processes sharing the
device traffic through the core's `$share` group. As wave 1 starts one fault is injected; the
rollout must still run to its end with every device promoted exactly once, and every report of
the ingest burst must be recorded (a re-sent report is de-duplicated, never gated twice).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fleetsim import run as fleetrun
from bench.fleetsim.stack import Stack

AGENTS = 30

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    if os.geteuid() != 0:
        pytest.fail("the fleet stack needs root (PostgreSQL runs as the postgres user)")
    stack = Stack(tmp_path, fleetrun.new_prefix(), edges=2, servers=2, relay_bridges=True, bridge_cut_s=4.0).start()
    yield stack
    stack.stop()


def _servers_up(registry, since: float) -> None:
    deadline = time.monotonic() + 240  # a loaded 2-core machine imports slowly
    while time.monotonic() < deadline:
        rows = registry.db.query("SELECT client_id, last_seen FROM servers")
        if {r["client_id"] for r in rows if float(r["last_seen"]) >= since} >= {"fleet-server-0", "fleet-server-1"}:
            return
        time.sleep(0.3)
    raise AssertionError("the two server processes did not come up")


@pytest.mark.parametrize("fault", ["bridge_drop", "server_killed", "database_restart"])
def test_rollout_runs_to_the_end_through_a_fault(stack: Stack, tiny_artifact: Path, fault: str) -> None:
    since = time.time() - 60
    registry = stack.registry()
    v1 = registry.register(tiny_artifact)
    _servers_up(registry, since)
    fleet = fleetrun.Fleet(stack, AGENTS, 1)
    try:
        assert fleet.start(timeout=120) == AGENTS
        fleetrun.wait_known(registry, fleet.device_ids, 60)
        ingest = fleetrun.ingest(fleet, registry, v1, timeout=120)
        assert ingest["lost_reports"] == 0 and ingest["reports_ingested"] == AGENTS, ingest
        assert set(ingest["per_server"]) == {"fleet-server-0", "fleet-server-1"}, ingest["per_server"]
        v2 = registry.register(tiny_artifact)
        injected: list[str] = []

        def on_stage(stage: int) -> None:
            if stage != 1:
                return
            injected.append(fault)
            if fault == "bridge_drop":
                stack.cut_bridge(0)
            elif fault == "server_killed":
                stack.kill_server(1)
                time.sleep(3.0)
                stack.start_server(1)  # same client id: it drains its own session in the $share group
            else:
                stack.db.restart()

        result = fleetrun.rollout(registry, fleet.device_ids, v2, canary=3, waves=2, on_stage=on_stage, timeout=240)
        time.sleep(1.0)
        sims = fleet.stop()
    finally:
        for proc in fleet.procs:
            if proc.is_alive():
                proc.kill()
    assert injected == [fault]
    assert result["finished"], result
    assert result["outcomes"] == {"promoted": AGENTS}, result
    assert result["duplicate_deployments"] == 0
    assert sims["active_versions"] == {str(v2.version): AGENTS}, sims
    assert sims["bad_signatures"] == 0
    # each deployment of the rollout was gated once, however often its report arrived
    gated = fleetrun.query_retrying(registry, "SELECT e.deployment_id, COUNT(*) AS n FROM events e JOIN deployments d"
                                    " ON d.deployment_id = e.deployment_id WHERE e.kind = 'status:passed' AND"
                                    " d.version = ? GROUP BY e.deployment_id", (v2.version,))
    assert len(gated) == AGENTS and all(int(r["n"]) == 1 for r in gated)
    if fault == "bridge_drop":
        relay = stack.relays[0]
        stats = relay.stop()
        assert stats["cuts"] and stats["refused_during_cut"] >= 1 and stats["connections"] >= 2, stats
    registry.close()
