"""Exceptions raised for anything received that does not follow the protocol."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A message, name or frame is malformed, too large or inconsistent.

    The text names the field and the offending value so a log line is enough to act on.
    """


class SignatureError(ProtocolError):
    """A signed message has no signature, a malformed one, or one the pinned key rejects."""
