"""Staged rollout: one model version to a canary group first, then to waves of devices.

A rollout is a list of stages (named device groups). A stage starts only when the previous one
ended with failures at or below `max_failure_pct`; when a stage's failures pass it, the rollout
stops, no later stage starts, and every device of that stage that promoted the candidate gets a
signed `rollback` command (the agent switches back to its previous slot). Every step is a row
in the registry's database, so a restarted server (or another process sharing the database)
resumes the rollout where it was and never re-sends a finished device's deployment.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable
from typing import Any

from server.deployer import Deployer, DeployError
from server.policy import Policy
from server.registry import Registry, RegistryError
from server.rollout_plan import (
    ABORTED,
    CLAIM,
    COMPLETED,
    FINISHED,
    ROLLING_BACK,
    RUNNING,
    SKIPPED,
    RolloutError,
    RolloutPlan,
    RolloutRecord,
    Stage,
    load_plan,
    make_plan,
    parse_group,
)

_LOGGER = logging.getLogger(__name__)

__all__ = ["ABORTED", "COMPLETED", "FINISHED", "ROLLING_BACK", "RUNNING", "SKIPPED", "RolloutError", "RolloutManager",
           "RolloutPlan", "RolloutRecord", "Stage", "load_plan", "make_plan", "parse_group"]


class RolloutManager:
    """Creates rollouts and advances them on every server tick (one call = one step per rollout)."""

    def __init__(self, registry: Registry, deployer: Deployer, *, starts_per_tick: int = 100) -> None:
        if starts_per_tick < 1:
            raise ValueError(f"starts_per_tick must be >= 1, got {starts_per_tick}")
        self.registry = registry
        self.deployer = deployer
        # A wave starts in slices: each tick starts at most this many devices per rollout and per
        # server process, so device reports keep flowing between slices instead of waiting behind
        # thousands of manifests signed in one go.
        self.starts_per_tick = starts_per_tick

    # ---- creation and reading --------------------------------------------------------------
    def create(self, model_id: str, plan: RolloutPlan, *, version: int | None = None,
               policy: Policy | None = None) -> RolloutRecord:
        """Record a running rollout (see `create_rollout`); the next tick starts it."""
        return create_rollout(self.registry, model_id, plan, version=version, policy=policy)

    def get(self, rollout_id: str) -> RolloutRecord:
        return self.registry.rollout(rollout_id)

    def rollouts(self) -> list[RolloutRecord]:
        return self.registry.rollouts()

    def abort(self, rollout_id: str, reason: str) -> RolloutRecord:
        """Stop a running rollout now (an operator's call): see `abort_rollout`; its devices hear now."""
        return abort_rollout(self.registry, rollout_id, reason,
                             cancel=lambda dep_id: self.deployer.cancel(dep_id, notify=True))

    # ---- progress --------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance every unfinished rollout by one step (called from the server's worker thread).

        Costs what the step does, not the rollout's size: the device list is read only to roll back.
        """
        for rollout in self.registry.rollouts(unfinished_only=True, with_devices=False):
            self._advance(rollout)

    def _advance(self, rollout: RolloutRecord) -> None:
        if rollout.status == RUNNING:
            self._start_slice(rollout)
        self._collect_outcomes(rollout)
        rollout = self.registry.rollout(rollout.rollout_id, with_devices=False)
        total, failed, still_open = self.registry.rollout_stage_counts(rollout.rollout_id, rollout.stage)
        done = still_open == 0
        pct = 100.0 * failed / max(1, total)  # a skipped device counts as done, not failed
        name = rollout.plan.stages[rollout.stage].name
        if rollout.status == RUNNING and pct > rollout.plan.max_failure_pct:
            reason = (f"stage {name!r}: {failed} of {total} devices failed ({pct:.0f} % > "
                      f"{rollout.plan.max_failure_pct:g} %); rolling back its promoted devices")
            self._set_status(rollout, ROLLING_BACK, rollout.stage, reason, from_status=RUNNING)
            rollout = self.registry.rollout(rollout.rollout_id, with_devices=False)
        if rollout.status == ROLLING_BACK:
            members = [d for d in self.get(rollout.rollout_id).devices.values() if d["stage"] == rollout.stage]
            self._roll_back_promoted(rollout, members)
            if done:
                self._set_status(rollout, ABORTED, rollout.stage, rollout.reason, from_status=ROLLING_BACK)
            return
        if not done:
            return
        if rollout.stage + 1 < len(rollout.plan.stages):
            self._set_status(rollout, RUNNING, rollout.stage + 1,
                             f"stage {name!r} done ({failed} of {total} failed)", from_status=RUNNING)
        else:
            self._set_status(rollout, COMPLETED, rollout.stage,
                             f"all {len(rollout.plan.stages)} stages done (last: {failed} of {total} failed)",
                             from_status=RUNNING)

    def _start_slice(self, rollout: RolloutRecord) -> None:
        """Start up to `starts_per_tick` unstarted devices of the current stage.

        Candidates are shuffled so that server processes sharing the database mostly claim
        different devices instead of racing for the same ones (a lost claim costs one UPDATE).
        """
        candidates = self.registry.unstarted_rollout_devices(rollout.rollout_id, rollout.stage,
                                                             limit=4 * self.starts_per_tick)
        random.shuffle(candidates)
        for device_id in candidates[:self.starts_per_tick]:
            self._start_device(rollout, device_id)

    def _start_device(self, rollout: RolloutRecord, device_id: str) -> None:
        # Claim, record and attach in one transaction: a process killed (or failing) half-way leaves
        # no claim without a deployment, which the stage would wait on forever; the device stays
        # unstarted and another tick or process starts it. The manifest goes out after the commit.
        with self.registry.db.transaction():
            deployment_id = self._claim_and_record(rollout, device_id)
        if deployment_id is not None:
            self.deployer.start(deployment_id)

    def _claim_and_record(self, rollout: RolloutRecord, device_id: str) -> str | None:
        """The new deployment of `device_id` to start, or None (claimed elsewhere, skipped, failed)."""
        # Claim the row first: with several server processes, exactly one creates the deployment.
        if not self.registry.claim_rollout_device(rollout.rollout_id, device_id):
            return None
        why = already_on(self.registry, device_id, rollout.model_id, rollout.version)
        if why:  # promoted since the rollout was created (e.g. by a plain deploy)
            self.registry.settle_rollout_device(rollout.rollout_id, device_id, SKIPPED, why)
            return None
        policy = Policy.from_dict(rollout.policy) if rollout.policy else None
        try:
            dep = self.deployer.create(rollout.model_id, device_id, version=rollout.version, policy=policy)
        except DeployError as exc:  # unknown device or runtime that cannot load it: a failure of this stage
            rows = self.registry.deployments(device_id=device_id, limit=1)
            dep_id = rows[0].deployment_id if rows and rows[0].status == "rejected" and \
                rows[0].version == rollout.version else None
            self.registry.settle_rollout_device(rollout.rollout_id, device_id, "failed", str(exc),
                                                deployment_id=dep_id)
            self.registry.log_event("rollout:device_failed", device_id=device_id, deployment_id=dep_id,
                                    detail=f"{rollout.rollout_id}: {exc}")
            return None
        self.registry.attach_rollout_deployment(rollout.rollout_id, device_id, dep.deployment_id)
        self.registry.log_event("rollout:device_started", device_id=device_id, deployment_id=dep.deployment_id,
                                detail=rollout.rollout_id)
        return dep.deployment_id

    def _collect_outcomes(self, rollout: RolloutRecord) -> None:
        for row in self.registry.finished_rollout_members(rollout.rollout_id):
            outcome = "promoted" if row["status"] == "promoted" else "failed"
            self.registry.settle_rollout_device(rollout.rollout_id, row["device_id"], outcome,
                                                f"{row['status']}: {row['reason']}", deployment_id=row["deployment_id"])

    def _roll_back_promoted(self, rollout: RolloutRecord, members: list[dict[str, Any]]) -> None:
        """Tell each promoted device of the failed stage to switch back to its previous model (once)."""
        for member in members:
            if member["outcome"] != "promoted":
                continue
            if not self.registry.settle_rollout_device(rollout.rollout_id, member["device_id"], "rollback_sent", "",
                                                       expected="promoted"):
                continue
            self.deployer.send_command(member["device_id"], "rollback", member["deployment_id"])
            self.registry.log_event("rollout:rollback_sent", device_id=member["device_id"],
                                    deployment_id=member["deployment_id"], detail=rollout.rollout_id)
            _LOGGER.warning("rollout %s: told %s to roll back %s@%s", rollout.rollout_id, member["device_id"],
                            rollout.model_id, rollout.version)

    def _set_status(self, rollout: RolloutRecord, status: str, stage: int, reason: str, *, from_status: str) -> None:
        if rollout.status != from_status:
            return
        if self.registry.transition_rollout(rollout, status, stage, reason):
            _LOGGER.info("rollout %s: %s (stage %d) %s", rollout.rollout_id, status, stage, reason)


def abort_rollout(registry: Registry, rollout_id: str, reason: str,
                  cancel: Callable[[str], object]) -> RolloutRecord:
    """Stop a running rollout: no later stage starts, the current stage's devices not started yet
    are skipped, `cancel(deployment_id)` ends its deployments in progress, and the next ticks of a
    running server tell its promoted devices to roll back, as when a stage fails past the threshold.

    Needs no broker: the command line cancels with `notify=False` (the running server's tick sends
    the signed cancel), the server and the dashboard with `notify=True`.
    """
    rollout = registry.rollout(rollout_id)
    if rollout.status != RUNNING:
        raise RolloutError(f"rollout {rollout_id} is {rollout.status}, not running: nothing to abort")
    if not registry.transition_rollout(rollout, ROLLING_BACK, rollout.stage, f"aborted: {reason}"):
        raise RolloutError(f"rollout {rollout_id} changed while aborting it: {registry.rollout(rollout_id).status}")
    _LOGGER.info("rollout %s: aborted (stage %d): %s", rollout_id, rollout.stage, reason)
    registry.skip_unstarted_rollout_devices(rollout_id, rollout.stage, SKIPPED, "not started: the rollout was aborted")
    for member in registry.rollout(rollout_id).devices.values():
        dep_id = member["deployment_id"]
        if member["stage"] != rollout.stage or member["outcome"] is not None or dep_id in (None, CLAIM):
            continue
        try:
            cancel(dep_id)
        except (DeployError, RegistryError) as exc:  # it ended meanwhile: its outcome is collected as usual
            _LOGGER.info("rollout %s abort: %s", rollout_id, exc)
    return registry.rollout(rollout_id)


def create_rollout(registry: Registry, model_id: str, plan: RolloutPlan, *, version: int | None = None,
                   policy: Policy | None = None) -> RolloutRecord:
    """Record a running rollout of `model_id` (latest version unless given); a server tick starts it.

    Needs no deployer: a command line without a broker records it for a running server.
    """
    artifact = registry.artifact(model_id, version)
    unknown = [d for stage in plan.stages for d in stage.devices if registry.find_device(d) is None]
    if unknown:
        known = [d.device_id for d in registry.devices()]
        raise RolloutError("refusing the rollout: " + "; ".join(
            f"device {d!r} has never been seen (start its agent first)" for d in unknown)
            + f". Known devices: {known or 'none'}")
    skipped = {d: why for stage in plan.stages for d in stage.devices
               if (why := already_on(registry, d, artifact.model_id, artifact.version))}
    rollout_id = f"r-{secrets.token_hex(6)}"
    record = registry.insert_rollout(rollout_id, artifact.model_id, artifact.version, plan,
                                     policy.to_dict() if policy else None, skipped)
    summary = ", ".join(f"{s.name}={len(s.devices)}" for s in plan.stages)
    registry.log_event("rollout:created", detail=f"{rollout_id} {artifact.id} stages {summary} "
                                                 f"max_failure_pct={plan.max_failure_pct}")
    _LOGGER.info("rollout %s of %s created: %s", rollout_id, artifact.id, summary)
    return record


def already_on(registry: Registry, device_id: str, model_id: str, version: int) -> str | None:
    """Why `device_id` needs no deployment (it runs this version already), or None."""
    device = registry.find_device(device_id)
    if device is not None and (device.active_model_id, device.active_version) == (model_id, version):
        return f"skipped: already runs {model_id}@{version}"
    return None
