"""Energy per inference from a power trace: E = (integral P dt - P_idle * T) / N (measurement.md).

The trapezoid rule over samples, with the window edges interpolated; P_idle comes from an idle
window taken just before the loaded one. Every result names its source; without one it says
"unavailable" and why, and carries no number.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from agent.measure.config import MeasureConfig
from agent.measure.latency import run_until
from agent.measure.power.base import UNAVAILABLE, PowerSource
from agent.measure.power.sampling import PowerTrace, make_sampler
from agent.measure.recommender import Recommender

_LOGGER = logging.getLogger(__name__)

MIN_RATE_HZ = 10.0


def window_energy_j(times: Sequence[float], watts: Sequence[float], t0: float, t1: float) -> float:
    """Joules between ``t0`` and ``t1`` by the trapezoid rule; the trace must cover the window."""
    t = np.asarray(times, dtype=np.float64)
    p = np.asarray(watts, dtype=np.float64)
    if t.shape != p.shape or t.size < 2:
        raise ValueError(f"need >= 2 paired samples, got {t.size} times and {p.size} watts")
    if np.any(np.diff(t) <= 0):
        raise ValueError("sample times must be strictly increasing")
    if t1 <= t0:
        raise ValueError(f"window end {t1} must be after its start {t0}")
    if t0 < t[0] or t1 > t[-1]:
        raise ValueError(f"power samples span [{t[0]:.3f}, {t[-1]:.3f}] s but the window is "
                         f"[{t0:.3f}, {t1:.3f}] s: sample before and after the window")
    inside = (t > t0) & (t < t1)
    grid = np.concatenate(([t0], t[inside], [t1]))
    power = np.concatenate(([np.interp(t0, t, p)], p[inside], [np.interp(t1, t, p)]))
    return float(np.sum((power[1:] + power[:-1]) * np.diff(grid)) / 2.0)


def _samples_in(times: Sequence[float], t0: float, t1: float) -> int:
    t = np.asarray(times, dtype=np.float64)
    return int(np.count_nonzero((t >= t0) & (t <= t1)))


def energy_per_inference(trace: PowerTrace, *, idle: tuple[float, float], load: tuple[float, float],
                         inferences: int) -> dict[str, Any]:
    """Gross and idle-subtracted (net) millijoules per inference over the ``load`` window."""
    if inferences < 1:
        raise ValueError(f"inferences must be >= 1, got {inferences}")
    idle_s = idle[1] - idle[0]
    load_s = load[1] - load[0]
    idle_j = window_energy_j(trace.times, trace.watts, *idle)
    load_j = window_energy_j(trace.times, trace.watts, *load)
    idle_w = idle_j / idle_s
    gross = load_j / inferences
    net = (load_j - idle_w * load_s) / inferences
    span = trace.times[-1] - trace.times[0]
    rate = (len(trace.times) - 1) / span if span > 0 else 0.0
    return {
        "gross_mj_per_inference": gross * 1e3,
        "net_mj_per_inference": net * 1e3,
        "idle_w": idle_w,
        "load_w": load_j / load_s,
        "idle_window_s": idle_s,
        "window_s": load_s,
        "inferences": inferences,
        "samples": len(trace.times),
        "idle_samples": _samples_in(trace.times, *idle),
        "load_samples": _samples_in(trace.times, *load),
        "sample_hz": rate,
    }


def unavailable(source: str, reason: str) -> dict[str, Any]:
    """The energy object when no honest figure exists."""
    return {
        "source": source,
        "available": False,
        "gross_mj_per_inference": None,
        "net_mj_per_inference": None,
        "idle_w": None,
        "samples": 0,
        "reason": reason,
    }


def measure_energy(recommender: Recommender, histories: np.ndarray, source: PowerSource | None,
                   config: MeasureConfig, *, no_source_reason: str = "no power source detected on this device"
                   ) -> dict[str, Any]:
    """Energy pass: start sampling, idle window, loaded window of inferences, one sample past the end."""
    if source is None:
        return unavailable(UNAVAILABLE, no_source_reason)
    sampler = make_sampler(source, config.power_hz)
    interval = sampler.interval_s
    # Windows long enough for min_power_samples even from a slow reader such as Termux's.
    idle_s = max(config.idle_s, config.min_power_samples * interval)
    load_s = max(config.energy_s, config.min_power_samples * interval)
    settle_s = 2 * interval + 30.0
    sampler.start()
    try:
        if not sampler.wait_for_sample_after(float("-inf"), settle_s):
            return unavailable(source.source, f"no power sample within {settle_s:.0f} s of starting")
        if sampler.trace.errors:
            return unavailable(source.source, sampler.trace.errors[0][1])
        idle_t0 = time.monotonic()
        time.sleep(idle_s)
        idle_t1 = time.monotonic()
        # A sample after the idle window and before any inference keeps the load's ramp out of P_idle.
        if not sampler.wait_for_sample_after(idle_t1, settle_s):
            return unavailable(source.source,
                               f"no power sample after the idle window within {settle_s:.0f} s")
        load_t0 = time.monotonic()
        run = run_until(recommender, histories, min_runs=1, min_s=load_s)
        load_t1 = time.monotonic()
        if not sampler.wait_for_sample_after(load_t1, settle_s):
            return unavailable(source.source,
                               f"no power sample after the loaded window within {settle_s:.0f} s")
    finally:
        sampler.stop()
    trace = sampler.trace
    errors = [message for when, message in trace.errors if idle_t0 <= when]
    if errors:
        return unavailable(source.source, f"power read failed during the pass: {errors[0]}")
    try:
        figures = energy_per_inference(trace, idle=(idle_t0, idle_t1), load=(load_t0, load_t1),
                                       inferences=len(run.samples_ms))
    except ValueError as exc:
        return unavailable(source.source, f"power trace unusable: {exc}")
    result = {"source": source.source, "available": True, **figures, "reason": None}
    if figures["sample_hz"] < MIN_RATE_HZ:
        result["note"] = (f"sampled at {figures['sample_hz']:.2f} Hz (< {MIN_RATE_HZ:.0f} Hz): an average "
                          "over the windows, coarse for short inferences")
    _LOGGER.info("energy (%s): gross %.4f mJ, net %.4f mJ per inference, idle %.3f W",
                 source.source, figures["gross_mj_per_inference"], figures["net_mj_per_inference"],
                 figures["idle_w"])
    return result
