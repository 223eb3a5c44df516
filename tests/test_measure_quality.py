"""On-device quality figures against a golden reference top-K."""

from __future__ import annotations

import numpy as np
import pytest

from agent.measure.quality import measure_quality, ndcg_vs_reference, overlap_at_k
from agent.measure.toy import MatrixRecommender, make_histories


def test_overlap_known_values() -> None:
    assert overlap_at_k([1, 2, 3, 4], [4, 3, 2, 1], 4) == 1.0
    assert overlap_at_k([1, 2, 9, 8], [1, 2, 3, 4], 4) == 0.5
    assert overlap_at_k([5, 6], [1, 2], 2) == 0.0


def test_ndcg_known_values() -> None:
    assert ndcg_vs_reference([1, 2, 3], [1, 2, 3], 3) == pytest.approx(1.0)
    assert ndcg_vs_reference([7, 8, 9], [1, 2, 3], 3) == 0.0
    # Swapping the top two: gains (2, 3, 1) vs ideal (3, 2, 1).
    ideal = 3 / np.log2(2) + 2 / np.log2(3) + 1 / np.log2(4)
    swapped = 2 / np.log2(2) + 3 / np.log2(3) + 1 / np.log2(4)
    assert ndcg_vs_reference([2, 1, 3], [1, 2, 3], 3) == pytest.approx(swapped / ideal)
    assert ndcg_vs_reference([2, 1, 3], [1, 2, 3], 3) < 1.0


def test_same_model_agrees_fully_and_a_perturbed_one_does_not() -> None:
    histories = make_histories(32, num_items=300, seed=3)
    reference = MatrixRecommender(num_items=300, seed=1)
    ids, scores = reference.golden(histories)
    same = measure_quality(MatrixRecommender(num_items=300, seed=1), histories, ids, scores)
    assert same["agreement_at_k"] == 1.0 and same["ndcg_vs_reference"] == pytest.approx(1.0)
    assert same["exact_match"] == 1.0 and same["score_max_abs_diff"] == 0.0
    assert same["golden_n"] == 32 and same["k"] == 20
    noisy = measure_quality(MatrixRecommender(num_items=300, seed=1, noise=0.5), histories, ids, scores)
    assert 0.0 < noisy["agreement_at_k"] < 1.0
    assert noisy["ndcg_vs_reference"] < 1.0
    broken = measure_quality(MatrixRecommender(num_items=300, seed=99), histories, ids)
    assert broken["agreement_at_k"] < 0.3
    assert broken["score_max_abs_diff"] is None


def test_quality_rejects_mismatched_reference() -> None:
    histories = make_histories(4, num_items=50)
    rec = MatrixRecommender(num_items=50)
    with pytest.raises(ValueError, match="N x K with N = 4"):
        measure_quality(rec, histories, np.zeros((3, 20), dtype=np.int32))
    with pytest.raises(ValueError, match=r"k must be in \[1, 20\]"):
        measure_quality(rec, histories, rec.golden(histories)[0], k=21)
