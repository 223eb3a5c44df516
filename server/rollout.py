"""Staged rollout: one model version to a canary group first, then to waves of devices.

A rollout is a list of stages (named device groups). A stage starts only when the previous one
ended with failures at or below `max_failure_pct`; when a stage's failures pass it, the rollout
stops, no later stage starts, and every device of that stage that promoted the candidate gets a
signed `rollback` command (the agent switches back to its previous slot). Every step is a row
in the registry's database, so a restarted server (or another process sharing the database)
resumes the rollout where it was and never re-sends a finished device's deployment.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import names
from protocol.errors import ProtocolError
from server.deployer import Deployer, DeployError
from server.policy import Policy
from server.registry import TERMINAL, Registry, RegistryError

_LOGGER = logging.getLogger(__name__)

RUNNING, ROLLING_BACK, ABORTED, COMPLETED = "running", "rolling_back", "aborted", "completed"
FINISHED = frozenset({ABORTED, COMPLETED})
SKIPPED = "skipped"  # a device outcome: it already ran the version, nothing was sent
_CLAIM = "claiming"  # placeholder deployment id while one process creates the device's deployment

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rollouts (
        rollout_id TEXT PRIMARY KEY,
        model_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        plan TEXT NOT NULL,
        policy TEXT,
        status TEXT NOT NULL,
        stage INTEGER NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        created DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
        rollout_id TEXT NOT NULL REFERENCES rollouts(rollout_id),
        device_id TEXT NOT NULL,
        stage INTEGER NOT NULL,
        deployment_id TEXT,
        outcome TEXT,
        detail TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (rollout_id, device_id))""",
)


class RolloutError(ValueError):
    """A rollout plan is invalid or names something that does not exist."""


@dataclass(frozen=True)
class Stage:
    """One step of a rollout: a named group of devices deployed together."""

    name: str
    devices: tuple[str, ...]


