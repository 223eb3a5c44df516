"""Tiny typed accessors that validate decoded JSON against the message schemas.

Each accessor names the message and field in its error, so a malformed message is reported as
`report.latency_ms: expected object, got list` rather than a KeyError deep in a handler.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Callable
from typing import Any, TypeAlias, Union, get_args, get_origin, get_type_hints

from protocol.errors import ProtocolError
from protocol.limits import DEFAULT_LIMITS


def decode_object(payload: bytes | str, what: str, max_bytes: int = DEFAULT_LIMITS.max_json_bytes) -> dict[str, Any]:
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


def canonical_json(obj: dict[str, Any]) -> bytes:
    """The one byte form that is signed: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def encode(obj: dict[str, Any]) -> bytes:
    """Encode a message body for the wire."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


# Reader's methods are named after the types they read, which shadows those names in its body.
_Str: TypeAlias = str
_Int: TypeAlias = int
_Float: TypeAlias = float
_Bool: TypeAlias = bool
JsonObject: TypeAlias = dict[str, Any]
JsonList: TypeAlias = list[Any]
_IntList: TypeAlias = list[int]


class Reader:
    """Typed, bounded access to the fields of one decoded message."""

    def __init__(self, obj: JsonObject, what: _Str) -> None:
        self.obj = obj
        self.what = what

    def _get(self, key: _Str, required: _Bool) -> Any:
        if key not in self.obj or self.obj[key] is None:
            if required:
                raise ProtocolError(f"{self.what}: missing required field {key!r}")
            return None
        return self.obj[key]

    def _fail(self, key: _Str, expected: _Str, value: Any) -> ProtocolError:
        return ProtocolError(f"{self.what}.{key}: expected {expected}, got {value!r:.80}")

    def str(self, key: _Str, required: _Bool = True, max_len: _Int = DEFAULT_LIMITS.max_string,
            choices: frozenset[_Str] | None = None) -> _Str | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, str) or len(value) > max_len:
            raise self._fail(key, f"a string of at most {max_len} chars", value)
        if choices is not None and value not in choices:
            raise self._fail(key, f"one of {sorted(choices)}", value)
        return value

    def int(self, key: _Str, required: _Bool = True, lo: _Int = 0, hi: _Int = 2**53) -> _Int | None:
        value = self._get(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self._fail(key, f"an integer in [{lo}, {hi}]", value)
        return value

    def float(self, key: _Str, required: _Bool = True) -> _Float | None:
        value = self._get(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._fail(key, "a finite number", value)
        return float(value)

    def bool(self, key: _Str, required: _Bool = True) -> _Bool | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def dict(self, key: _Str, required: _Bool = True) -> JsonObject | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._fail(key, "an object", value)
        return value

    def list(self, key: _Str, required: _Bool = True, max_len: _Int = DEFAULT_LIMITS.max_list) -> JsonList | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) > max_len:
            raise self._fail(key, f"a list of at most {max_len} items", value)
        return value

    def int_list(self, key: _Str, required: _Bool = True, lo: _Int = 0, hi: _Int = 2**31,
                 max_len: _Int = DEFAULT_LIMITS.max_list) -> _IntList | None:
        values = self.list(key, required, max_len)
        if values is None:
            return None
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise self._fail(key, f"integers in [{lo}, {hi}]", v)
        return values


# -- schemas declared once: decoding derived from a dataclass's fields ---------------------------------
_DEFAULT = object()


def wire(*, required: bool | None = None, max_len: int | None = None, lo: int | None = None, hi: int | None = None,
         choices: frozenset[str] | None = None, check: Callable[[Any], Any] | None = None,
         item_check: Callable[[Any], Any] | None = None, missing: Any = _DEFAULT) -> dict[str, Any]:
    """A field's wire rules, for `dataclasses.field(metadata=wire(...))`; unset ones take Reader's defaults.

    `required` defaults to "the field has no default"; `check` validates (and may normalise) a
    present value, `item_check` each item of a list; `missing` is the value of an absent optional
    field when it is not the dataclass default (a receive timestamp absent on the wire is 0.0,
    not the time of decoding).
    """
    rules = {"required": required, "max_len": max_len, "lo": lo, "hi": hi, "choices": choices, "check": check,
             "item_check": item_check, "missing": missing}
    return {"wire": {k: v for k, v in rules.items() if v is not None and v is not _DEFAULT}}


@dataclasses.dataclass(frozen=True)
class _FieldRule:
    name: str
    kind: type
    item: type | None
    required: bool
    missing: Callable[[], Any]
    limits: dict[str, Any]
    check: Callable[[Any], Any] | None
    item_check: Callable[[Any], Any] | None


_RULES: dict[type, tuple[_FieldRule, ...]] = {}


def _rule(f: dataclasses.Field[Any], hint: Any) -> _FieldRule:
    meta = dict(f.metadata.get("wire", {}))
    if get_origin(hint) in (Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    kind = get_origin(hint) or hint
    args = get_args(hint)
    item = args[0] if kind is list and args else None
    has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    if "missing" in meta:
        value = meta.pop("missing")
        missing: Callable[[], Any] = lambda: value  # noqa: E731
    elif f.default_factory is not dataclasses.MISSING:
        missing = f.default_factory
    else:
        default = None if f.default is dataclasses.MISSING else f.default
        missing = lambda: default  # noqa: E731
    limits = {k: meta[k] for k in ("max_len", "lo", "hi", "choices") if k in meta}
    return _FieldRule(f.name, kind, get_origin(item) or item, meta.get("required", not has_default), missing,
                      limits, meta.get("check"), meta.get("item_check"))


def _rules(cls: type) -> tuple[_FieldRule, ...]:
    rules = _RULES.get(cls)
    if rules is None:
        hints = get_type_hints(cls)
        rules = tuple(_rule(f, hints[f.name]) for f in dataclasses.fields(cls))
        _RULES[cls] = rules
    return rules


def decode_fields(cls: type, obj: dict[str, Any], what: str) -> dict[str, Any]:
    """The constructor arguments of dataclass `cls` read from `obj`, each checked by its type and wire rules.

    Types: str, int, float, bool, dict, list[int], list[str], list[dict], each optionally `| None`.
    Fields are read in declaration order; the first bad one raises ProtocolError naming it.
    """
    r = Reader(obj, what)
    values: dict[str, Any] = {}
    for rule in _rules(cls):
        value = _read(r, rule)
        if value is None:
            values[rule.name] = rule.missing()
            continue
        if rule.item_check is not None:
            for item in value:
                rule.item_check(item)
        values[rule.name] = rule.check(value) if rule.check is not None else value
    return values


def _read(r: Reader, rule: _FieldRule) -> Any:
    name, required, limits = rule.name, rule.required, rule.limits
    if rule.kind is str:
        return r.str(name, required, **limits)
    if rule.kind is bool:
        return r.bool(name, required)
    if rule.kind is int:
        return r.int(name, required, **limits)
    if rule.kind is float:
        return r.float(name, required)
    if rule.kind is dict:
        return r.dict(name, required)
    if rule.kind is list and rule.item is int:
        return r.int_list(name, required, **limits)
    if rule.kind is list:
        values = r.list(name, required, **limits)
        if values is not None and rule.item is dict and not all(isinstance(v, dict) for v in values):
            raise ProtocolError(f"{r.what}.{name}: expected a list of objects")
        return values
    raise TypeError(f"{r.what}.{name}: no wire decoding for {rule.kind!r}")
