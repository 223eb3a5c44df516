"""The registry on a real PostgreSQL 15 server (started per session in a temp dir, loopback only).

CI installs the `postgresql` Debian package; without it this module FAILS with the fix, it never skips.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from server.db import PostgresDatabase, open_database
from server.registry import Registry, RegistryError


def test_open_database_picks_postgres_for_a_url(postgres_url: str) -> None:
    db = open_database(postgres_url)
    assert isinstance(db, PostgresDatabase) and db.dialect.name == "postgres"
    assert db.query("SELECT 1 + ? AS two", (1,)) == [{"two": 2}]
    db.close()


def test_registry_round_trip_on_postgres(pg_registry: Registry, tiny_artifact: Path) -> None:
    first = pg_registry.register(tiny_artifact)
    second = pg_registry.register(tiny_artifact)
    assert (first.version, second.version) == (1, 2)
    assert pg_registry.artifact(first.model_id).version == 2
    with pytest.raises(RegistryError, match="no registered artifact"):
        pg_registry.artifact("nope")
    pg_registry.upsert_device("pg-dev", status="online", runtime={"name": "ai-edge-litert", "version": "2.3.0"},
                              from_state=True)
    pg_registry.upsert_device("pg-dev", uptime_s=12.5)
    device = pg_registry.device("pg-dev")
    assert device.runtime_key == "ai-edge-litert==2.3.0" and device.uptime_s == 12.5
    dep = pg_registry.create_deployment(second, "pg-dev", chunk_size=1000, policy={"name": "p"}, deadline_s=60)
    assert dep.status == "pending" and dep.policy == {"name": "p"}
    updated = pg_registry.update_deployment(dep.deployment_id, status="measuring", report={"load_ok": True})
    assert updated.status == "measuring" and updated.report == {"load_ok": True}
    assert [d.deployment_id for d in pg_registry.deployments(active_only=True)] == [dep.deployment_id]
    kinds = [e["kind"] for e in pg_registry.events(deployment_id=dep.deployment_id)]
    assert kinds == ["deployment_created", "status:measuring"]
    assert pg_registry.events(kind_prefix="registered")[0]["id"] < pg_registry.events(kind_prefix="status")[0]["id"]


def test_postgres_transaction_rolls_back_as_a_whole(pg_registry: Registry) -> None:
    db = pg_registry.db
    with pytest.raises(RuntimeError, match="boom"), db.transaction():
        pg_registry.log_event("inside")
        with db.transaction():  # nested: a savepoint, still undone by the outer failure
            pg_registry.log_event("nested")
        raise RuntimeError("boom")
    assert pg_registry.events(kind_prefix="inside") == [] and pg_registry.events(kind_prefix="nested") == []


def test_postgres_registry_is_shared_by_concurrent_writers(pg_registry: Registry, postgres_url: str,
                                                           tmp_path: Path) -> None:
    """Two registries (as two server processes would have) write devices concurrently; nothing is lost."""
    other = Registry(tmp_path / "other", db=open_database(postgres_url))

    def write(registry: Registry, tag: str) -> None:
        for i in range(40):
            registry.upsert_device(f"{tag}-{i}", status="online", from_state=True)

    threads = [threading.Thread(target=write, args=(r, t)) for r, t in ((pg_registry, "a"), (other, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(pg_registry.devices()) == 80 and len(other.devices()) == 80
    other.close()