@dataclass(frozen=True)
class RolloutPlan:
    """Ordered stages and the failure share (percent of a stage) that stops the rollout."""

    stages: tuple[Stage, ...]
    max_failure_pct: float = 20.0

    def __post_init__(self) -> None:
        if not self.stages:
            raise RolloutError("a rollout plan needs at least one stage with devices")
        if not 0.0 <= self.max_failure_pct <= 100.0:
            raise RolloutError(f"max_failure_pct must be in [0, 100], got {self.max_failure_pct}")
        seen: dict[str, str] = {}
        for stage in self.stages:
            if not stage.devices:
                raise RolloutError(f"stage {stage.name!r} has no devices")
            for device in stage.devices:
                try:
                    names.device_id(device)
                except ProtocolError as exc:
                    raise RolloutError(f"stage {stage.name!r}: {exc}") from exc
                if device in seen:
                    raise RolloutError(f"device {device!r} is in stage {seen[device]!r} and again in {stage.name!r}")
                seen[device] = stage.name

    def to_dict(self) -> dict[str, Any]:
        return {"max_failure_pct": self.max_failure_pct,
                "stages": [{"name": s.name, "devices": list(s.devices)} for s in self.stages]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutPlan:
        return cls(tuple(Stage(s["name"], tuple(s["devices"])) for s in data["stages"]),
                   float(data.get("max_failure_pct", 20.0)))


def make_plan(groups: list[tuple[str, list[str]]], devices: list[str], waves: int,
              max_failure_pct: float = 20.0) -> RolloutPlan:
    """Named groups first (in order), then `devices` not in any group split into `waves` near-equal waves."""
    if waves < 1:
        raise RolloutError(f"waves must be >= 1, got {waves}")
    grouped = {d for _name, members in groups for d in members}
    rest = [d for d in dict.fromkeys(devices) if d not in grouped]
    stages = [Stage(name, tuple(members)) for name, members in groups]
    count = min(waves, len(rest))
    for i in range(count):
        # Wave i gets devices i*n/count .. (i+1)*n/count: sizes differ by at most one.
        part = rest[i * len(rest) // count:(i + 1) * len(rest) // count]
        stages.append(Stage(f"wave-{i + 1}", tuple(part)))
    return RolloutPlan(tuple(stages), max_failure_pct)


def parse_group(text: str) -> tuple[str, list[str]]:
    """`canary=dev1,dev2` -> ("canary", ["dev1", "dev2"])."""
    name, sep, members = text.partition("=")
    devices = [d.strip() for d in members.split(",") if d.strip()]
    if not sep or not name.strip() or not devices:
        raise RolloutError(f"a group is NAME=DEV1,DEV2,..., got {text!r}")
    return name.strip(), devices


def load_plan(path: Path, known_devices: list[str]) -> RolloutPlan:
    """A TOML plan: `max_failure_pct`, `waves`, optional `devices` (default: every known device) and
    `[[group]] name = ..., devices = [...]` tables that run first, in file order."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RolloutError(f"cannot read rollout plan {path}: {exc}") from exc
    unknown = set(data) - {"max_failure_pct", "waves", "devices", "group"}
    if unknown:
        raise RolloutError(f"rollout plan {path}: unknown keys {sorted(unknown)}")
    groups = []
    for entry in data.get("group", []):
        if not isinstance(entry, dict) or "name" not in entry or not isinstance(entry.get("devices"), list):
            raise RolloutError(f"rollout plan {path}: each [[group]] needs name and a devices list, got {entry!r}")
        groups.append((str(entry["name"]), [str(d) for d in entry["devices"]]))
    return make_plan(groups, [str(d) for d in data.get("devices", known_devices)], int(data.get("waves", 1)),
                     float(data.get("max_failure_pct", 20.0)))


@dataclass(frozen=True)
class RolloutRecord:
    """A rollout as stored: its plan, where it is, and each device's deployment and outcome."""

    rollout_id: str
    model_id: str
    version: int
    plan: RolloutPlan
    policy: dict[str, Any] | None
    status: str
    stage: int
    reason: str
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class RolloutManager:
    """Creates rollouts and advances them on every server tick (one call = one step per rollout)."""

    def __init__(self, registry: Registry, deployer: Deployer) -> None:
        self.registry = registry
        self.deployer = deployer
        self.db = registry.db
        for statement in _SCHEMA:
            self.db.execute(statement)

    # ---- creation and reading --------------------------------------------------------------
    def create(self, model_id: str, plan: RolloutPlan, *, version: int | None = None,
               policy: Policy | None = None) -> RolloutRecord:
        """Record a running rollout of `model_id` (latest version unless given); a server tick starts it."""
        artifact = self.registry.artifact(model_id, version)
        unknown = [d for stage in plan.stages for d in stage.devices if self.registry.find_device(d) is None]
        if unknown:
            known = [d.device_id for d in self.registry.devices()]
            raise RolloutError("refusing the rollout: " + "; ".join(
                f"device {d!r} has never been seen (start its agent first)" for d in unknown)
                + f". Known devices: {known or 'none'}")
        skipped = {d: why for stage in plan.stages for d in stage.devices
                   if (why := self._already_on(d, artifact.model_id, artifact.version))}
        rollout_id = f"r-{secrets.token_hex(6)}"
        now = time.time()
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO rollouts (rollout_id, model_id, version, plan, policy, status, stage, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
                (rollout_id, artifact.model_id, artifact.version, json.dumps(plan.to_dict()),
                 json.dumps(policy.to_dict()) if policy else None, RUNNING, now, now))
            for index, stage in enumerate(plan.stages):
                for device in stage.devices:
                    self.db.execute("INSERT INTO rollout_devices (rollout_id, device_id, stage, outcome, detail)"
                                    " VALUES (?, ?, ?, ?, ?)", (rollout_id, device, index,
                                                                SKIPPED if device in skipped else None,
                                                                skipped.get(device, "")))
        summary = ", ".join(f"{s.name}={len(s.devices)}" for s in plan.stages)
        self.registry.log_event("rollout:created", detail=f"{rollout_id} {artifact.id} stages {summary} "
                                                          f"max_failure_pct={plan.max_failure_pct}")
        _LOGGER.info("rollout %s of %s created: %s", rollout_id, artifact.id, summary)
        return self.get(rollout_id)

    def _already_on(self, device_id: str, model_id: str, version: int) -> str | None:
        """Why `device_id` needs no deployment (it runs this version already), or None."""
        device = self.registry.find_device(device_id)
        if device is not None and (device.active_model_id, device.active_version) == (model_id, version):
            return f"skipped: already runs {model_id}@{version}"
        return None

    def get(self, rollout_id: str) -> RolloutRecord:
        rows = self.db.query("SELECT * FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        if not rows:
            raise RegistryError(f"no rollout {rollout_id!r}")
        row = rows[0]
        devices = {d["device_id"]: d for d in self.db.query(
            "SELECT * FROM rollout_devices WHERE rollout_id = ? ORDER BY stage, device_id", (rollout_id,))}
        return RolloutRecord(row["rollout_id"], row["model_id"], int(row["version"]),
                             RolloutPlan.from_dict(json.loads(row["plan"])),
                             json.loads(row["policy"]) if row["policy"] else None, row["status"], int(row["stage"]),
                             row["reason"], devices)

    def rollouts(self) -> list[RolloutRecord]:
        return [self.get(r["rollout_id"]) for r in self.db.query("SELECT rollout_id FROM rollouts ORDER BY created")]

    # ---- progress --------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance every unfinished rollout by one step (called from the server's worker thread)."""
        for row in self.db.query("SELECT rollout_id FROM rollouts WHERE status IN (?, ?)", (RUNNING, ROLLING_BACK)):
            self._advance(self.get(row["rollout_id"]))

    def _advance(self, rollout: RolloutRecord) -> None:
        members = [d for d in rollout.devices.values() if d["stage"] == rollout.stage]
        if rollout.status == RUNNING:
            for member in members:
                if member["deployment_id"] is None and member["outcome"] is None:
                    self._start_device(rollout, member["device_id"])
        self._collect_outcomes(rollout)
        rollout = self.get(rollout.rollout_id)
        members = [d for d in rollout.devices.values() if d["stage"] == rollout.stage]
        failed = sum(1 for m in members if m["outcome"] == "failed")
        done = all(m["outcome"] is not None for m in members)
        pct = 100.0 * failed / len(members)  # a skipped device counts as done, not failed
        name = rollout.plan.stages[rollout.stage].name
        if rollout.status == RUNNING and pct > rollout.plan.max_failure_pct:
            reason = (f"stage {name!r}: {failed} of {len(members)} devices failed ({pct:.0f} % > "
                      f"{rollout.plan.max_failure_pct:g} %); rolling back its promoted devices")
            self._set_status(rollout, ROLLING_BACK, rollout.stage, reason, from_status=RUNNING)
            rollout = self.get(rollout.rollout_id)
        if rollout.status == ROLLING_BACK:
            self._roll_back_promoted(rollout, members)
            if done:
                self._set_status(rollout, ABORTED, rollout.stage, rollout.reason, from_status=ROLLING_BACK)
            return
        if not done:
            return
        if rollout.stage + 1 < len(rollout.plan.stages):
            self._set_status(rollout, RUNNING, rollout.stage + 1,
                             f"stage {name!r} done ({failed} of {len(members)} failed)", from_status=RUNNING)
        else:
            self._set_status(rollout, COMPLETED, rollout.stage,
                             f"all {len(rollout.plan.stages)} stages done (last: {failed} of {len(members)} failed)",
                             from_status=RUNNING)

    def _start_device(self, rollout: RolloutRecord, device_id: str) -> None:
        # Claim the row first: with several server processes, exactly one creates the deployment.
        if self.db.execute("UPDATE rollout_devices SET deployment_id = ? WHERE rollout_id = ? AND device_id = ?"
                           " AND deployment_id IS NULL AND outcome IS NULL",
                           (_CLAIM, rollout.rollout_id, device_id)) != 1:
            return
        why = self._already_on(device_id, rollout.model_id, rollout.version)
        if why:  # promoted since the rollout was created (e.g. by a plain deploy)
            self.db.execute("UPDATE rollout_devices SET deployment_id = NULL, outcome = ?, detail = ?"
                            " WHERE rollout_id = ? AND device_id = ?", (SKIPPED, why, rollout.rollout_id, device_id))
            return
        policy = Policy.from_dict(rollout.policy) if rollout.policy else None
        try:
            dep = self.deployer.create(rollout.model_id, device_id, version=rollout.version, policy=policy)
        except DeployError as exc:  # unknown device or runtime that cannot load it: a failure of this stage
            rows = self.registry.deployments(device_id=device_id, limit=1)
            dep_id = rows[0].deployment_id if rows and rows[0].status == "rejected" and \
                rows[0].version == rollout.version else None
            self.db.execute("UPDATE rollout_devices SET deployment_id = ?, outcome = 'failed', detail = ?"
                            " WHERE rollout_id = ? AND device_id = ?",
                            (dep_id, str(exc)[:500], rollout.rollout_id, device_id))
            self.registry.log_event("rollout:device_failed", device_id=device_id, deployment_id=dep_id,
                                    detail=f"{rollout.rollout_id}: {exc}")
            return
        self.db.execute("UPDATE rollout_devices SET deployment_id = ? WHERE rollout_id = ? AND device_id = ?",
                        (dep.deployment_id, rollout.rollout_id, device_id))
        self.registry.log_event("rollout:device_started", device_id=device_id, deployment_id=dep.deployment_id,
                                detail=rollout.rollout_id)
        self.deployer.start(dep.deployment_id)

    def _collect_outcomes(self, rollout: RolloutRecord) -> None:
        # One query for the whole stage, not one per device: a 10,000-device wave is polled every tick.
        terminal = sorted(TERMINAL)
        rows = self.db.query(
            "SELECT r.device_id, d.status, d.reason FROM rollout_devices r JOIN deployments d"
            " ON d.deployment_id = r.deployment_id WHERE r.rollout_id = ? AND r.outcome IS NULL"
            f" AND d.status IN ({', '.join('?' for _ in terminal)})", (rollout.rollout_id, *terminal))
        for row in rows:
            outcome = "promoted" if row["status"] == "promoted" else "failed"
            self.db.execute("UPDATE rollout_devices SET outcome = ?, detail = ? WHERE rollout_id = ? AND device_id = ?"
                            " AND outcome IS NULL", (outcome, f"{row['status']}: {row['reason']}"[:500],
                                                     rollout.rollout_id, row["device_id"]))

    def _roll_back_promoted(self, rollout: RolloutRecord, members: list[dict[str, Any]]) -> None:
        """Tell each promoted device of the failed stage to switch back to its previous model (once)."""
        for member in members:
            if member["outcome"] != "promoted":
                continue
            if self.db.execute("UPDATE rollout_devices SET outcome = 'rollback_sent' WHERE rollout_id = ? AND"
                               " device_id = ? AND outcome = 'promoted'",
                               (rollout.rollout_id, member["device_id"])) != 1:
                continue
            self.deployer.send_command(member["device_id"], "rollback", member["deployment_id"])
            self.registry.log_event("rollout:rollback_sent", device_id=member["device_id"],
                                    deployment_id=member["deployment_id"], detail=rollout.rollout_id)
            _LOGGER.warning("rollout %s: told %s to roll back %s@%s", rollout.rollout_id, member["device_id"],
                            rollout.model_id, rollout.version)

    def _set_status(self, rollout: RolloutRecord, status: str, stage: int, reason: str, *, from_status: str) -> None:
        if self.db.execute("UPDATE rollouts SET status = ?, stage = ?, reason = ?, updated = ? WHERE rollout_id = ?"
                           " AND status = ? AND stage = ?",
                           (status, stage, reason, time.time(), rollout.rollout_id, from_status, rollout.stage)) == 1:
            self.registry.log_event(f"rollout:{status}", detail=f"{rollout.rollout_id} stage {stage}: {reason}")
            _LOGGER.info("rollout %s: %s (stage %d) %s", rollout.rollout_id, status, stage, reason)
