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
from protocol.schema import Reader, canonical_json, decode_fields, decode_object, encode, wire
from protocol.states import CommandName, DeviceStatus, ErrorKind, EventType, MeasureMode, VerdictOutcome, wire_values

EVENT_TYPES: frozenset[str] = wire_values(EventType)
ERROR_KINDS: frozenset[str] = wire_values(ErrorKind)
VERDICTS: frozenset[str] = wire_values(VerdictOutcome)
COMMANDS: frozenset[str] = wire_values(CommandName)


_LIM = DEFAULT_LIMITS
DEVICE_ID = wire(check=names.device_id)
DEPLOYMENT_ID = wire(check=names.deployment_id)
MODEL_ID = wire(check=names.model_id)
CREATED = wire(required=True, max_len=64)  # has a default for senders, but every receiver needs it
SIGNATURE = wire(max_len=128)
RECEIVED_TS = wire(missing=0.0)  # absent on the wire: 0.0, not the time of decoding


def utc_now() -> str:
    """ISO 8601 UTC timestamp used in signed messages."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _json_copy(value: Any) -> Any:
    """A copy of a JSON tree: new dicts and lists, shared immutable leaves."""
    if isinstance(value, dict):
        return {key: _json_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_copy(item) for item in value]
    return value


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


class _Message:
    """Shared encode/decode plumbing."""

    KIND: ClassVar[str] = "message"
    __dataclass_fields__: ClassVar[dict[str, Any]]  # every subclass is a dataclass

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, as a fresh JSON tree (callers may change it; the message stays as is).

        Fields hold JSON values only, so copying dicts and lists is enough: `dataclasses.asdict`
        deep-copies every leaf through `copy.deepcopy`, which cost a server ~1 ms per report.
        """
        return {name: _json_copy(value) for name in _field_names(type(self))
                if (value := getattr(self, name)) is not None}

    def to_json(self) -> bytes:
        return encode(self.to_dict())

    @classmethod
    def from_json(cls, payload: bytes | str, max_bytes: int = DEFAULT_LIMITS.max_json_bytes) -> Self:
        return cls.from_dict(decode_object(payload, cls.KIND, max_bytes))

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Self:
        """Decode by the dataclass's own fields (types plus `wire` rules): each field declared once."""
        values = decode_fields(cls, obj, cls.KIND)
        cls._check_decoded(obj, values)
        return cls(**values)

    @classmethod
    def _check_decoded(cls, obj: dict[str, Any], values: dict[str, Any]) -> None:
        """Rules across fields (none by default)."""


class _Signed(_Message):
    """A message signed by the server over its canonical JSON without the signature field."""

    signature: str | None

    def canonical(self) -> bytes:
        body = self.to_dict()
        body.pop("signature", None)
        return canonical_json(body)

    def signed(self, key: Ed25519PrivateKey) -> Self:
        return dataclasses.replace(self, signature=signing.sign(key, self.canonical()))

    def verify(self, key: Ed25519PublicKey) -> None:
        signing.verify(key, self.canonical(), self.signature)


