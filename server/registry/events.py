"""The event log table: what happened, appended by every part of the server, pruned by age and count."""

from __future__ import annotations

import logging
import time
from typing import Any

from server.db import Database
from server.registry.records import EVENT_DETAIL_MAX_CHARS

_LOGGER = logging.getLogger(__name__)


class EventLog:
    """Append, prune and read the `events` table; the base of the registry's table groups."""

    db: Database

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
