"""The server's registry: artifacts, devices, deployments and an event log, under one data dir.

Everything the server knows survives a restart here, so a deployment interrupted by a server
restart continues from its recorded status. SQL goes through `server.db` so the same statements
run on SQLite now and PostgreSQL later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import chunking, names
from protocol.artifact import ARTIFACT_FILES, MODEL_FILE, pack_artifact, read_golden, read_items, read_metrics
from protocol.errors import ProtocolError
from protocol.limits import DEFAULT_LIMITS
from server.db import Database, open_database

_LOGGER = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "edgeguide"
DB_FILE = "registry.sqlite"

STATUSES = ("pending", "transferring", "measuring", "passed", "failed", "rejected", "promoted",
            "rolled_back", "timeout", "cancelled")
TERMINAL = frozenset({"rejected", "promoted", "rolled_back", "timeout", "cancelled"})
ACTIVE = frozenset(STATUSES) - TERMINAL
# Event details are device-supplied reasons and server messages: cut to this many characters.
EVENT_DETAIL_MAX_CHARS = 1000

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS artifacts (
        id TEXT PRIMARY KEY,
        model_id TEXT NOT NULL,
        version INTEGER NOT NULL UNIQUE,
        path TEXT NOT NULL,
        packed_path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        metrics TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS devices (
        device_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        active_model_id TEXT,
        active_version INTEGER,
        runtime TEXT,
        agent_version TEXT,
        first_seen DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        uptime_s DOUBLE PRECISION,
        last_error TEXT)""",
    """CREATE TABLE IF NOT EXISTS deployments (
        deployment_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        artifact_id TEXT NOT NULL REFERENCES artifacts(id),
        model_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        policy TEXT,
        chunk_size INTEGER NOT NULL,
        report TEXT,
        verdict TEXT,
        resends TEXT NOT NULL DEFAULT '{}',
        forced INTEGER NOT NULL DEFAULT 0,
        created DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        deadline DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS deployments_status ON deployments (status)",
    """CREATE TABLE IF NOT EXISTS events (
        id {serial_pk},
        ts DOUBLE PRECISION NOT NULL,
        device_id TEXT,
        deployment_id TEXT,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '')""",
    # Retention (prune_events) deletes by device and by age.
    "CREATE INDEX IF NOT EXISTS events_device ON events (device_id, id)",
    "CREATE INDEX IF NOT EXISTS events_ts ON events (ts)",
    # An unregistered artifact keeps its row (past deployments refer to it; its version is never
    # reused) but is hidden from lookups and listings, and its files are deleted.
    """CREATE TABLE IF NOT EXISTS withdrawn_artifacts (
        id TEXT PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL)""",
    # Every running server process stamps its row: a CLI waiting on a deployment can tell
    # "no server is running" from "the device is slow".
    """CREATE TABLE IF NOT EXISTS servers (
        client_id TEXT PRIMARY KEY,
        last_seen DOUBLE PRECISION NOT NULL)""",
)
_VISIBLE = "id NOT IN (SELECT id FROM withdrawn_artifacts)"


class RegistryError(Exception):
    """A registry request names something that does not exist or cannot be stored."""


@dataclass(frozen=True)
class ArtifactRecord:
    """A registered artifact: the copied folder, its packed form and its export metrics."""

    id: str
    model_id: str
    version: int
    path: Path
    packed_path: Path
    sha256: str
    size: int
    metrics: dict[str, Any]
    created: float

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ArtifactRecord:
        return cls(row["id"], row["model_id"], int(row["version"]), Path(row["path"]), Path(row["packed_path"]),
                   row["sha256"], int(row["size"]), json.loads(row["metrics"]), float(row["created"]))


def chunk_digests_path(packed_path: Path) -> Path:
    """Sidecar of a packed blob: its per-chunk SHA-256 at the default chunk size."""
    return packed_path.with_name(packed_path.name.removesuffix(".tar.gz") + ".chunks.json")


def _replace_file(path: Path, data: bytes) -> None:
    """Write next to `path`, then rename over it: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class DeviceRecord:
    """What the server last heard from one device."""

    device_id: str
    status: str
    active_model_id: str | None
    active_version: int | None
    runtime: dict[str, Any] | None
    agent_version: str | None
    first_seen: float
    last_seen: float
    uptime_s: float | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> DeviceRecord:
        return cls(row["device_id"], row["status"], row["active_model_id"], row["active_version"],
                   json.loads(row["runtime"]) if row["runtime"] else None, row["agent_version"],
                   float(row["first_seen"]), float(row["last_seen"]), row["uptime_s"], row["last_error"])

    @property
    def runtime_key(self) -> str | None:
        """`name==version` as used in metrics.json `runtimes`, or None if the device did not say."""
        rt = self.runtime or {}
        if not rt.get("name") or not rt.get("version"):
            return None
        return f"{rt['name']}=={rt['version']}"


