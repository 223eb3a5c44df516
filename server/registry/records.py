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

from protocol.states import DEPLOYMENT_ACTIVE, DEPLOYMENT_TERMINAL, DEPLOYMENT_TRANSITIONS, DeploymentStatus

_LOGGER = logging.getLogger(__name__)

# The vocabulary and the transition table are protocol.states'; these names are the registry's view.
STATUSES: tuple[str, ...] = tuple(s.value for s in DeploymentStatus)
TERMINAL: frozenset[DeploymentStatus] = DEPLOYMENT_TERMINAL
ACTIVE: frozenset[DeploymentStatus] = DEPLOYMENT_ACTIVE
TRANSITIONS = DEPLOYMENT_TRANSITIONS

# Event details are device-supplied reasons and server messages: cut to this many characters.
EVENT_DETAIL_MAX_CHARS = 1000


class RegistryError(Exception):
    """A registry request names something that does not exist or cannot be stored."""


def deployment_status(status: str) -> DeploymentStatus:
    """`status` as a member; RegistryError naming the known ones for anything else."""
    try:
        return DeploymentStatus(status)
    except ValueError:
        raise RegistryError(f"unknown deployment status {status!r}; expected one of {STATUSES}") from None


def allowed_sources(status: str) -> tuple[DeploymentStatus, ...]:
    """Every status a deployment may move to `status` from (sorted, for a stable SQL statement)."""
    return tuple(sorted(TRANSITIONS.sources(deployment_status(status))))


def check_transition(expected: Iterable[str], status: str) -> tuple[DeploymentStatus, ...]:
    """`expected` as a tuple, after checking each may move to `status` (TransitionError: a caller's bug)."""
    olds = tuple(deployment_status(old) for old in expected)
    if not olds:
        raise RegistryError(f"a move to {status!r} needs at least one expected status")
    for old in olds:
        TRANSITIONS.check(old, deployment_status(status))
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
