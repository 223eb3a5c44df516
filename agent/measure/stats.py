"""Summary statistics of latency samples (why: one definition of p50/p90/p99 for every report)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

_LOGGER = logging.getLogger(__name__)

PERCENTILES: tuple[int, ...] = (50, 90, 99)


def summarize(samples_ms: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """p50/p90/p99/mean/std/min/max/n of ``samples_ms``.

    Percentiles use linear interpolation between order statistics (numpy's default, Hyndman-Fan
    type 7); ``std`` is the sample standard deviation (ddof=1, 0.0 for a single sample).
    """
    values = np.asarray(samples_ms, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("cannot summarize an empty list of latency samples")
    if not np.all(np.isfinite(values)):
        bad = values[~np.isfinite(values)][:5].tolist()
        raise ValueError(f"latency samples must be finite, got e.g. {bad}")
    if np.any(values < 0):
        raise ValueError(f"latency samples must be >= 0 ms, got min {float(values.min())}")
    p50, p90, p99 = np.percentile(values, PERCENTILES)
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
        "n": int(values.size),
    }


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of element-wise ratios numerator/denominator (why: robust to drift and outliers)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(
            f"need equally many non-zero numerators and denominators, got {len(numerators)} and "
            f"{len(denominators)}"
        )
    ratios = []
    for num, den in zip(numerators, denominators, strict=True):
        if den <= 0 or not math.isfinite(den):
            raise ValueError(f"denominator must be a positive finite number, got {den!r}")
        ratios.append(num / den)
    return float(np.median(ratios))


def histogram(samples_ms: Sequence[float] | np.ndarray, bins: int = 32) -> dict[str, Any]:
    """Compact latency histogram from min to p99 plus an overflow count (why: a report plots it
    without shipping every sample; the far tail would squash the bins)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    values = np.asarray(samples_ms, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("cannot build a histogram of no latency samples")
    low = float(values.min())
    high = float(np.percentile(values, 99))
    if high <= low:
        high = low + max(abs(low) * 1e-6, 1e-9)
    counts, edges = np.histogram(values[values <= high], bins=bins, range=(low, high))
    return {
        "edges_ms": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "overflow": int(np.count_nonzero(values > high)),
    }
