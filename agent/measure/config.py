"""Run-length presets for a measurement (why: measurement.md fixes the minimums, tests need a short mode)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

_LOGGER = logging.getLogger(__name__)

Mode = Literal["quick", "full"]
MODES: tuple[str, ...] = ("quick", "full")


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """Minimum run counts and durations of every pass; each pass stops when BOTH minimums are met.

    Latency: ``warmup_*`` then ``timed_*`` (TFLite benchmark_model + MLPerf single-stream rules).
    Memory: ``memory_*`` inferences with an RSS sampling thread at ``rss_hz`` (its own pass).
    Energy: an idle window of ``idle_s`` then a loaded window of ``energy_s`` with power sampled at
    ``power_hz`` (its own pass); slow sources stretch both windows to ``min_power_samples`` samples.
    """

    mode: Mode
    warmup_min_runs: int
    warmup_min_s: float
    timed_min_runs: int
    timed_min_s: float
    memory_min_runs: int
    memory_min_s: float
    rss_hz: float = 200.0
    idle_s: float = 5.0
    energy_s: float = 20.0
    power_hz: float = 20.0
    min_power_samples: int = 3
    quality_k: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("warmup_min_runs", "timed_min_runs", "memory_min_runs", "min_power_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("warmup_min_s", "timed_min_s", "memory_min_s", "idle_s", "energy_s"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        for name in ("rss_hz", "power_hz"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name} must be > 0 Hz, got {value!r}")
        if self.quality_k is not None and self.quality_k < 1:
            raise ValueError(f"quality_k must be >= 1 or None, got {self.quality_k!r}")
        if self.mode == "full" and (self.warmup_min_runs < 10 or self.warmup_min_s < 2.0
                                    or self.timed_min_runs < 1024 or self.timed_min_s < 60.0):
            # A "full" label promises the measurement.md minimums; a shorter run must say quick.
            raise ValueError(
                "mode 'full' needs warm-up >= 10 runs and >= 2 s and timed >= 1024 runs and >= 60 s, got "
                f"warm-up {self.warmup_min_runs} runs/{self.warmup_min_s} s, "
                f"timed {self.timed_min_runs} runs/{self.timed_min_s} s; label it 'quick' instead"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the report (so a reader knows which thresholds produced the figures)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeasureConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown MeasureConfig keys {unknown}; known: {sorted(names)}")
        return cls(**data)


FULL = MeasureConfig(
    mode="full",
    warmup_min_runs=10, warmup_min_s=2.0,
    timed_min_runs=1024, timed_min_s=60.0,
    memory_min_runs=200, memory_min_s=5.0,
    idle_s=5.0, energy_s=20.0,
)

QUICK = MeasureConfig(
    mode="quick",
    warmup_min_runs=10, warmup_min_s=0.2,
    timed_min_runs=200, timed_min_s=1.0,
    memory_min_runs=50, memory_min_s=0.3,
    idle_s=0.5, energy_s=1.0,
)


def config_for_mode(mode: str) -> MeasureConfig:
    """The preset for ``mode`` ("quick" or "full")."""
    if mode == "full":
        return FULL
    if mode == "quick":
        return QUICK
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
