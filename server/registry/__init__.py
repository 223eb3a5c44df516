"""The server's registry: artifacts, devices, deployments, rollouts and an event log, under one data dir.

Everything the server knows survives a restart here, so a deployment interrupted by a server
restart continues from its recorded status. The registry owns all of the server's SQL: the
deployer, the rollout manager and the command line call its methods and never write rows
themselves. Statements go through `server.db` so the same SQL runs on SQLite and PostgreSQL;
the schema is versioned and upgraded on open (`server.registry.schema`).

`Registry` is one object made of table groups (one module each): its methods are the storage
API of the whole server, and the checks that span tables (unregister, remove a device) live here.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from server.db import Database, SqliteDatabase, open_database
from server.registry import schema
from server.registry.artifacts import ArtifactTables
from server.registry.deployments import DeploymentTables
from server.registry.devices import DeviceTables
from server.registry.records import (
    ACTIVE,
    EVENT_DETAIL_MAX_CHARS,
    STATUSES,
    TERMINAL,
    TRANSITIONS,
    ArtifactRecord,
    DeploymentRecord,
    DeviceRecord,
    RegistryError,
    chunk_digests_path,
    new_deployment_id,
)
from server.registry.rollouts import RolloutTables

_LOGGER = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "edgeguide"
DB_FILE = "registry.sqlite"

__all__ = ["ACTIVE", "DB_FILE", "DEFAULT_DATA_DIR", "EVENT_DETAIL_MAX_CHARS", "STATUSES", "TERMINAL", "TRANSITIONS",
           "ArtifactRecord", "DeploymentRecord", "DeviceRecord", "Registry", "RegistryError", "chunk_digests_path",
           "new_deployment_id"]


class Registry(ArtifactTables, DeviceTables, DeploymentTables, RolloutTables):
    """Persistent state of one server, rooted at `data_dir`; opening it upgrades its schema."""

    def __init__(self, data_dir: Path = DEFAULT_DATA_DIR, db: Database | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir = self.data_dir / "artifacts"
        self.reports_dir = self.data_dir / "reports"
        self.db = db or open_database(self.data_dir / DB_FILE)
        try:
            schema.upgrade(self.db, self.db.sqlalchemy_url())
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    @property
    def spans_messages(self) -> bool:
        """Whether one transaction may hold device messages' writes: PostgreSQL yes. On SQLite a write
        transaction locks the whole file, so a message held open there would stall every other server
        process for its whole handling (measured: -10 % ingest with two processes)."""
        return not isinstance(self.db, SqliteDatabase)

    def unit_of_work(self) -> AbstractContextManager[None]:
        """One transaction around a group of device messages' writes where `spans_messages` (one commit
        instead of one per statement; all land or none does); elsewhere statements commit one by one."""
        return self.db.transaction() if self.spans_messages else nullcontext()

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
        self.withdraw_artifact(artifact)
        self.log_event("unregistered", detail=artifact.id)
        _LOGGER.info("unregistered %s", artifact.id)
        return artifact

    def remove_device(self, device_id: str) -> DeviceRecord:
        """Forget a device (its deployments and events stay); refused while a deployment to it runs."""
        device = self.device(device_id)
        busy = [d.deployment_id for d in self.deployments(active_only=True, device_id=device_id)]
        if busy:
            raise RegistryError(f"device {device_id!r} has deployments in progress: {busy}; cancel them first "
                                "(`edgeguide-server cancel ID`)")
        self.delete_device(device_id)
        self.log_event("device_removed", device_id=device_id)
        return device
