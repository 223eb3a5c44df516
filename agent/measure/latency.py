"""Cold start, warm-up and timed latency passes (why: measurement.md's TFLite/MLPerf run rules).

No sampling thread runs here: RSS and power are sampled in their own passes because a sampler
perturbs timing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil

from agent.measure.config import MeasureConfig
from agent.measure.recommender import Recommender
from agent.measure.stats import histogram, summarize

_LOGGER = logging.getLogger(__name__)

_MIB = 1024.0 * 1024.0


@dataclasses.dataclass
class ColdStart:
    """First load of a model: interpreter creation + allocate (inside ``load``) + first inference."""

    recommender: Recommender
    load_ms: float
    first_inference_ms: float
    rss_before_mib: float
    rss_after_load_mib: float

    @property
    def cold_start_ms(self) -> float:
        """Load plus first inference, the delay a user sees after a model switch."""
        return self.load_ms + self.first_inference_ms

    @property
    def load_delta_mib(self) -> float:
        """RSS the loaded model added to the process."""
        return self.rss_after_load_mib - self.rss_before_mib


@dataclasses.dataclass
class RunResult:
    """Per-inference wall times of one pass and where the input cycle stopped."""

    samples_ms: np.ndarray
    duration_s: float
    next_index: int


def _rss_mib(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / _MIB


def cold_start(load: Callable[[], Recommender], history: np.ndarray) -> ColdStart:
    """Call ``load`` and run one inference, timing each on its own (RSS read outside the timed spans)."""
    process = psutil.Process()
    rss_before = _rss_mib(process)
    t0 = time.perf_counter_ns()
    recommender = load()
    t1 = time.perf_counter_ns()
    rss_after = _rss_mib(process)
    t2 = time.perf_counter_ns()
    recommender.recommend(history)
    t3 = time.perf_counter_ns()
    result = ColdStart(
        recommender=recommender,
        load_ms=(t1 - t0) / 1e6,
        first_inference_ms=(t3 - t2) / 1e6,
        rss_before_mib=rss_before,
        rss_after_load_mib=rss_after,
    )
    _LOGGER.info("cold start %.2f ms (load %.2f ms, first inference %.2f ms), load delta %.1f MiB",
                 result.cold_start_ms, result.load_ms, result.first_inference_ms, result.load_delta_mib)
    return result


def run_until(recommender: Recommender, histories: np.ndarray, *, min_runs: int, min_s: float,
              start_index: int = 0) -> RunResult:
    """Run inferences cycling through ``histories`` until BOTH ``min_runs`` and ``min_s`` are reached."""
    if min_runs < 1:
        raise ValueError(f"min_runs must be >= 1, got {min_runs}")
    count = histories.shape[0]
    min_ns = int(min_s * 1e9)
    # array('q') keeps 8 bytes per sample: a fast model runs millions of times in a 60 s pass.
    samples_ns = array("q")
    index = start_index
    begin = time.perf_counter_ns()
    now = begin
    while len(samples_ns) < min_runs or now - begin < min_ns:
        history = histories[index % count]
        index += 1
        t0 = time.perf_counter_ns()
        recommender.recommend(history)
        now = time.perf_counter_ns()
        samples_ns.append(now - t0)
    return RunResult(
        samples_ms=np.frombuffer(samples_ns, dtype=np.int64) / 1e6,
        duration_s=(now - begin) / 1e9,
        next_index=index % count,
    )


def measure_latency(recommender: Recommender, histories: np.ndarray, config: MeasureConfig,
                    *, start_index: int = 0) -> dict[str, Any]:
    """Warm-up then the timed pass; returns the summary plus run facts.

    Keys beyond :func:`summarize`: ``duration_s``, ``warmup_n``, ``warmup_s`` and a compact ``histogram``
    for the human-readable deployment report.
    """
    warm = run_until(recommender, histories, min_runs=config.warmup_min_runs,
                     min_s=config.warmup_min_s, start_index=start_index)
    timed = run_until(recommender, histories, min_runs=config.timed_min_runs,
                      min_s=config.timed_min_s, start_index=warm.next_index)
    summary: dict[str, Any] = dict(summarize(timed.samples_ms))
    summary["duration_s"] = timed.duration_s
    summary["warmup_n"] = len(warm.samples_ms)
    summary["warmup_s"] = warm.duration_s
    summary["histogram"] = histogram(timed.samples_ms)
    _LOGGER.info("latency (%s): p50 %.3f ms p90 %.3f ms over %d runs in %.1f s",
                 config.mode, summary["p50"], summary["p90"], summary["n"], timed.duration_s)
    return summary

