"""The one interface every power reader implements (why: energy code must not care where watts come from)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

_LOGGER = logging.getLogger(__name__)

UNAVAILABLE = "unavailable"


class PowerUnavailable(Exception):
    """A power figure cannot be read now; carries the source label and why (never a made-up number)."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


def numbered_sysfs_entries(base: Path, pattern: re.Pattern[str]) -> list[tuple[Path, str]]:
    """``(dir, content of its name file)`` for each entry of ``base`` whose name matches ``pattern``.

    ``pattern``'s first group is the entry's number; results come in numeric order (hwmon10 after
    hwmon2). Entries whose ``name`` file cannot be read are skipped: sysfs readers must not fail
    on a driver that is half there.
    """
    if not base.is_dir():
        return []
    found: list[tuple[int, Path, str]] = []
    for entry in base.iterdir():
        match = pattern.match(entry.name)
        if match is None:
            continue
        try:
            name = (entry / "name").read_text().strip()
        except OSError:
            continue
        found.append((int(match[1]), entry, name))
    return [(path, name) for _, path, name in sorted(found)]


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
