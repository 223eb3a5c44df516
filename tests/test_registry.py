"""The registry (SQLite under a data dir), the server keys and the SQL dialect adapter."""

from __future__ import annotations

import json
import shutil
import stat
import threading
from pathlib import Path

import pytest

from protocol import signing
from protocol.artifact import ARTIFACT_FILES, pack_artifact
from server.db import POSTGRES, SQLITE, DatabaseConnectError, open_database
from server.keys import export_public_key, key_paths, server_key
from server.registry import Registry, RegistryError


def test_register_copies_the_artifact_and_assigns_global_versions(tmp_path: Path, tiny_artifact: Path) -> None:
    registry = Registry(tmp_path / "data")
    first = registry.register(tiny_artifact)
    other = registry.register(tiny_artifact, model_id="other-model")
    again = registry.register(tiny_artifact)
    assert [first.version, other.version, again.version] == [1, 2, 3]  # one counter over all models
    assert first.model_id == json.loads((tiny_artifact / "metrics.json").read_text())["model_id"]
    assert sorted(p.name for p in first.path.iterdir()) == sorted(ARTIFACT_FILES)
    assert first.path.is_relative_to(tmp_path / "data")
    assert first.packed_path.read_bytes() == pack_artifact(tiny_artifact)
    assert first.size == first.packed_path.stat().st_size and len(first.sha256) == 64
    assert registry.artifact(first.model_id).version == 3  # latest
    assert registry.artifact(first.model_id, 1) == first
    assert registry.artifact_by_id(first.id) == first


def test_registry_survives_a_reopen(tmp_path: Path, tiny_artifact: Path) -> None:
    registry = Registry(tmp_path)
    record = registry.register(tiny_artifact)
    registry.upsert_device("pi-1", status="online", runtime={"name": "ai-edge-litert", "version": "2.3.0"},
                           from_state=True)
    dep = registry.create_deployment(record, "pi-1", chunk_size=1024, policy={"name": "p", "limits": []},
                                     deadline_s=60)
    registry.close()
    reopened = Registry(tmp_path)
    assert reopened.artifacts() == [record]
    assert reopened.device("pi-1").runtime_key == "ai-edge-litert==2.3.0"
    assert reopened.deployment(dep.deployment_id).status == "pending"


def test_register_refuses_broken_folders_naming_the_problem(tmp_path: Path, tiny_artifact: Path) -> None:
    registry = Registry(tmp_path / "data")
    with pytest.raises(RegistryError, match="does not exist"):
        registry.register(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifact, broken)
    (broken / "golden.json").write_text("{not json")
    with pytest.raises(RegistryError, match="golden.json"):
        registry.register(broken)
    shutil.copy(tiny_artifact / "golden.json", broken / "golden.json")
    (broken / "model.tflite").write_bytes(b"")
    with pytest.raises(RegistryError, match="empty"):
        registry.register(broken)
    shutil.copy(tiny_artifact / "model.tflite", broken / "model.tflite")
    with pytest.raises(RegistryError, match="invalid model id"):
        registry.register(broken, model_id="../escape")
    assert registry.artifacts() == []  # nothing half-registered


def test_unknown_artifact_error_lists_what_is_registered(tmp_path: Path, tiny_artifact: Path) -> None:
    registry = Registry(tmp_path)
    record = registry.register(tiny_artifact)
    with pytest.raises(RegistryError, match=rf"no registered artifact 'nope'.*{record.id}"):
        registry.artifact("nope")
    with pytest.raises(RegistryError, match=f"{record.model_id}@9"):
        registry.artifact(record.model_id, 9)


def test_concurrent_registrations_never_share_a_version(tmp_path: Path, tiny_artifact: Path) -> None:
    """Two registries on one data dir (like `serve` and a CLI `register`) serialise version assignment."""
    registries = [Registry(tmp_path), Registry(tmp_path)]
    versions: list[int] = []
    errors: list[BaseException] = []

    def work(reg: Registry) -> None:
        try:
            for _ in range(3):
                versions.append(reg.register(tiny_artifact).version)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in registries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]


