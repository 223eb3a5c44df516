"""The deployments table: create rows, read them, and change a status only along the transition table.

Every status change is a compare-and-set (`UPDATE ... WHERE status IN (expected)`), so two
processes sharing the database never both move one deployment: the loser gets None and leaves
the row alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from server.registry.events import EventLog
from server.registry.records import (
    ACTIVE,
    ArtifactRecord,
    DeploymentRecord,
    RegistryError,
    allowed_sources,
    check_transition,
    deployment_status,
    new_deployment_id,
)
from server.registry.records import to_json as _json

_LOGGER = logging.getLogger(__name__)


class DeploymentTables(EventLog):
    """`deployments`: one row per artifact sent to one device."""

    def create_deployment(self, artifact: ArtifactRecord, device_id: str, *, chunk_size: int,
                          policy: dict | None, deadline_s: float, status: str = "pending", reason: str = "",
                          forced: bool = False) -> DeploymentRecord:
        """Insert a new deployment row with a fresh id (`pending`, or `rejected` when refused up front;
        tests and benchmarks seed other statuses)."""
        status = deployment_status(status)
        now = time.time()
        dep_id = new_deployment_id()
        self.db.execute(
            "INSERT INTO deployments (deployment_id, device_id, artifact_id, model_id, version, status, reason, policy,"
            " chunk_size, forced, created, updated, deadline) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (dep_id, device_id, artifact.id, artifact.model_id, artifact.version, status.value, reason, _json(policy),
             chunk_size, int(forced), now, now, now + deadline_s))
        self.log_event("deployment_created", device_id=device_id, deployment_id=dep_id,
                       detail=f"{artifact.id} status={status} {reason}".strip())
        return self.deployment(dep_id)

    def deployment(self, deployment_id: str) -> DeploymentRecord:
        rows = self.db.query("SELECT * FROM deployments WHERE deployment_id = ?", (deployment_id,))
        if not rows:
            raise RegistryError(f"no deployment {deployment_id!r}")
        return DeploymentRecord.from_row(rows[0])

    def deployments(self, *, active_only: bool = False, device_id: str | None = None, limit: int | None = None,
                    status: str | None = None, reason: str | None = None) -> list[DeploymentRecord]:
        """Deployments newest first, filtered by activity, device, exact status and exact reason."""
        sql = "SELECT * FROM deployments"
        where: list[str] = []
        params: list[Any] = []
        if active_only:
            where.append(f"status IN ({', '.join('?' for _ in ACTIVE)})")
            params.extend(sorted(s.value for s in ACTIVE))
        for column, value in (("device_id", device_id), ("status", status), ("reason", reason)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [DeploymentRecord.from_row(r) for r in self.db.query(sql, params)]

    def deployments_due(self, now: float, offline_since: float) -> list[tuple[DeploymentRecord, float | None]]:
        """Active deployments a tick must act on, each with the time its device went offline when that
        device has been offline since before `offline_since` and the deployment started before it
        (else None): pending ones, those past their deadline, and those whose device is gone.

        One filtered query, so a tick costs what it acts on, not the number of deployments in flight
        (a 10,000-device wave re-read in full every second starved the ingest).
        """
        active = sorted(s.value for s in ACTIVE)
        gone = "v.status = ? AND v.last_seen < ? AND d.created < ?"
        sql = (f"SELECT d.*, CASE WHEN {gone} THEN v.last_seen END AS device_offline_at FROM deployments d"
               f" LEFT JOIN devices v ON v.device_id = d.device_id WHERE d.status IN"
               f" ({', '.join('?' for _ in active)}) AND (d.status = ? OR d.deadline < ? OR ({gone}))"
               " ORDER BY d.created")
        offline = ("offline", offline_since, offline_since)
        rows = self.db.query(sql, (*offline, *active, "pending", now, *offline))
        return [(DeploymentRecord.from_row(r),
                 None if r["device_offline_at"] is None else float(r["device_offline_at"])) for r in rows]

    def transition(self, deployment_id: str, expected: Iterable[str], status: str, *, reason: str | None = None,
                   report: dict | None = None, verdict: dict | None = None) -> DeploymentRecord | None:
        """Compare-and-set: move to `status` only while the row is in one of `expected`.

        Each expected -> `status` pair must be in the transition table (RegistryError otherwise:
        a caller's bug, not a race). Returns the updated record, or None when the row was no longer
        in an expected status (another process or message got there first). Logs `status:<new>`.
        """
        olds = check_transition(expected, status)
        sets, params = ["status = ?", "updated = ?"], [str(status), time.time()]
        for column, value in (("reason", reason), ("report", _json(report)), ("verdict", _json(verdict))):
            if value is not None:
                sets.append(f"{column} = ?")
                params.append(value)
        # RETURNING: the new row comes back with the update (one round trip instead of two per status change).
        sql = (f"UPDATE deployments SET {', '.join(sets)} WHERE deployment_id = ? AND status IN "
               f"({', '.join('?' for _ in olds)}) RETURNING *")
        rows = self.db.query(sql, [*params, deployment_id, *(old.value for old in olds)])
        if len(rows) != 1:
            return None
        record = DeploymentRecord.from_row(rows[0])
        self.log_event(f"status:{status}", device_id=record.device_id, deployment_id=deployment_id,
                       detail=reason or "")
        return record

    def update_deployment(self, deployment_id: str, *, status: str | None = None, reason: str | None = None,
                          report: dict | None = None, verdict: dict | None = None,
                          resends: dict[str, int] | None = None, deadline: float | None = None) -> DeploymentRecord:
        """Change the given columns (None = leave as is); a status change must be allowed from the current one."""
        if status is not None:
            allowed = allowed_sources(status)
            current = self.deployment(deployment_id).status if self._exists(deployment_id) else None
            if current is None:
                raise RegistryError(f"no deployment {deployment_id!r}")
            if self.transition(deployment_id, allowed, status, reason=reason, report=report,
                               verdict=verdict) is None:
                raise RegistryError(f"deployment {deployment_id} cannot move from {current!r} to {status!r}")
            reason = report = verdict = None
        sets: list[str] = ["updated = ?"]
        params: list[Any] = [time.time()]
        for column, value in (("reason", reason), ("report", _json(report)), ("verdict", _json(verdict)),
                              ("resends", _json(resends)), ("deadline", deadline)):
            if value is not None:
                sets.append(f"{column} = ?")
                params.append(value)
        params.append(deployment_id)
        if self.db.execute(f"UPDATE deployments SET {', '.join(sets)} WHERE deployment_id = ?", params) != 1:
            raise RegistryError(f"no deployment {deployment_id!r}")
        return self.deployment(deployment_id)

    def _exists(self, deployment_id: str) -> bool:
        return bool(self.db.query("SELECT 1 AS one FROM deployments WHERE deployment_id = ?", (deployment_id,)))