@dataclass(frozen=True)
class Manifest(_Signed):
    """What the server intends to install on one device; checked before any chunk is accepted."""

    KIND: ClassVar[str] = "manifest"
    deployment_id: str = field(metadata=DEPLOYMENT_ID)
    device_id: str = field(metadata=DEVICE_ID)
    model_id: str = field(metadata=MODEL_ID)
    version: int
    total_size: int = field(metadata=wire(lo=1, hi=_LIM.max_artifact_bytes))
    sha256: str = field(metadata=wire(check=names.sha256_hex))
    chunk_size: int = field(metadata=wire(lo=1, hi=_LIM.max_chunk_bytes))
    chunk_sha256: list[str] = field(metadata=wire(max_len=_LIM.max_chunks, item_check=names.sha256_hex))
    created: str = field(default_factory=utc_now, metadata=CREATED)
    requirements: dict[str, Any] = field(default_factory=dict)
    rollback: bool = False
    # Bytes the artifact's files take unpacked (signed like the rest; None from older servers):
    # the device refuses it above max_unpacked_bytes before downloading, and stops unpacking past it.
    unpacked_size: int | None = None
    signature: str | None = field(default=None, metadata=SIGNATURE)

    @classmethod
    def from_json(cls, payload: bytes | str, max_bytes: int = DEFAULT_LIMITS.max_manifest_bytes) -> Manifest:
        return cls.from_dict(decode_object(payload, cls.KIND, max_bytes))

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_sha256)

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body["chunk_count"] = self.chunk_count
        return body

    @classmethod
    def _check_decoded(cls, obj: dict[str, Any], values: dict[str, Any]) -> None:
        total, chunk_size, digests = values["total_size"], values["chunk_size"], values["chunk_sha256"]
        expected = -(-total // chunk_size)
        if len(digests) != expected:
            raise ProtocolError(f"manifest: {len(digests)} chunk digests for {total} bytes in "
                                f"{chunk_size}-byte chunks (expected {expected})")
        count = Reader(obj, "manifest").int("chunk_count", required=False)
        if count is not None and count != expected:
            raise ProtocolError(f"manifest.chunk_count {count} != {expected}")


@dataclass(frozen=True)
class Verdict(_Signed):
    """The gate's decision for one deployment; the agent acts on it only if the signature holds."""

    KIND: ClassVar[str] = "verdict"
    deployment_id: str = field(metadata=DEPLOYMENT_ID)
    device_id: str = field(metadata=DEVICE_ID)
    model_id: str = field(metadata=MODEL_ID)
    version: int
    verdict: str = field(metadata=wire(choices=VERDICTS))
    checks: list[dict[str, Any]] = field(default_factory=list, metadata=wire(max_len=256))
    reason: str = ""
    created: str = field(default_factory=utc_now, metadata=CREATED)
    signature: str | None = field(default=None, metadata=SIGNATURE)

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"


@dataclass(frozen=True)
class Command(_Signed):
    """A small signed instruction from the server (never code: a name from a fixed set)."""

    KIND: ClassVar[str] = "command"
    device_id: str = field(metadata=DEVICE_ID)
    command: str = field(metadata=wire(choices=COMMANDS))
    deployment_id: str | None = field(default=None, metadata=DEPLOYMENT_ID)
    created: str = field(default_factory=utc_now, metadata=CREATED)
    signature: str | None = field(default=None, metadata=SIGNATURE)


@dataclass(frozen=True)
class DeviceState(_Message):
    """Retained presence: online/offline, the active model and the device's runtime."""

    KIND: ClassVar[str] = "state"
    device_id: str = field(metadata=DEVICE_ID)
    status: str = field(metadata=wire(choices=wire_values(DeviceStatus)))
    active_model_id: str | None = field(default=None, metadata=MODEL_ID)
    active_version: int | None = None
    runtime: dict[str, Any] | None = None
    agent_version: str | None = field(default=None, metadata=wire(max_len=64))
    ts: float = field(default_factory=time.time, metadata=RECEIVED_TS)


@dataclass(frozen=True)
class Heartbeat(_Message):
    """Periodic liveness with uptime and the last error seen."""

    KIND: ClassVar[str] = "heartbeat"
    device_id: str = field(metadata=DEVICE_ID)
    uptime_s: float
    active_version: int | None = None
    last_error: str | None = None
    ts: float = field(default_factory=time.time, metadata=RECEIVED_TS)


@dataclass(frozen=True)
class Event(_Message):
    """A step of a deployment as the device saw it (accepted, missing chunks, rejected, promoted...)."""

    KIND: ClassVar[str] = "event"
    device_id: str = field(metadata=DEVICE_ID)
    type: str = field(metadata=wire(choices=EVENT_TYPES))
    deployment_id: str | None = field(default=None, metadata=DEPLOYMENT_ID)
    reason: str | None = None
    missing: list[int] | None = field(default=None, metadata=wire(max_len=_LIM.max_chunks))
    version: int | None = None
    ts: float = field(default_factory=time.time, metadata=RECEIVED_TS)


@dataclass(frozen=True)
class Report(_Message):
    """What the device measured for one candidate model (see docs/design.md for the figure keys)."""

    KIND: ClassVar[str] = "report"
    device_id: str = field(metadata=DEVICE_ID)
    deployment_id: str = field(metadata=DEPLOYMENT_ID)
    model_id: str = field(metadata=MODEL_ID)
    version: int
    load_ok: bool
    error_kind: str | None = field(default=None, metadata=wire(choices=ERROR_KINDS))
    error: str | None = None
    mode: str | None = field(default=None, metadata=wire(choices=wire_values(MeasureMode)))
    runtime: dict[str, Any] | None = None
    model_bytes: int | None = None
    latency_ms: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    energy: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    context: dict[str, Any] | None = None
    paired: dict[str, Any] | None = None
    ts: float = field(default_factory=time.time, metadata=RECEIVED_TS)

    def figure(self, path: str) -> Any:
        """Dotted lookup such as 'latency_ms.p90'; None when absent (unavailable)."""
        head, _, rest = path.partition(".")
        value: Any = getattr(self, head, None)
        for part in rest.split(".") if rest else []:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        return value
