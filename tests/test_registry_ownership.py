"""The registry is the one owner of the server's rows: status moves follow one table, nobody else writes SQL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol.states import TransitionError
from server.cli import main
from server.keys import key_paths
from server.registry import Registry, RegistryError

SERVER = Path(__file__).resolve().parent.parent / "server"
SQL = re.compile(r"\b(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM|CREATE TABLE|CREATE INDEX)\b")


def test_only_the_registry_and_the_db_adapter_hold_sql() -> None:
    holders = sorted(str(p.relative_to(SERVER)) for p in SERVER.rglob("*.py")
                     if SQL.search(p.read_text()) and not str(p.relative_to(SERVER)).startswith("registry/")
                     and p.name != "db.py")
    assert holders == []


def test_transitions_are_compare_and_set_along_the_table(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.db.execute("INSERT INTO artifacts (id, model_id, version, path, packed_path, sha256, size, metrics,"
                        " created) VALUES ('m@1', 'm', 1, '/x', '/x.tar.gz', 'ab', 1, '{}', 0)")
    dep = registry.create_deployment(registry.artifact("m"), "pi-1", chunk_size=4096, policy=None, deadline_s=60)
    moved = registry.transition(dep.deployment_id, ("pending",), "transferring")
    assert moved is not None and moved.status == "transferring" and moved.reason == ""
    # A second process expecting `pending` lost the race: nothing changes, no event.
    assert registry.transition(dep.deployment_id, ("pending",), "transferring") is None
    # A move the table forbids is a caller's bug, refused before any SQL runs.
    with pytest.raises(TransitionError, match="transferring -> pending is not allowed"):
        registry.transition(dep.deployment_id, ("transferring",), "pending")
    done = registry.transition(dep.deployment_id, ("transferring",), "rejected", reason="device said no")
    assert done is not None and done.terminal and done.reason == "device said no"
    with pytest.raises(RegistryError, match="cannot move from 'rejected' to 'failed'"):
        registry.update_deployment(dep.deployment_id, status="failed")
    kinds = [e["kind"] for e in registry.events(deployment_id=dep.deployment_id)]
    assert kinds == ["deployment_created", "status:transferring", "status:rejected"]
    assert all(e["device_id"] == "pi-1" for e in registry.events(deployment_id=dep.deployment_id))
    registry.close()


def test_listing_and_queueing_need_no_signing_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["--data-dir", str(data), "rollouts", "--json"]) == 0
    assert main(["--data-dir", str(data), "deployments", "--json"]) == 0
    assert main(["--data-dir", str(data), "deploy", "nope", "--device", "pi-1"]) == 2
    assert "no registered artifact 'nope'" in capsys.readouterr().err
    assert not any(p.exists() for p in key_paths(data))
