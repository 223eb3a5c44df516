"""Message schemas: one dataclass per message kind, with strict decoding.

`to_json()` gives wire bytes; `from_json()` validates types, bounds and identifiers and raises
ProtocolError naming the bad field. Down messages (manifest, verdict, command) are signed by the
server: `signed(key)` returns a copy carrying the signature and `verify(public_key)` checks it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol import names, signing
from protocol.errors import ProtocolError
from protocol.limits import DEFAULT_LIMITS
from protocol.schema import Reader, canonical_json, decode_object, encode
from protocol.states import CommandName, DeviceStatus, ErrorKind, EventType, MeasureMode, VerdictOutcome, wire_values

EVENT_TYPES: frozenset[str] = wire_values(EventType)
ERROR_KINDS: frozenset[str] = wire_values(ErrorKind)
VERDICTS: frozenset[str] = wire_values(VerdictOutcome)
COMMANDS: frozenset[str] = wire_values(CommandName)


def utc_now() -> str:
    """ISO 8601 UTC timestamp used in signed messages."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class _Message:
    """Shared encode/decode plumbing."""

    KIND: ClassVar[str] = "message"

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_json(self) -> bytes:
        return encode(self.to_dict())

    @classmethod
    def from_json(cls, payload: bytes | str, max_bytes: int = DEFAULT_LIMITS.max_json_bytes) -> Self:
        return cls.from_dict(decode_object(payload, cls.KIND, max_bytes))

    @classmethod
    def from_dict(cls, obj: dict) -> Self:  # pragma: no cover - each subclass overrides
        raise NotImplementedError


class _Signed(_Message):
    """A message signed by the server over its canonical JSON without the signature field."""

    signature: str | None

    def canonical(self) -> bytes:
        body = self.to_dict()
        body.pop("signature", None)
        return canonical_json(body)

    def signed(self, key: Ed25519PrivateKey) -> Self:
        return dataclasses.replace(self, signature=signing.sign(key, self.canonical()))  # type: ignore[arg-type]

    def verify(self, key: Ed25519PublicKey) -> None:
        signing.verify(key, self.canonical(), self.signature)


@dataclass(frozen=True)
class Manifest(_Signed):
    """What the server intends to install on one device; checked before any chunk is accepted."""

    KIND: ClassVar[str] = "manifest"
    deployment_id: str
    device_id: str
    model_id: str
    version: int
    total_size: int
    sha256: str
    chunk_size: int
    chunk_sha256: list[str]
    created: str = field(default_factory=utc_now)
    requirements: dict = field(default_factory=dict)
    rollback: bool = False
    # Bytes the artifact's files take unpacked (signed like the rest; None from older servers):
    # the device refuses it above max_unpacked_bytes before downloading, and stops unpacking past it.
    unpacked_size: int | None = None
    signature: str | None = None

    @classmethod
    def from_json(cls, payload: bytes | str, max_bytes: int = DEFAULT_LIMITS.max_manifest_bytes) -> Manifest:
        return cls.from_dict(decode_object(payload, cls.KIND, max_bytes))

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_sha256)

    def to_dict(self) -> dict:
        body = super().to_dict()
        body["chunk_count"] = self.chunk_count
        return body

    @classmethod
    def from_dict(cls, obj: dict) -> Manifest:
        r = Reader(obj, "manifest")
        lim = DEFAULT_LIMITS
        chunk_size = r.int("chunk_size", lo=1, hi=lim.max_chunk_bytes)
        total = r.int("total_size", lo=1, hi=lim.max_artifact_bytes)
        digests = r.list("chunk_sha256", max_len=lim.max_chunks)
        for d in digests:
            names.sha256_hex(d)
        expected = -(-total // chunk_size)
        if len(digests) != expected:
            raise ProtocolError(f"manifest: {len(digests)} chunk digests for {total} bytes in "
                                f"{chunk_size}-byte chunks (expected {expected})")
        count = r.int("chunk_count", required=False)
        if count is not None and count != expected:
            raise ProtocolError(f"manifest.chunk_count {count} != {expected}")
        return cls(
            deployment_id=names.deployment_id(r.str("deployment_id")),
            device_id=names.device_id(r.str("device_id")),
            model_id=names.model_id(r.str("model_id")),
            version=r.int("version", lo=0),
            total_size=total,
            sha256=names.sha256_hex(r.str("sha256")),
            chunk_size=chunk_size,
            chunk_sha256=list(digests),
            created=r.str("created", max_len=64),
            requirements=r.dict("requirements", required=False) or {},
            rollback=bool(r.bool("rollback", required=False)),
            unpacked_size=r.int("unpacked_size", required=False, lo=0),
            signature=r.str("signature", required=False, max_len=128),
        )


@dataclass(frozen=True)
class Verdict(_Signed):
    """The gate's decision for one deployment; the agent acts on it only if the signature holds."""

    KIND: ClassVar[str] = "verdict"
    deployment_id: str
    device_id: str
    model_id: str
    version: int
    verdict: str
    checks: list[dict] = field(default_factory=list)
    reason: str = ""
    created: str = field(default_factory=utc_now)
    signature: str | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    @classmethod
    def from_dict(cls, obj: dict) -> Verdict:
        r = Reader(obj, "verdict")
        checks = r.list("checks", required=False, max_len=256) or []
        if not all(isinstance(c, dict) for c in checks):
            raise ProtocolError("verdict.checks: expected a list of objects")
        return cls(
            deployment_id=names.deployment_id(r.str("deployment_id")),
            device_id=names.device_id(r.str("device_id")),
            model_id=names.model_id(r.str("model_id")),
            version=r.int("version"),
            verdict=r.str("verdict", choices=VERDICTS),
            checks=checks,
            reason=r.str("reason", required=False) or "",
            created=r.str("created", max_len=64),
            signature=r.str("signature", required=False, max_len=128),
        )


@dataclass(frozen=True)
class Command(_Signed):
    """A small signed instruction from the server (never code: a name from a fixed set)."""

    KIND: ClassVar[str] = "command"
    device_id: str
    command: str
    deployment_id: str | None = None
    created: str = field(default_factory=utc_now)
    signature: str | None = None

    @classmethod
    def from_dict(cls, obj: dict) -> Command:
        r = Reader(obj, "command")
        dep = r.str("deployment_id", required=False)
        return cls(
            device_id=names.device_id(r.str("device_id")),
            command=r.str("command", choices=COMMANDS),
            deployment_id=names.deployment_id(dep) if dep is not None else None,
            created=r.str("created", max_len=64),
            signature=r.str("signature", required=False, max_len=128),
        )


@dataclass(frozen=True)
class DeviceState(_Message):
    """Retained presence: online/offline, the active model and the device's runtime."""

    KIND: ClassVar[str] = "state"
    device_id: str
    status: str
    active_model_id: str | None = None
    active_version: int | None = None
    runtime: dict | None = None
    agent_version: str | None = None
    ts: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, obj: dict) -> DeviceState:
        r = Reader(obj, "state")
        mid = r.str("active_model_id", required=False)
        return cls(
            device_id=names.device_id(r.str("device_id")),
            status=r.str("status", choices=wire_values(DeviceStatus)),
            active_model_id=names.model_id(mid) if mid is not None else None,
            active_version=r.int("active_version", required=False),
            runtime=r.dict("runtime", required=False),
            agent_version=r.str("agent_version", required=False, max_len=64),
            ts=r.float("ts", required=False) or 0.0,
        )


