"""A server tick costs what it acts on, not the size of the fleet in flight.

A 10,000-device wave used to be re-read in full every second by each server process (all
active deployments, then every rollout device twice) and started in one tick, which starved
the ingest of device reports. These tests pin the filtered queries and the sliced wave start
on a real registry (SQLite and PostgreSQL) and a real broker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.registry import Registry, RegistryError
from server.rollout import RolloutManager, make_plan
from server.rollout_plan import CLAIM
from server.service import EdgeGuideServer, ServerConfig


def _due_ids(registry: Registry, now: float, offline_since: float) -> set[str]:
    return {d.deployment_id for d, _offline_at in registry.deployments_due(now, offline_since)}


def _seed(registry: Registry, artifact_dir: Path) -> dict[str, str]:
    artifact = registry.register(artifact_dir)
    for device in ("on-1", "on-2", "on-3", "off-1", "off-2"):
        registry.upsert_device(device, status="online", from_state=True)
    deps = {
        "pending": registry.create_deployment(artifact, "on-1", chunk_size=4096, policy=None, deadline_s=600),
        "measuring": registry.create_deployment(artifact, "on-2", chunk_size=4096, policy=None, deadline_s=600,
                                                status="measuring"),
        "overdue": registry.create_deployment(artifact, "on-3", chunk_size=4096, policy=None, deadline_s=-1,
                                              status="transferring"),
        "offline": registry.create_deployment(artifact, "off-1", chunk_size=4096, policy=None, deadline_s=600,
                                              status="measuring"),
        "finished": registry.create_deployment(artifact, "off-2", chunk_size=4096, policy=None, deadline_s=-1,
                                               status="promoted"),
    }
    for device in ("off-1", "off-2"):
        registry.upsert_device(device, status="offline", from_state=True)
    return {k: v.deployment_id for k, v in deps.items()}


def _check_due(registry: Registry, deps: dict[str, str]) -> None:
    now = time.time()
    # Offline, but not yet for the grace period: only the pending and the overdue ones are due.
    assert _due_ids(registry, now, offline_since=now - 120) == {deps["pending"], deps["overdue"]}
    # Offline since before the cut-off: its deployment is due too; an online device's is not,
    # and a finished deployment never is, whatever its deadline or device.
    assert _due_ids(registry, now, offline_since=now + 5) == {deps["pending"], deps["overdue"], deps["offline"]}
    # Only the deployment whose device is gone carries the time it went offline (the tick's reason).
    offline_at = {d.deployment_id: at for d, at in registry.deployments_due(now, offline_since=now + 5)}
    assert offline_at[deps["offline"]] == registry.find_device("off-1").last_seen
    assert offline_at[deps["pending"]] is None and offline_at[deps["overdue"]] is None


def test_a_tick_reads_only_the_deployments_it_acts_on(tmp_path: Path, tiny_artifact: Path) -> None:
    registry = Registry(tmp_path / "reg")
    try:
        _check_due(registry, _seed(registry, tiny_artifact))
    finally:
        registry.close()


def test_a_tick_reads_only_the_deployments_it_acts_on_postgres(pg_registry: Registry, tiny_artifact: Path) -> None:
    _check_due(pg_registry, _seed(pg_registry, tiny_artifact))


@pytest.fixture
def idle_server(tmp_path: Path, mosquitto, topic_prefix: str) -> Iterator[EdgeGuideServer]:
    """A connected server whose own ticks never run during the test (the test ticks by hand)."""
    registry = Registry(tmp_path / "reg")
    server = EdgeGuideServer(registry, ServerConfig(broker_url=mosquitto.url, topic_prefix=topic_prefix,
                                                    client_id=f"tick-{topic_prefix}", clean_start=True,
                                                    tick_s=3600.0))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        registry.close()


@pytest.mark.network
def test_a_wave_starts_in_slices_and_two_processes_never_start_a_device_twice(
        idle_server: EdgeGuideServer, tiny_artifact: Path) -> None:
    registry = idle_server.registry
    artifact = registry.register(tiny_artifact)
    devices = [f"w-{i:02d}" for i in range(11)]
    for device in devices:
        registry.upsert_device(device, status="online", from_state=True)
    # Two managers on one database stand for two server processes sharing the rollout.
    first = RolloutManager(registry, idle_server.deployer, starts_per_tick=3)
    second = RolloutManager(registry, idle_server.deployer, starts_per_tick=3)
    rollout = first.create(artifact.model_id, make_plan([], devices, 1, 100.0))

    def started() -> list[str]:
        return sorted(d.device_id for d in registry.deployments() if d.version == artifact.version)

    first.tick()
    assert len(started()) == 3
    assert registry.rollout_stage_counts(rollout.rollout_id, 0) == (11, 0, 11)
    second.tick()
    assert len(started()) == 6
    first.tick()
    second.tick()
    assert started() == devices  # 3 + 3 + 3 + 2: all started, each exactly once
    first.tick()
    assert started() == devices
    record = first.get(rollout.rollout_id)
    assert record.status == "running"
    assert all(m["deployment_id"] not in (None, CLAIM) for m in record.devices.values())


def test_starts_per_tick_must_be_positive(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    try:
        with pytest.raises(ValueError, match="starts_per_tick must be >= 1"):
            RolloutManager(registry, None, starts_per_tick=0)  # type: ignore[arg-type]
    finally:
        registry.close()


@pytest.mark.network
def test_a_device_whose_start_fails_half_way_is_left_unclaimed_not_stuck(
        idle_server: EdgeGuideServer, tiny_artifact: Path) -> None:
    """Claim, deployment and attach are one transaction: an error after the claim (here the version
    was withdrawn meanwhile; a killed process is the other case) must not leave a claim without a
    deployment, which the stage would wait on forever."""
    registry = idle_server.registry
    artifact = registry.register(tiny_artifact)
    devices = ["u-1", "u-2"]
    for device in devices:
        registry.upsert_device(device, status="online", from_state=True)
    manager = RolloutManager(registry, idle_server.deployer, starts_per_tick=2)
    rollout = manager.create(artifact.model_id, make_plan([], devices, 1, 100.0))
    registry.unregister(artifact.model_id, artifact.version)
    with pytest.raises(RegistryError, match="no registered artifact"):
        manager.tick()
    members = registry.rollout(rollout.rollout_id).devices
    assert {d: (m["deployment_id"], m["outcome"]) for d, m in members.items()} == {d: (None, None) for d in devices}
    assert [d for d in registry.deployments() if d.version == artifact.version] == []
