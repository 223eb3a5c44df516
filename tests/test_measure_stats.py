"""Statistics and configuration of agent.measure on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.measure.config import FULL, QUICK, MeasureConfig, config_for_mode
from agent.measure.stats import histogram, median_ratio, summarize


def test_summarize_known_samples() -> None:
    # 1..100 ms: linear-interpolated percentiles are 50.5, 90.1 and 99.01.
    stats = summarize(list(range(1, 101)))
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["std"] == pytest.approx(math.sqrt(sum((x - 50.5) ** 2 for x in range(1, 101)) / 99))
    assert (stats["min"], stats["max"], stats["n"]) == (1.0, 100.0, 100)


def test_summarize_small_and_single() -> None:
    stats = summarize([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert stats["p50"] == pytest.approx(4.5)
    assert stats["std"] == pytest.approx(2.138089935)
    single = summarize([3.25])
    assert single["p99"] == single["min"] == single["max"] == 3.25
    assert single["std"] == 0.0


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [1.0, -0.5]])
def test_summarize_rejects_bad_samples(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        summarize(bad)


def test_histogram_counts_everything_once() -> None:
    values = np.concatenate([np.linspace(1.0, 2.0, 990), [50.0] * 10])
    hist = histogram(values, bins=10)
    assert len(hist["edges_ms"]) == 11 and len(hist["counts"]) == 10
    assert sum(hist["counts"]) + hist["overflow"] == values.size
    assert hist["overflow"] >= 1
    assert hist["edges_ms"][0] == pytest.approx(1.0)


def test_median_ratio() -> None:
    assert median_ratio([2.0, 3.0, 100.0], [1.0, 1.0, 1.0]) == 3.0
    with pytest.raises(ValueError, match="positive"):
        median_ratio([1.0], [0.0])
    with pytest.raises(ValueError, match="equally many"):
        median_ratio([1.0, 2.0], [1.0])


def test_presets_meet_measurement_rules() -> None:
    assert FULL.warmup_min_runs >= 10 and FULL.warmup_min_s >= 2.0
    assert FULL.timed_min_runs >= 1024 and FULL.timed_min_s >= 60.0
    assert QUICK.mode == "quick" and QUICK.timed_min_runs >= 200
    assert config_for_mode("full") is FULL and config_for_mode("quick") is QUICK
    with pytest.raises(ValueError, match="'fast'"):
        config_for_mode("fast")


def test_config_rejects_a_short_run_labelled_full() -> None:
    with pytest.raises(ValueError, match="label it 'quick'"):
        MeasureConfig(mode="full", warmup_min_runs=10, warmup_min_s=2.0, timed_min_runs=100,
                      timed_min_s=60.0, memory_min_runs=10, memory_min_s=1.0)
    with pytest.raises(ValueError, match="timed_min_runs"):
        MeasureConfig(mode="quick", warmup_min_runs=1, warmup_min_s=0.0, timed_min_runs=0,
                      timed_min_s=0.0, memory_min_runs=1, memory_min_s=0.0)


def test_config_round_trips() -> None:
    assert MeasureConfig.from_dict(QUICK.to_dict()) == QUICK
    with pytest.raises(ValueError, match="warmup_runs"):
        MeasureConfig.from_dict({**QUICK.to_dict(), "warmup_runs": 3})