@dataclass(frozen=True)
class Heartbeat(_Message):
    """Periodic liveness with uptime and the last error seen."""

    KIND: ClassVar[str] = "heartbeat"
    device_id: str
    uptime_s: float
    active_version: int | None = None
    last_error: str | None = None
    ts: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, obj: dict) -> Heartbeat:
        r = Reader(obj, "heartbeat")
        return cls(
            device_id=names.device_id(r.str("device_id")),
            uptime_s=r.float("uptime_s"),
            active_version=r.int("active_version", required=False),
            last_error=r.str("last_error", required=False),
            ts=r.float("ts", required=False) or 0.0,
        )


@dataclass(frozen=True)
class Event(_Message):
    """A step of a deployment as the device saw it (accepted, missing chunks, rejected, promoted...)."""

    KIND: ClassVar[str] = "event"
    device_id: str
    type: str
    deployment_id: str | None = None
    reason: str | None = None
    missing: list[int] | None = None
    version: int | None = None
    ts: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, obj: dict) -> Event:
        r = Reader(obj, "event")
        dep = r.str("deployment_id", required=False)
        return cls(
            device_id=names.device_id(r.str("device_id")),
            type=r.str("type", choices=EVENT_TYPES),
            deployment_id=names.deployment_id(dep) if dep is not None else None,
            reason=r.str("reason", required=False),
            missing=r.int_list("missing", required=False, max_len=DEFAULT_LIMITS.max_chunks),
            version=r.int("version", required=False),
            ts=r.float("ts", required=False) or 0.0,
        )


@dataclass(frozen=True)
class Report(_Message):
    """What the device measured for one candidate model (see docs/design.md for the figure keys)."""

    KIND: ClassVar[str] = "report"
    device_id: str
    deployment_id: str
    model_id: str
    version: int
    load_ok: bool
    error_kind: str | None = None
    error: str | None = None
    mode: str | None = None
    runtime: dict | None = None
    model_bytes: int | None = None
    latency_ms: dict | None = None
    memory: dict | None = None
    energy: dict | None = None
    quality: dict | None = None
    context: dict | None = None
    paired: dict | None = None
    ts: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, obj: dict) -> Report:
        r = Reader(obj, "report")
        return cls(
            device_id=names.device_id(r.str("device_id")),
            deployment_id=names.deployment_id(r.str("deployment_id")),
            model_id=names.model_id(r.str("model_id")),
            version=r.int("version"),
            load_ok=r.bool("load_ok"),
            error_kind=r.str("error_kind", required=False, choices=ERROR_KINDS),
            error=r.str("error", required=False),
            mode=r.str("mode", required=False, choices=wire_values(MeasureMode)),
            runtime=r.dict("runtime", required=False),
            model_bytes=r.int("model_bytes", required=False),
            latency_ms=r.dict("latency_ms", required=False),
            memory=r.dict("memory", required=False),
            energy=r.dict("energy", required=False),
            quality=r.dict("quality", required=False),
            context=r.dict("context", required=False),
            paired=r.dict("paired", required=False),
            ts=r.float("ts", required=False) or 0.0,
        )

    def figure(self, path: str) -> Any:
        """Dotted lookup such as 'latency_ms.p90'; None when absent (unavailable)."""
        head, _, rest = path.partition(".")
        value: Any = getattr(self, head, None)
        for part in rest.split(".") if rest else []:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        return value
