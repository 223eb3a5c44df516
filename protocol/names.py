"""Validation of identifiers that arrive in messages.

Identifiers end up in topics, file names and SQL parameters, so each must match a strict pattern
before use; nothing received is ever used as a path as it is.
"""

from __future__ import annotations

import re

from protocol.errors import ProtocolError

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
DEPLOYMENT_ID_RE = re.compile(r"^d-[0-9a-f]{12}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _check(kind: str, pattern: re.Pattern[str], value: object) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ProtocolError(f"invalid {kind} {value!r:.80}: must match {pattern.pattern}")
    return value


def device_id(value: object) -> str:
    """Return `value` if it is a valid device id (letters, digits, '_' and '-', at most 64)."""
    return _check("device id", DEVICE_ID_RE, value)


def model_id(value: object) -> str:
    """Return `value` if it is a valid model id (letters, digits, '_', '-', '.', at most 96)."""
    if isinstance(value, str) and ".." in value:
        raise ProtocolError(f"invalid model id {value!r}: '..' is not allowed")
    return _check("model id", MODEL_ID_RE, value)


def deployment_id(value: object) -> str:
    """Return `value` if it is a deployment id such as 'd-0123456789ab'."""
    return _check("deployment id", DEPLOYMENT_ID_RE, value)


def sha256_hex(value: object) -> str:
    """Return `value` if it is a lower-case hex SHA-256 digest."""
    return _check("sha256", SHA256_RE, value)


def peek_deployment_id(obj: object) -> str | None:
    """The valid deployment id of an already decoded message we refuse, or None (never raises)."""
    value = obj.get("deployment_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) and DEPLOYMENT_ID_RE.fullmatch(value) else None
