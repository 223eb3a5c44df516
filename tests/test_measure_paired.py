"""Paired, interleaved A/B comparison on real (numpy) recommenders."""

from __future__ import annotations

import numpy as np
import pytest

from agent.measure.paired import paired_compare
from agent.measure.toy import MatrixRecommender, make_histories


class Counting(MatrixRecommender):
    def __init__(self, log: list[str], tag: str, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.log, self.tag = log, tag

    def recommend(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.log.append(self.tag)
        return super().recommend(history)


def test_a_heavier_candidate_has_a_ratio_above_one() -> None:
    histories = make_histories(16, num_items=200)
    light = MatrixRecommender(num_items=200, dim=16)
    heavy = MatrixRecommender(num_items=8000, dim=64)
    result = paired_compare(light, heavy, histories, pairs=12, runs_per_block=4)
    assert result["pairs"] == 12
    assert result["median_ratio_p50"] > 2.0
    assert result["p50_b_ms"] > result["p50_a_ms"]
    reverse = paired_compare(heavy, light, histories, pairs=12, runs_per_block=4)
    assert reverse["median_ratio_p50"] < 0.5


def test_blocks_interleave_and_alternate_order() -> None:
    log: list[str] = []
    a = Counting(log, "A", num_items=100)
    b = Counting(log, "B", num_items=100)
    paired_compare(a, b, make_histories(4, num_items=100), pairs=4, runs_per_block=2, warmup_runs=1)
    timed = "".join(log[2:])
    assert timed == "AABB" + "BBAA" + "AABB" + "BBAA"
    log.clear()
    paired_compare(a, b, make_histories(4, num_items=100), pairs=2, runs_per_block=1, warmup_runs=0,
                   order="ab")
    assert "".join(log) == "ABAB"


def test_paired_rejects_bad_arguments() -> None:
    rec = MatrixRecommender(num_items=50)
    histories = make_histories(2, num_items=50)
    with pytest.raises(ValueError, match="pairs must be >= 1, got 0"):
        paired_compare(rec, rec, histories, pairs=0)
    with pytest.raises(ValueError, match="order"):
        paired_compare(rec, rec, histories, pairs=1, order="ba")  # type: ignore[arg-type]
