"""A rollout's plan (stages of devices, the failure share that stops it) and its stored record.

Kept apart from `server.rollout` (which drives rollouts) so the registry can hand out rollout
records without importing the deployer.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import names
from protocol.errors import ProtocolError
from protocol.states import ROLLOUT_TRANSITIONS, RolloutStatus

_LOGGER = logging.getLogger(__name__)

RUNNING, ROLLING_BACK, ABORTED, COMPLETED = (RolloutStatus.RUNNING, RolloutStatus.ROLLING_BACK, RolloutStatus.ABORTED,
                                            RolloutStatus.COMPLETED)
FINISHED = ROLLOUT_TRANSITIONS.final()
SKIPPED = "skipped"  # a device outcome: it already ran the version, nothing was sent
CLAIM = "claiming"  # placeholder deployment id while one process creates the device's deployment


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
