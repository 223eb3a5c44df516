"""What the registry hands out: immutable records of its rows, and the deployment status rules.

Records are built from dict rows (`from_row`) and never write back: every change goes through a
`Registry` method, which owns the SQL.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LOGGER = logging.getLogger(__name__)

STATUSES = ("pending", "transferring", "measuring", "passed", "failed", "rejected", "promoted",
            "rolled_back", "timeout", "cancelled")
TERMINAL = frozenset({"rejected", "promoted", "rolled_back", "timeout", "cancelled"})
ACTIVE = frozenset(STATUSES) - TERMINAL
# Which status may follow which: the one table every status change is checked against.
# A device may still promote or discard a candidate after the server timed the deployment out.
TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"transferring", "measuring", "passed", "failed"}),
    "transferring": frozenset({"measuring", "passed", "failed"}),
    "measuring": frozenset({"passed", "failed"}),
    "passed": frozenset(),
    "failed": frozenset(),
    "timeout": frozenset({"promoted", "rolled_back"}),
    "rejected": frozenset(),
    "promoted": frozenset(),
    "rolled_back": frozenset(),
    "cancelled": frozenset(),
}
for _active in ACTIVE:  # any deployment in progress can end early, or be promoted / rolled back by its device
    TRANSITIONS[_active] = TRANSITIONS[_active] | {"rejected", "timeout", "cancelled", "promoted", "rolled_back"}

# Event details are device-supplied reasons and server messages: cut to this many characters.
EVENT_DETAIL_MAX_CHARS = 1000


class RegistryError(Exception):
    """A registry request names something that does not exist or cannot be stored."""


def allowed_sources(status: str) -> tuple[str, ...]:
    """Every status a deployment may move to `status` from (sorted, for a stable SQL statement)."""
    if status not in STATUSES:
        raise RegistryError(f"unknown deployment status {status!r}; expected one of {STATUSES}")
    return tuple(sorted(old for old, news in TRANSITIONS.items() if status in news))


def check_transition(expected: Iterable[str], status: str) -> tuple[str, ...]:
    """`expected` as a tuple, after checking that each may move to `status` (RegistryError if not)."""
    olds = tuple(expected)
    allowed = allowed_sources(status)
    bad = [old for old in olds if old not in allowed]
    if bad or not olds:
        raise RegistryError(f"a deployment cannot move from {bad or 'nothing'} to {status!r}; allowed from "
                            f"{list(allowed)}")
    return olds


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


def to_json(obj: Any) -> str | None:
    """A column's JSON text (None stays NULL); NaN is refused rather than stored unreadable."""
    return None if obj is None else json.dumps(obj, sort_keys=True, allow_nan=False)


def new_deployment_id() -> str:
    """A fresh `d-<12 hex>` id (48 random bits)."""
    return f"d-{secrets.token_hex(6)}"


def chunk_digests_path(packed_path: Path) -> Path:
    """Sidecar of a packed blob: its per-chunk SHA-256 at the default chunk size."""
    return packed_path.with_name(packed_path.name.removesuffix(".tar.gz") + ".chunks.json")