def test_device_state_and_heartbeat_update_different_fields(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.upsert_device("pi-1", status="online", active_model_id="m", active_version=3,
                           runtime={"name": "tflite-runtime", "version": "2.14.0"}, agent_version="0.1",
                           from_state=True)
    registry.upsert_device("pi-1", uptime_s=12.5, last_error="disk nearly full")
    device = registry.device("pi-1")
    assert (device.active_model_id, device.active_version, device.uptime_s) == ("m", 3, 12.5)
    assert device.last_error == "disk nearly full"
    assert device.runtime_key == "tflite-runtime==2.14.0"
    registry.upsert_device("pi-1", status="offline", from_state=True)
    assert registry.device("pi-1").status == "offline"
    offline = registry.device("pi-1")  # a Last Will carries no model: the last known one is kept
    assert (offline.active_model_id, offline.active_version, offline.runtime_key) == ("m", 3, "tflite-runtime==2.14.0")
    with pytest.raises(RegistryError, match="never been seen"):
        registry.device("ghost")


def test_deployments_track_status_and_log_events(tmp_path: Path, tiny_artifact: Path) -> None:
    registry = Registry(tmp_path)
    record = registry.register(tiny_artifact)
    dep = registry.create_deployment(record, "pi-1", chunk_size=4096, policy=None, deadline_s=60)
    assert dep.deployment_id.startswith("d-") and len(dep.deployment_id) == 14
    registry.update_deployment(dep.deployment_id, status="measuring")
    assert [d.deployment_id for d in registry.deployments(active_only=True)] == [dep.deployment_id]
    done = registry.update_deployment(dep.deployment_id, status="promoted", reason="ok",
                                      verdict={"verdict": "PASS"})
    assert done.terminal and done.verdict == {"verdict": "PASS"}
    assert registry.deployments(active_only=True) == []
    assert [e["kind"] for e in registry.events(deployment_id=dep.deployment_id)] == [
        "deployment_created", "status:measuring", "status:promoted"]
    with pytest.raises(RegistryError, match="unknown deployment status 'done'"):
        registry.update_deployment(dep.deployment_id, status="done")
    with pytest.raises(RegistryError, match="no deployment 'd-000000000000'"):
        registry.update_deployment("d-000000000000", status="failed")


def test_server_key_is_private_and_exported_public_key_verifies(tmp_path: Path) -> None:
    key = server_key(tmp_path)
    private, public = key_paths(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert server_key(tmp_path).private_bytes_raw() == key.private_bytes_raw()  # stable across restarts
    out = export_public_key(tmp_path, tmp_path / "agents" / "server.pem")
    assert out.read_bytes() == public.read_bytes()
    signature = signing.sign(key, b"manifest")
    signing.verify(signing.load_public_key(out), b"manifest", signature)


def test_sql_dialects_adapt_placeholders_in_one_place(tmp_path: Path) -> None:
    sql = "CREATE TABLE t (id {serial_pk}, v TEXT); SELECT * FROM t WHERE v = ? AND id = ?"
    assert POSTGRES.adapt(sql).endswith("WHERE v = %s AND id = %s")
    assert "BIGSERIAL PRIMARY KEY" in POSTGRES.adapt(sql)
    assert SQLITE.adapt("SELECT ?") == "SELECT ?"
    db = open_database(tmp_path / "x.sqlite")
    db.execute("CREATE TABLE t (id {serial_pk}, v TEXT)")
    with pytest.raises(RuntimeError, match="boom"), db.transaction():
        db.execute("INSERT INTO t (v) VALUES (?)", ("rolled back",))
        raise RuntimeError("boom")
    db.execute("INSERT INTO t (v) VALUES (?)", ("kept",))
    assert db.query("SELECT v FROM t") == [{"v": "kept"}]
    # A URL selects PostgreSQL (tests/test_registry_postgres.py runs a real one); nothing listens on port 1.
    with pytest.raises(DatabaseConnectError, match=r"PostgreSQL registry postgresql://u:\*\*\*@127.0.0.1:1/x"):
        open_database("postgresql://u:secret@127.0.0.1:1/x")
