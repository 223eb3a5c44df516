"""Intel RAPL package energy counters turned into power (CPU package, not wall power)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

from agent.measure.power.base import PowerUnavailable, numbered_sysfs_entries

_LOGGER = logging.getLogger(__name__)

_TOP_DOMAIN = re.compile(r"^intel-rapl:(\d+)$")


def energy_delta_uj(previous: int, current: int, max_range_uj: int) -> int:
    """Energy between two counter readings, across at most one wraparound at ``max_range_uj``."""
    if max_range_uj <= 0:
        raise ValueError(f"max_energy_range_uj must be > 0, got {max_range_uj}")
    for name, value in (("previous", previous), ("current", current)):
        if not 0 <= value <= max_range_uj:
            raise ValueError(f"{name} counter {value} outside [0, max_energy_range_uj={max_range_uj}]")
    if current >= previous:
        return current - previous
    return max_range_uj - previous + current


def find_rapl_packages(root: str | Path = "/") -> list[Path]:
    """Top-level ``intel-rapl:N`` package domains (sub-domains and psys would double count)."""
    entries = numbered_sysfs_entries(Path(root) / "sys" / "class" / "powercap", _TOP_DOMAIN)
    return [path for path, name in entries if name.startswith("package")]


class RaplPower:
    """Average power since the previous read, summed over packages; ``energy_uj`` is root-only since 5.10."""

    out_of_process = False

    def __init__(self, domains: list[Path], *, clock: Callable[[], float] = time.monotonic,
                 prime_s: float = 0.05, min_interval_s: float = 0.05) -> None:
        if not domains:
            raise ValueError("RaplPower needs at least one intel-rapl:N domain directory")
        self.domains = [Path(d) for d in domains]
        self.clock = clock
        self.prime_s = prime_s
        self.min_interval_s = min_interval_s
        names = "+".join(self._name(d) for d in self.domains)
        self.source = f"rapl:{names} (CPU package energy counter: not DRAM-complete, not wall power)"
        self._previous: tuple[float, list[int]] | None = None

    @staticmethod
    def _name(domain: Path) -> str:
        try:
            return (domain / "name").read_text().strip()
        except OSError:
            return domain.name

    def _counters(self) -> list[int]:
        values = []
        for domain in self.domains:
            path = domain / "energy_uj"
            try:
                values.append(int(path.read_text().strip()))
            except PermissionError as exc:
                raise PowerUnavailable(self.source, f"{path} is not readable (root-only since Linux 5.10); "
                                       "run the agent as root or grant read access") from exc
            except (OSError, ValueError) as exc:
                raise PowerUnavailable(self.source, f"cannot read {path}: {exc}") from exc
        return values

    def _max_ranges(self) -> list[int]:
        try:
            return [int((d / "max_energy_range_uj").read_text().strip()) for d in self.domains]
        except (OSError, ValueError) as exc:
            raise PowerUnavailable(self.source, f"cannot read max_energy_range_uj: {exc}") from exc

    def prime(self) -> None:
        """Take the reference counter reading the next :meth:`read` averages from."""
        self._previous = (self.clock(), self._counters())

    def read(self) -> float:
        """Watts averaged since the last call (an unprimed reader primes and waits ``prime_s``)."""
        if self._previous is None:
            self.prime()
            time.sleep(self.prime_s)
        now, counters = self.clock(), self._counters()
        assert self._previous is not None  # prime() set it
        then, before = self._previous
        self._previous = (now, counters)
        elapsed = now - then
        if elapsed <= 0:
            raise PowerUnavailable(self.source, f"clock did not advance between reads ({then} -> {now})")
        joules = sum(energy_delta_uj(prev, cur, top)
                     for prev, cur, top in zip(before, counters, self._max_ranges(), strict=True)) / 1e6
        return joules / elapsed