@dataclass(frozen=True)
class DeploymentRecord:
    """One artifact sent to one device, with everything that happened to it."""

    deployment_id: str
    device_id: str
    artifact_id: str
    model_id: str
    version: int
    status: str
    reason: str
    policy: dict[str, Any] | None
    chunk_size: int
    report: dict[str, Any] | None
    verdict: dict[str, Any] | None
    resends: dict[str, int] = field(default_factory=dict)
    forced: bool = False
    created: float = 0.0
    updated: float = 0.0
    deadline: float = 0.0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> DeploymentRecord:
        def load(key: str) -> Any:
            return json.loads(row[key]) if row[key] else None

        return cls(row["deployment_id"], row["device_id"], row["artifact_id"], row["model_id"], int(row["version"]),
                   row["status"], row["reason"], load("policy"), int(row["chunk_size"]), load("report"),
                   load("verdict"), load("resends") or {}, bool(row["forced"]), float(row["created"]),
                   float(row["updated"]), float(row["deadline"]))


def _json(obj: Any) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True, allow_nan=False)


def new_deployment_id() -> str:
    """A fresh `d-<12 hex>` id (48 random bits)."""
    return f"d-{secrets.token_hex(6)}"


class Registry:
    """Persistent state of one server, rooted at `data_dir`."""

    def __init__(self, data_dir: Path = DEFAULT_DATA_DIR, db: Database | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir = self.data_dir / "artifacts"
        self.reports_dir = self.data_dir / "reports"
        self.db = db or open_database(self.data_dir / DB_FILE)
        for statement in _SCHEMA:
            self.db.execute(statement)

    def close(self) -> None:
        self.db.close()

    # ---- artifacts -------------------------------------------------------------------------
    def register(self, folder: Path, model_id: str | None = None) -> ArtifactRecord:
        """Validate an exported artifact folder, copy it into the data dir and give it the next version."""
        folder = Path(folder)
        if not folder.is_dir():
            raise RegistryError(f"artifact folder {folder} does not exist")
        try:
            metrics = read_metrics(folder)
            read_items(folder)
            read_golden(folder)
        except ProtocolError as exc:
            raise RegistryError(f"artifact {folder} is invalid: {exc}") from exc
        model_file = folder / MODEL_FILE
        if not model_file.is_file() or model_file.stat().st_size == 0:
            raise RegistryError(f"artifact {folder} has no (or an empty) {MODEL_FILE}")
        model_id = model_id or metrics.get("model_id")
        try:
            names.model_id(model_id)
        except ProtocolError as exc:
            raise RegistryError(f"artifact {folder}: {exc} (set model_id in metrics.json or pass one)") from exc
        packed = pack_artifact(folder)
        digest = hashlib.sha256(packed).hexdigest()
        # What a manifest needs, hashed once here instead of again when the first deployment starts.
        chunk_size = DEFAULT_LIMITS.default_chunk_bytes
        chunk_digests = {"chunk_size": chunk_size, "sha256": chunking.digests(packed, chunk_size)}
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        with self.db.transaction():
            row = self.db.query("SELECT COALESCE(MAX(version), 0) AS v FROM artifacts")
            version = int(row[0]["v"]) + 1
            dest = self.artifacts_dir / model_id / f"v{version}"
            packed_path = self.artifacts_dir / model_id / f"v{version}.tar.gz"
            self._copy_artifact(folder, dest, packed_path, packed)
            _replace_file(chunk_digests_path(packed_path), json.dumps(chunk_digests).encode())
            record = ArtifactRecord(f"{model_id}@{version}", model_id, version, dest, packed_path, digest,
                                    len(packed), metrics, time.time())
            self.db.execute(
                "INSERT INTO artifacts (id, model_id, version, path, packed_path, sha256, size, metrics, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.id, model_id, version, str(dest), str(packed_path), digest, len(packed), _json(metrics),
                 record.created))
        self.log_event("registered", detail=f"{record.id} sha256={digest} size={len(packed)}")
        _LOGGER.info("registered %s (%d bytes packed) from %s", record.id, len(packed), folder)
        return record

    @staticmethod
    def _copy_artifact(src: Path, dest: Path, packed_path: Path, packed: bytes) -> None:
        """Copy exactly the artifact files, then the packed blob; a leftover from a crash is replaced."""
        if dest.exists():
            shutil.rmtree(dest)
        tmp = dest.with_name(dest.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name in ARTIFACT_FILES:
            shutil.copy2(src / name, tmp / name)
        os.replace(tmp, dest)
        _replace_file(packed_path, packed)

    @staticmethod
    def chunk_digests(artifact: ArtifactRecord, chunk_size: int) -> list[str] | None:
        """Per-chunk SHA-256 recorded at registration for `chunk_size`; None for another size or no record."""
        try:
            recorded = json.loads(chunk_digests_path(artifact.packed_path).read_text())
        except (OSError, ValueError) as exc:
            _LOGGER.debug("no chunk digests for %s: %s", artifact.id, exc)
            return None
        if not isinstance(recorded, dict) or recorded.get("chunk_size") != chunk_size:
            return None
        digests = recorded.get("sha256")
        if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
            return None
        return digests

    def artifact(self, model_id: str, version: int | None = None) -> ArtifactRecord:
        """The artifact `model_id` at `version`, or its latest version."""
        if version is None:
            rows = self.db.query(f"SELECT * FROM artifacts WHERE model_id = ? AND {_VISIBLE}"
                                 " ORDER BY version DESC LIMIT 1", (model_id,))
        else:
            rows = self.db.query(f"SELECT * FROM artifacts WHERE model_id = ? AND version = ? AND {_VISIBLE}",
                                 (model_id, version))
        if not rows:
            known = sorted({a.id for a in self.artifacts()})
            what = model_id if version is None else f"{model_id}@{version}"
            raise RegistryError(f"no registered artifact {what!r}; registered: {known or 'none'}")
        return ArtifactRecord.from_row(rows[0])

    def artifact_by_id(self, artifact_id: str) -> ArtifactRecord:
        rows = self.db.query("SELECT * FROM artifacts WHERE id = ?", (artifact_id,))
        if not rows:
            raise RegistryError(f"no registered artifact with id {artifact_id!r}")
        return ArtifactRecord.from_row(rows[0])

    def artifacts(self) -> list[ArtifactRecord]:
        return [ArtifactRecord.from_row(r)
                for r in self.db.query(f"SELECT * FROM artifacts WHERE {_VISIBLE} ORDER BY version")]

    def unregister(self, model_id: str, version: int) -> ArtifactRecord:
        """Withdraw one version: hidden from deploys and listings, files deleted, history kept.

        Refused while a deployment of it is in progress or a device runs it (roll that device
        forward first): the registry must still be able to say what each device runs.
        """
        artifact = self.artifact(model_id, version)
        busy = [d.deployment_id for d in self.deployments(active_only=True) if d.artifact_id == artifact.id]
        if busy:
            raise RegistryError(f"{artifact.id} has deployments in progress: {busy}; cancel them first "
                                "(`edgeguide-server cancel ID`)")
        running = [d.device_id for d in self.devices()
                   if (d.active_model_id, d.active_version) == (artifact.model_id, artifact.version)]
        if running:
            raise RegistryError(f"{artifact.id} is the active model of {running}; deploy another version to "
                                "them first")
        self.db.execute("INSERT INTO withdrawn_artifacts (id, ts) VALUES (?, ?)", (artifact.id, time.time()))
        shutil.rmtree(artifact.path, ignore_errors=True)
        for path in (artifact.packed_path, chunk_digests_path(artifact.packed_path)):
            path.unlink(missing_ok=True)
        self.log_event("unregistered", detail=artifact.id)
        _LOGGER.info("unregistered %s", artifact.id)
        return artifact

    # ---- server processes --------------------------------------------------------------------
    def server_alive(self, client_id: str) -> None:
        """Stamp `client_id`'s row now (a running server calls this every few seconds)."""
        self.db.execute("INSERT INTO servers (client_id, last_seen) VALUES (?, ?) ON CONFLICT (client_id)"
                        " DO UPDATE SET last_seen = excluded.last_seen", (client_id, time.time()))

    def last_server_seen(self) -> float | None:
        """When any server process last stamped its row (None: never)."""
        rows = self.db.query("SELECT MAX(last_seen) AS t FROM servers")
        return float(rows[0]["t"]) if rows and rows[0]["t"] is not None else None

    # ---- devices ---------------------------------------------------------------------------
    def upsert_device(self, device_id: str, *, status: str | None = None, active_model_id: str | None = None,
                      active_version: int | None = None, runtime: dict | None = None,
                      agent_version: str | None = None, uptime_s: float | None = None,
                      last_error: str | None = None, from_state: bool = False) -> DeviceRecord:
        """Record a state (`from_state=True`: it replaces active model/runtime) or a heartbeat."""
        now = time.time()
        with self.db.transaction():
            existing = self.db.query("SELECT * FROM devices WHERE device_id = ?", (device_id,))
            if not existing:
                self.db.execute(
                    "INSERT INTO devices (device_id, status, active_model_id, active_version, runtime, agent_version,"
                    " first_seen, last_seen, uptime_s, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (device_id, status or "online", active_model_id, active_version, _json(runtime), agent_version,
                     now, now, uptime_s, last_error))
            elif from_state and status == "offline":
                # The Last Will carries no active model: keep the last one the device reported.
                self.db.execute("UPDATE devices SET status = ?, last_seen = ? WHERE device_id = ?",
                                (status, now, device_id))
            elif from_state:
                self.db.execute(
                    "UPDATE devices SET status = ?, active_model_id = ?, active_version = ?, runtime = ?,"
                    " agent_version = ?, last_seen = ? WHERE device_id = ?",
                    (status or "online", active_model_id, active_version,
                     _json(runtime) if runtime is not None else existing[0]["runtime"],
                     agent_version or existing[0]["agent_version"], now, device_id))
            else:
                self.db.execute(
                    "UPDATE devices SET status = ?, last_seen = ?, uptime_s = COALESCE(?, uptime_s),"
                    " active_version = COALESCE(?, active_version), last_error = COALESCE(?, last_error)"
                    " WHERE device_id = ?",
                    (status or "online", now, uptime_s, active_version, last_error, device_id))
        return self.device(device_id)

    def device(self, device_id: str) -> DeviceRecord:
        rows = self.db.query("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        if not rows:
            raise RegistryError(f"device {device_id!r} has never been seen")
        return DeviceRecord.from_row(rows[0])

    def find_device(self, device_id: str) -> DeviceRecord | None:
        rows = self.db.query("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        return DeviceRecord.from_row(rows[0]) if rows else None

    def devices(self) -> list[DeviceRecord]:
        return [DeviceRecord.from_row(r) for r in self.db.query("SELECT * FROM devices ORDER BY device_id")]

    def set_device_error(self, device_id: str, error: str) -> None:
        """Record what last went wrong on a device (shown by `edgeguide-server devices`)."""
        self.db.execute("UPDATE devices SET last_error = ? WHERE device_id = ?",
                        (error[:EVENT_DETAIL_MAX_CHARS], device_id))

    def remove_device(self, device_id: str) -> DeviceRecord:
        """Forget a device (its deployments and events stay); refused while a deployment to it runs."""
        device = self.device(device_id)
        busy = [d.deployment_id for d in self.deployments(active_only=True, device_id=device_id)]
        if busy:
            raise RegistryError(f"device {device_id!r} has deployments in progress: {busy}; cancel them first "
                                "(`edgeguide-server cancel ID`)")
        self.db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
        self.log_event("device_removed", device_id=device_id)
        return device

    def offline_devices(self) -> list[DeviceRecord]:
        """Devices whose last state said offline (a Last Will or a clean stop); `last_seen` is when."""
        rows = self.db.query("SELECT * FROM devices WHERE status = ? ORDER BY device_id", ("offline",))
        return [DeviceRecord.from_row(r) for r in rows]

    # ---- deployments -----------------------------------------------------------------------
    def create_deployment(self, artifact: ArtifactRecord, device_id: str, *, chunk_size: int,
                          policy: dict | None, deadline_s: float, status: str = "pending", reason: str = "",
                          forced: bool = False) -> DeploymentRecord:
        """Insert a new deployment row with a fresh id."""
        now = time.time()
        dep_id = new_deployment_id()
        self.db.execute(
            "INSERT INTO deployments (deployment_id, device_id, artifact_id, model_id, version, status, reason, policy,"
            " chunk_size, forced, created, updated, deadline) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (dep_id, device_id, artifact.id, artifact.model_id, artifact.version, status, reason, _json(policy),
             chunk_size, int(forced), now, now, now + deadline_s))
        self.log_event("deployment_created", device_id=device_id, deployment_id=dep_id,
                       detail=f"{artifact.id} status={status} {reason}".strip())
        return self.deployment(dep_id)

    def deployment(self, deployment_id: str) -> DeploymentRecord:
        rows = self.db.query("SELECT * FROM deployments WHERE deployment_id = ?", (deployment_id,))
        if not rows:
            raise RegistryError(f"no deployment {deployment_id!r}")
        return DeploymentRecord.from_row(rows[0])

    def deployments(self, *, active_only: bool = False, device_id: str | None = None,
                    limit: int | None = None) -> list[DeploymentRecord]:
        sql = "SELECT * FROM deployments"
        where, params = [], []
        if active_only:
            where.append(f"status IN ({', '.join('?' for _ in sorted(ACTIVE))})")
            params.extend(sorted(ACTIVE))
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [DeploymentRecord.from_row(r) for r in self.db.query(sql, params)]

    def update_deployment(self, deployment_id: str, *, status: str | None = None, reason: str | None = None,
                          report: dict | None = None, verdict: dict | None = None,
                          resends: dict[str, int] | None = None, deadline: float | None = None) -> DeploymentRecord:
        """Change the given columns (None = leave as is) and log a status change."""
        if status is not None and status not in STATUSES:
            raise RegistryError(f"unknown deployment status {status!r}; expected one of {STATUSES}")
        sets, params = ["updated = ?"], [time.time()]
        for column, value in (("status", status), ("reason", reason), ("report", _json(report)),
                              ("verdict", _json(verdict)), ("resends", _json(resends)), ("deadline", deadline)):
            if value is not None:
                sets.append(f"{column} = ?")
                params.append(value)
        params.append(deployment_id)
        if self.db.execute(f"UPDATE deployments SET {', '.join(sets)} WHERE deployment_id = ?", params) != 1:
            raise RegistryError(f"no deployment {deployment_id!r}")
        record = self.deployment(deployment_id)
        if status is not None:
            self.log_event(f"status:{status}", device_id=record.device_id, deployment_id=deployment_id,
                           detail=reason or "")
        return record

    # ---- event log -------------------------------------------------------------------------
    def log_event(self, kind: str, *, device_id: str | None = None, deployment_id: str | None = None,
                  detail: str = "") -> None:
        """Append to the event log (device events, status changes, malformed messages)."""
        self.db.execute("INSERT INTO events (ts, device_id, deployment_id, kind, detail) VALUES (?, ?, ?, ?, ?)",
                        (time.time(), device_id, deployment_id, kind[:64], detail[:EVENT_DETAIL_MAX_CHARS]))

    def prune_events(self, *, max_per_device: int, max_age_s: float) -> int:
        """Retention: delete events older than `max_age_s` and all but each device's newest `max_per_device`."""
        deleted = self.db.execute("DELETE FROM events WHERE ts < ?", (time.time() - max_age_s,))
        crowded = self.db.query("SELECT device_id FROM events WHERE device_id IS NOT NULL GROUP BY device_id"
                                " HAVING COUNT(*) > ?", (max_per_device,))
        for row in crowded:
            edge = self.db.query("SELECT id FROM events WHERE device_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
                                 (row["device_id"], max_per_device))
            if edge:
                deleted += self.db.execute("DELETE FROM events WHERE device_id = ? AND id <= ?",
                                           (row["device_id"], edge[0]["id"]))
        return max(deleted, 0)

    def events(self, *, deployment_id: str | None = None, device_id: str | None = None,
               kind_prefix: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        sql, where, params = "SELECT * FROM events", [], []
        if deployment_id is not None:
            where.append("deployment_id = ?")
            params.append(deployment_id)
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        if kind_prefix is not None:
            where.append("kind LIKE ?")
            params.append(kind_prefix.replace("%", "") + "%")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY id LIMIT {int(limit)}"
        return self.db.query(sql, params)
