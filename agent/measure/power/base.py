"""The one interface every power reader implements (why: energy code must not care where watts come from)."""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

_LOGGER = logging.getLogger(__name__)

UNAVAILABLE = "unavailable"


class PowerUnavailable(Exception):
    """A power figure cannot be read now; carries the source label and why (never a made-up number)."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


@runtime_checkable
class PowerSource(Protocol):
    """Reads instantaneous power in watts.

    ``source`` is a human label saying what is measured (e.g. board-internal rails vs wall power);
    ``min_interval_s`` is the fastest sensible sampling interval; ``out_of_process`` asks the
    sampler to call :meth:`read` from a separate process (for costly readers such as Termux's).
    """

    source: str
    min_interval_s: float
    out_of_process: bool

    def read(self) -> float:
        """Watts now; raises :class:`PowerUnavailable` when no honest figure exists."""
        ...
