"""Paired, interleaved A/B latency on one device (why: separate runs hide thermal and frequency drift)."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np

from agent.measure.recommender import Recommender, validate_histories
from agent.measure.stats import median_ratio

_LOGGER = logging.getLogger(__name__)


def _block_p50_ms(recommender: Recommender, histories: np.ndarray, start: int, runs: int) -> float:
    count = histories.shape[0]
    samples = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        history = histories[(start + i) % count]
        t0 = time.perf_counter_ns()
        recommender.recommend(history)
        samples[i] = (time.perf_counter_ns() - t0) / 1e6
    return float(np.median(samples))


def paired_compare(rec_a: Recommender, rec_b: Recommender, histories: np.ndarray, pairs: int, *,
                   runs_per_block: int = 8, warmup_runs: int = 10,
                   order: Literal["ab", "alternate"] = "alternate") -> dict[str, Any]:
    """Interleave A and B blocks on the same inputs and report the median of per-pair p50 ratios (b/a).

    Each pair times a block of ``runs_per_block`` inferences of A and one of B over the same golden
    histories. ``order="alternate"`` swaps which model goes first every other pair (A B, B A, ...)
    so neither always inherits the other's warm caches; ``"ab"`` keeps A first. A ratio above 1
    means B (the candidate) is slower than A (the incumbent).
    """
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if runs_per_block < 1:
        raise ValueError(f"runs_per_block must be >= 1, got {runs_per_block}")
    if order not in ("ab", "alternate"):
        raise ValueError(f"order must be 'ab' or 'alternate', got {order!r}")
    hs = validate_histories(histories)
    for i in range(warmup_runs):
        rec_a.recommend(hs[i % hs.shape[0]])
        rec_b.recommend(hs[i % hs.shape[0]])
    a_p50: list[float] = []
    b_p50: list[float] = []
    begin = time.perf_counter()
    for pair in range(pairs):
        start = pair * runs_per_block
        if order == "alternate" and pair % 2 == 1:
            b = _block_p50_ms(rec_b, hs, start, runs_per_block)
            a = _block_p50_ms(rec_a, hs, start, runs_per_block)
        else:
            a = _block_p50_ms(rec_a, hs, start, runs_per_block)
            b = _block_p50_ms(rec_b, hs, start, runs_per_block)
        a_p50.append(a)
        b_p50.append(b)
    ratios = np.asarray(b_p50) / np.asarray(a_p50)
    result = {
        "median_ratio_p50": median_ratio(b_p50, a_p50),
        "pairs": pairs,
        "runs_per_block": runs_per_block,
        "order": order,
        "p50_a_ms": float(np.median(a_p50)),
        "p50_b_ms": float(np.median(b_p50)),
        "ratio_p10": float(np.percentile(ratios, 10)),
        "ratio_p90": float(np.percentile(ratios, 90)),
        "duration_s": time.perf_counter() - begin,
    }
    _LOGGER.info("paired A/B over %d pairs: median p50 ratio b/a %.3f", pairs, result["median_ratio_p50"])
    return result
