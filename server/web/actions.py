"""Operator actions from the dashboard, through the same server objects the command line drives.

`deploy` is `EdgeGuideServer.deploy` (what `edgeguide-server deploy --broker` calls), `start_rollout`
is `make_plan` + `RolloutManager.create` (`edgeguide-server rollout`), `cancel` is
`Deployer.cancel(notify=True)` (`edgeguide-server cancel --broker`), `abort_rollout` is
`RolloutManager.abort`, and `rollback_device` sends the signed `rollback` command a failed rollout
stage sends. Every action is written to the registry's event log as `operator:<action>`.
Each returns a one-line message for the page; bad input raises ActionError with the reason.
"""

from __future__ import annotations

import logging
from typing import Any

from server.deployer import DeployError
from server.registry import RegistryError
from server.rollout import RolloutError, make_plan, parse_group

_LOGGER = logging.getLogger(__name__)


class ActionError(ValueError):
    """The action was refused; the message says why (shown to the operator, nothing changed)."""


def model_ref(text: str) -> tuple[str, int | None]:
    """`MODEL`, `MODEL@VERSION` or `MODEL:VERSION` (as the command line accepts)."""
    text = text.strip()
    cut = max(text.rfind("@"), text.rfind(":"))
    if cut < 0:
        return text, None
    try:
        return text[:cut], int(text[cut + 1:])
    except ValueError:
        raise ActionError(f"MODEL@VERSION expects an integer version, got {text!r}") from None


class Actions:
    """The actions a logged-in operator may take on one running server (an `EdgeGuideServer`)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.registry = server.registry

    def _audit(self, action: str, detail: str, device_id: str | None = None,
               deployment_id: str | None = None) -> None:
        self.registry.log_event(f"operator:{action}", device_id=device_id, deployment_id=deployment_id,
                                detail=f"dashboard: {detail}")

    def deploy(self, model: str, device_id: str) -> str:
        model_id, version = model_ref(model)
        device_id = device_id.strip()
        try:
            record = self.server.deploy(model_id, device_id, version=version)
        except (DeployError, RegistryError) as exc:
            raise ActionError(str(exc)) from exc
        self._audit("deploy", f"{record.model_id}@{record.version} -> {device_id}", device_id, record.deployment_id)
        return f"deployment {record.deployment_id}: {record.model_id}@{record.version} -> {device_id} started"

    def cancel(self, deployment_id: str) -> str:
        try:
            dep = self.server.deployer.cancel(deployment_id, notify=True)
        except (DeployError, RegistryError) as exc:
            raise ActionError(str(exc)) from exc
        self._audit("cancel", deployment_id, dep.device_id, deployment_id)
        return f"deployment {deployment_id} cancelled; {dep.device_id} keeps its current model"

    def start_rollout(self, model: str, groups: str, devices: str, waves: int, max_failure_pct: float) -> str:
        model_id, version = model_ref(model)
        try:
            group_list = [parse_group(g) for g in groups.split(";") if g.strip()]
            wanted = [d.strip() for d in devices.split(",") if d.strip()] or \
                [d.device_id for d in self.registry.devices()]
            plan = make_plan(group_list, wanted, waves, max_failure_pct)
            rollout = self.server.rollouts.create(model_id, plan, version=version)
        except (RolloutError, RegistryError, DeployError) as exc:
            raise ActionError(str(exc)) from exc
        summary = ", ".join(f"{s.name}={len(s.devices)}" for s in plan.stages)
        self._audit("rollout", f"{rollout.rollout_id} {rollout.model_id}@{rollout.version} stages {summary}")
        return (f"rollout {rollout.rollout_id}: {rollout.model_id}@{rollout.version} in {len(plan.stages)} stages, "
                f"stop above {plan.max_failure_pct:g} % failures")

    def abort_rollout(self, rollout_id: str) -> str:
        try:
            rollout = self.server.rollouts.abort(rollout_id, "stopped by an operator from the dashboard")
        except (RolloutError, RegistryError) as exc:
            raise ActionError(str(exc)) from exc
        self._audit("abort_rollout", rollout_id)
        return f"rollout {rollout_id} {rollout.status}: its promoted devices of the current stage roll back"

    def rollback_device(self, device_id: str) -> str:
        """Tell the device to switch back to its previous model, naming the deployment that promoted its
        current one (the agent refuses a rollback naming any other: a replayed command undoes nothing)."""
        device = self.registry.find_device(device_id)
        if device is None:
            raise ActionError(f"device {device_id!r} has never been seen")
        if device.active_model_id is None:
            raise ActionError(f"device {device_id!r} runs no model: nothing to roll back")
        promoted = next((d for d in self.registry.deployments(device_id=device_id)
                         if d.status == "promoted" and (d.model_id, d.version) ==
                         (device.active_model_id, device.active_version)), None)
        if promoted is None:
            raise ActionError(f"no promoted deployment of {device.active_model_id}@{device.active_version} to "
                              f"{device_id} is recorded: it was not installed by this server")
        self.server.deployer.send_command(device_id, "rollback", promoted.deployment_id)
        self._audit("rollback", f"{device_id} away from {promoted.model_id}@{promoted.version}", device_id,
                    promoted.deployment_id)
        return (f"rollback sent to {device_id} (undoes {promoted.deployment_id}, "
                f"{promoted.model_id}@{promoted.version}); its state updates when the device confirms")
