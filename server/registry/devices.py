"""The devices table (what each device last said) and the servers table (which server processes run)."""

from __future__ import annotations

import logging
import time

from server.registry.events import EventLog
from server.registry.records import EVENT_DETAIL_MAX_CHARS, DeviceRecord, RegistryError
from server.registry.records import to_json as _json

_LOGGER = logging.getLogger(__name__)


class DeviceTables(EventLog):
    """`devices` and `servers`: upserted from device messages and server stamps."""

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

    def delete_device(self, device_id: str) -> None:
        """Remove a device's row (callers check first that nothing runs on it)."""
        self.db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
