"""The registry's versioned schema: a database made by the unversioned code upgrades with its rows kept.

tests/fixtures/registry_unversioned.sql is the schema and rows the code before schema versioning
wrote (its CREATE statements verbatim); it is loaded into real SQLite and PostgreSQL databases,
which a current `Registry` then opens.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory
from conftest import reset_postgres

from server.db import Database, open_database
from server.registry import DB_FILE, Registry, RegistryError, schema

FIXTURE = Path(__file__).parent / "fixtures" / "registry_unversioned.sql"


def load_unversioned(db: Database) -> None:
    """Run the fixture's statements as the unversioned code would have (its placeholders adapted)."""
    text = "\n".join(line for line in FIXTURE.read_text().splitlines() if not line.startswith("--"))
    for statement in text.split(";\n"):
        if statement.strip():
            db.execute(statement.strip().rstrip(";"))


def describe(url: str) -> dict[str, Any]:
    """Tables, columns, keys and indexes as SQLAlchemy reflects them (defaults normalised per dialect)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        inspector = sa.inspect(engine)
        return {table: {
            "columns": [(c["name"], str(c["type"]), c["nullable"], c["default"])
                        for c in inspector.get_columns(table)],
            "pk": inspector.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"]) for f in
                          inspector.get_foreign_keys(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in inspector.get_indexes(table)),
            "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
        } for table in sorted(inspector.get_table_names())}
    finally:
        engine.dispose()


def assert_rows_kept(registry: Registry) -> None:
    """Everything the fixture stored reads back through the current registry's methods."""
    assert schema.current_revision(registry.db) == schema.HEAD
    assert [a.id for a in registry.artifacts()] == ["guide@1", "guide@2"]  # other@3 stays withdrawn
    assert registry.artifact("guide").metrics["hr10"] == 0.25
    pi1 = registry.device("pi-1")
    assert (pi1.runtime_key, pi1.uptime_s, pi1.last_error) == ("ai-edge-litert==2.3.0", 42.5, "load_failed: bad op")
    assert registry.device("pi-2").status == "offline"
    deps = {d.device_id: d for d in registry.deployments()}
    assert deps["pi-1"].status == "promoted" and deps["pi-1"].verdict == {"verdict": "PASS", "checks": []}
    assert deps["pi-1"].resends == {"0": 1} and deps["pi-1"].report == {"load_ok": True, "p95_ms": 3.5}
    assert [d.deployment_id for d in registry.deployments(active_only=True)] == [deps["pi-2"].deployment_id]
    kinds = [e["kind"] for e in registry.events(deployment_id=deps["pi-1"].deployment_id)]
    assert kinds == ["deployment_created", "status:transferring", "status:passed", "status:promoted"]
    quoted = registry.events(kind_prefix="device:heartbeat_gap")[0]["detail"]
    assert quoted == "it's quoted 'text' with a ; semicolon"
    [rollout] = registry.rollouts()
    assert [s.name for s in rollout.plan.stages] == ["canary", "wave-1"] and rollout.status == "running"
    assert rollout.devices["pi-2"]["deployment_id"] == deps["pi-2"].deployment_id
    assert registry.last_server_seen() is not None
    # The upgraded database keeps working: new rows, ids after the old ones, a status change.
    last_id = registry.events(limit=10_000)[-1]["id"]
    registry.log_event("after-upgrade")
    assert registry.events(kind_prefix="after-upgrade")[0]["id"] > last_id
    moved = registry.transition(deps["pi-2"].deployment_id, ("transferring",), "measuring", reason="upgraded")
    assert moved is not None and moved.status == "measuring"


def test_revisions_are_the_migration_scripts_in_order() -> None:
    config = Config()
    config.set_main_option("script_location", str(schema.MIGRATIONS_DIR))
    walked = [s.revision for s in ScriptDirectory.from_config(config).walk_revisions()]
    assert tuple(reversed(walked)) == schema.REVISIONS


def test_unversioned_sqlite_registry_upgrades_with_its_rows(tmp_path: Path) -> None:
    old = open_database(tmp_path / "old" / DB_FILE)
    load_unversioned(old)
    assert schema.current_revision(old) is None
    old.close()
    registry = Registry(tmp_path / "old")
    try:
        assert_rows_kept(registry)
    finally:
        registry.close()
    # The adopted database now has exactly the schema a new registry gets.
    Registry(tmp_path / "new").close()
    adopted, fresh = (describe(f"sqlite:///{tmp_path / d / DB_FILE}") for d in ("old", "new"))
    assert adopted == fresh and "events_deployment" in str(fresh["events"]["indexes"])


def test_unversioned_postgres_registry_upgrades_with_its_rows(postgres_url: str, tmp_path: Path) -> None:
    db = open_database(postgres_url)
    reset_postgres(db)
    load_unversioned(db)
    assert schema.current_revision(db) is None
    registry = Registry(tmp_path / "data", db=db)
    try:
        assert_rows_kept(registry)
        url = registry.db.sqlalchemy_url()
        adopted = describe(url)
        reset_postgres(registry.db)
    finally:
        registry.close()
    Registry(tmp_path / "new", db=open_database(postgres_url)).close()
    assert describe(url) == adopted


def test_a_newer_schema_than_the_code_knows_is_refused(tmp_path: Path) -> None:
    Registry(tmp_path).close()
    db = open_database(tmp_path / DB_FILE)
    db.execute("UPDATE alembic_version SET version_num = '9999'")
    db.close()
    with pytest.raises(RegistryError, match="revision '9999', newer than this server knows"):
        Registry(tmp_path)


def test_concurrent_first_opens_create_the_schema_once(tmp_path: Path) -> None:
    """Two processes' worth of registries opening one new file at once: both work, one schema version row."""
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            Registry(tmp_path).close()
        except BaseException as exc:  # reported below with the test's assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    db = open_database(tmp_path / DB_FILE)
    assert db.query("SELECT version_num FROM alembic_version") == [{"version_num": schema.HEAD}]
    db.close()
