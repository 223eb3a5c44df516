"""Tiny typed accessors that validate decoded JSON against the message schemas.

Each accessor names the message and field in its error, so a malformed message is reported as
`report.latency_ms: expected object, got list` rather than a KeyError deep in a handler.
"""

from __future__ import annotations

import json
import math
from typing import Any

from protocol.errors import ProtocolError
from protocol.limits import DEFAULT_LIMITS


def decode_object(payload: bytes | str, what: str, max_bytes: int = DEFAULT_LIMITS.max_json_bytes) -> dict:
    """Decode a bounded UTF-8 JSON object; anything else is a ProtocolError."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"{what}: {len(payload)} bytes exceeds the limit of {max_bytes}")
    try:
        text = payload if isinstance(payload, str) else bytes(payload).decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_int64)
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: not valid JSON ({exc})") from exc
    except (ValueError, RecursionError, TypeError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and integers beyond Python's
        # 4300-digit conversion limit; RecursionError is deep nesting. None may escape as a traceback.
        raise ProtocolError(f"{what}: not valid UTF-8 JSON ({str(exc)[:200]})") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"JSON constant {name} is not allowed")


MAX_INT_DIGITS = 19  # every integer of the protocol fits in 64 bits


def _int64(text: str) -> int:
    """Integers beyond 64 bits are refused before conversion: 4,000 digits pass Python's own
    limit, but not float() (OverflowError in the gate) nor any field of the protocol."""
    digits = len(text) - text.startswith("-")
    value = int(text) if digits <= MAX_INT_DIGITS else None
    if value is None or not -(2**63) <= value < 2**63:
        raise ProtocolError(f"integer of {digits} digits is outside the 64-bit range")
    return value


def _finite_float(text: str) -> float:
    """A JSON number that overflows to inf (1e999) is refused like the Infinity constant."""
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"number {text[:40]!r} is not finite")
    return value


def canonical_json(obj: dict) -> bytes:
    """The one byte form that is signed: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def encode(obj: dict) -> bytes:
    """Encode a message body for the wire."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


class Reader:
    """Typed, bounded access to the fields of one decoded message."""

    def __init__(self, obj: dict, what: str) -> None:
        self.obj = obj
        self.what = what

    def _get(self, key: str, required: bool) -> Any:
        if key not in self.obj or self.obj[key] is None:
            if required:
                raise ProtocolError(f"{self.what}: missing required field {key!r}")
            return None
        return self.obj[key]

    def _fail(self, key: str, expected: str, value: Any) -> ProtocolError:
        return ProtocolError(f"{self.what}.{key}: expected {expected}, got {value!r:.80}")

    def str(self, key: str, required: bool = True, max_len: int = DEFAULT_LIMITS.max_string,
            choices: frozenset[str] | None = None) -> str | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, str) or len(value) > max_len:
            raise self._fail(key, f"a string of at most {max_len} chars", value)
        if choices is not None and value not in choices:
            raise self._fail(key, f"one of {sorted(choices)}", value)
        return value

    def int(self, key: str, required: bool = True, lo: int = 0, hi: int = 2**53) -> int | None:
        value = self._get(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self._fail(key, f"an integer in [{lo}, {hi}]", value)
        return value

    def float(self, key: str, required: bool = True) -> float | None:
        value = self._get(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._fail(key, "a finite number", value)
        return float(value)

    def bool(self, key: str, required: bool = True) -> bool | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def dict(self, key: str, required: bool = True) -> dict | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._fail(key, "an object", value)
        return value

    def list(self, key: str, required: bool = True, max_len: int = DEFAULT_LIMITS.max_list) -> list | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) > max_len:
            raise self._fail(key, f"a list of at most {max_len} items", value)
        return value

    def int_list(self, key: str, required: bool = True, lo: int = 0, hi: int = 2**31,
                 max_len: int = DEFAULT_LIMITS.max_list) -> list[int] | None:
        values = self.list(key, required, max_len)
        if values is None:
            return None
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise self._fail(key, f"integers in [{lo}, {hi}]", v)
        return values
