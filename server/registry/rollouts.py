"""The rollouts and rollout_devices tables: a rollout's status and stage, and each device's part in it.

Every change a second server process might race on is a compare-and-set, like deployment
statuses: the method returns False when another process changed the row first.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from protocol.states import ROLLOUT_TRANSITIONS
from server.registry.events import EventLog
from server.registry.records import TERMINAL, RegistryError
from server.rollout_plan import (
    CLAIM,
    FINISHED,
    RUNNING,
    SKIPPED,
    RolloutPlan,
    RolloutRecord,
)

_LOGGER = logging.getLogger(__name__)


class RolloutTables(EventLog):
    """`rollouts` (one row per rollout) and `rollout_devices` (one row per device of a rollout)."""

    def insert_rollout(self, rollout_id: str, model_id: str, version: int, plan: RolloutPlan,
                       policy: dict[str, Any] | None, skipped: dict[str, str]) -> RolloutRecord:
        """Record a running rollout at stage 0 with one row per device (`skipped` devices already done)."""
        now = time.time()
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO rollouts (rollout_id, model_id, version, plan, policy, status, stage, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
                (rollout_id, model_id, version, json.dumps(plan.to_dict()),
                 json.dumps(policy) if policy is not None else None, RUNNING.value, now, now))
            for index, stage in enumerate(plan.stages):
                for device in stage.devices:
                    self.db.execute("INSERT INTO rollout_devices (rollout_id, device_id, stage, outcome, detail)"
                                    " VALUES (?, ?, ?, ?, ?)",
                                    (rollout_id, device, index, SKIPPED if device in skipped else None,
                                     skipped.get(device, "")))
        return self.rollout(rollout_id)

    def rollout(self, rollout_id: str, *, with_devices: bool = True) -> RolloutRecord:
        """One rollout, with its devices unless `with_devices` is False (RegistryError if unknown)."""
        rows = self.db.query("SELECT * FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        if not rows:
            raise RegistryError(f"no rollout {rollout_id!r}")
        row = rows[0]
        devices = {d["device_id"]: d for d in self.db.query(
            "SELECT * FROM rollout_devices WHERE rollout_id = ? ORDER BY stage, device_id", (rollout_id,))} \
            if with_devices else {}
        return RolloutRecord(row["rollout_id"], row["model_id"], int(row["version"]),
                             RolloutPlan.from_dict(json.loads(row["plan"])),
                             json.loads(row["policy"]) if row["policy"] else None, row["status"], int(row["stage"]),
                             row["reason"], devices)

    def rollouts(self, *, unfinished_only: bool = False, with_devices: bool = True) -> list[RolloutRecord]:
        """Every rollout, oldest first (`unfinished_only`: those still running or rolling back)."""
        sql, params = "SELECT rollout_id FROM rollouts", []
        if unfinished_only:
            finished = sorted(s.value for s in FINISHED)
            sql += f" WHERE status NOT IN ({', '.join('?' for _ in finished)})"
            params = finished
        return [self.rollout(r["rollout_id"], with_devices=with_devices)
                for r in self.db.query(sql + " ORDER BY created", params)]

    def unstarted_rollout_devices(self, rollout_id: str, stage: int, limit: int) -> list[str]:
        """Up to `limit` devices of `stage` with neither a deployment (nor a claim) nor an outcome yet."""
        rows = self.db.query("SELECT device_id FROM rollout_devices WHERE rollout_id = ? AND stage = ?"
                             f" AND deployment_id IS NULL AND outcome IS NULL ORDER BY device_id LIMIT {int(limit)}",
                             (rollout_id, stage))
        return [r["device_id"] for r in rows]

    def rollout_stage_counts(self, rollout_id: str, stage: int) -> tuple[int, int, int]:
        """(devices, failed, still without an outcome) of one stage, counted by the database."""
        row = self.db.query("SELECT COUNT(*) AS n, SUM(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END) AS failed,"
                            " SUM(CASE WHEN outcome IS NULL THEN 1 ELSE 0 END) AS open FROM rollout_devices"
                            " WHERE rollout_id = ? AND stage = ?", (rollout_id, stage))[0]
        return int(row["n"]), int(row["failed"] or 0), int(row["open"] or 0)

    def transition_rollout(self, rollout: RolloutRecord, status: str, stage: int, reason: str) -> bool:
        """Compare-and-set the rollout's status and stage from what `rollout` recorded; logs `rollout:<status>`."""
        ROLLOUT_TRANSITIONS.check(rollout.status, status)  # TransitionError: a caller's bug, not a race
        if self.db.execute("UPDATE rollouts SET status = ?, stage = ?, reason = ?, updated = ? WHERE rollout_id = ?"
                           " AND status = ? AND stage = ?",
                           (str(status), stage, reason, time.time(), rollout.rollout_id, str(rollout.status),
                            rollout.stage)) != 1:
            return False
        self.log_event(f"rollout:{status}", detail=f"{rollout.rollout_id} stage {stage}: {reason}")
        return True

    def claim_rollout_device(self, rollout_id: str, device_id: str) -> bool:
        """Take a device's turn: True for exactly one caller while it has no deployment and no outcome."""
        return self.db.execute("UPDATE rollout_devices SET deployment_id = ? WHERE rollout_id = ? AND device_id = ?"
                               " AND deployment_id IS NULL AND outcome IS NULL",
                               (CLAIM, rollout_id, device_id)) == 1

    def attach_rollout_deployment(self, rollout_id: str, device_id: str, deployment_id: str) -> None:
        """The claimed device's deployment now exists."""
        self.db.execute("UPDATE rollout_devices SET deployment_id = ? WHERE rollout_id = ? AND device_id = ?",
                        (deployment_id, rollout_id, device_id))

    def finished_rollout_members(self, rollout_id: str) -> list[dict[str, Any]]:
        """Devices without an outcome whose deployment has ended (`device_id`, `deployment_id`, `status`,
        `reason`): one query for a whole stage, as a 10,000-device wave is polled every tick."""
        terminal = sorted(str(status) for status in TERMINAL)
        return self.db.query(
            "SELECT r.device_id, r.deployment_id, d.status, d.reason FROM rollout_devices r JOIN deployments d"
            " ON d.deployment_id = r.deployment_id WHERE r.rollout_id = ? AND r.outcome IS NULL"
            f" AND d.status IN ({', '.join('?' for _ in terminal)})", (rollout_id, *terminal))

    def skip_unstarted_rollout_devices(self, rollout_id: str, stage: int, outcome: str, detail: str) -> int:
        """Settle every device of `stage` that has no deployment and no outcome yet (an aborted rollout)."""
        return self.db.execute("UPDATE rollout_devices SET outcome = ?, detail = ? WHERE rollout_id = ? AND stage = ?"
                               " AND deployment_id IS NULL AND outcome IS NULL",
                               (outcome, detail[:500], rollout_id, stage))

    def settle_rollout_device(self, rollout_id: str, device_id: str, outcome: str, detail: str, *,
                              deployment_id: str | None = None, expected: str | None = None) -> bool:
        """Set a device's outcome only while it is `expected` (None: not settled yet); False if it was not.

        `deployment_id` replaces the claim placeholder (None clears it) unless `expected` names
        an outcome, which leaves the deployment id as it is.
        """
        if expected is None:
            return self.db.execute(
                "UPDATE rollout_devices SET deployment_id = CASE WHEN deployment_id = ? THEN ? ELSE deployment_id END,"
                " outcome = ?, detail = ? WHERE rollout_id = ? AND device_id = ? AND outcome IS NULL",
                (CLAIM, deployment_id, outcome, detail[:500], rollout_id, device_id)) == 1
        return self.db.execute("UPDATE rollout_devices SET outcome = ? WHERE rollout_id = ? AND device_id = ?"
                               " AND outcome = ?", (outcome, rollout_id, device_id, expected)) == 1
