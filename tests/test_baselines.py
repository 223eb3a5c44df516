"""Tuned baselines: validation-only tuning, top-N device tables, session-kNN."""

from __future__ import annotations

import numpy as np
import pytest

from compression.baselines import (
    DECAY_GRID,
    evaluate_baselines,
    evaluate_itemknn,
    transition_matrix,
    tune_itemknn,
)
from compression.data import DERIVED_DIR, Dataset, load_dataset
from compression.neighbours import dense_from_table, table_bytes, top_n_table
from compression.sknn import device_bytes, evaluate_sknn, session_matrix


def _toy() -> Dataset:
    seqs = [np.array(s, dtype=np.int32) for s in ([1, 2, 3, 1, 2, 3, 4], [1, 2, 1, 2, 3], [4, 4, 1, 2, 3, 3])]
    return Dataset(codes=["", "a", "b", "c", "d"], descriptions=["<padding>", "A", "B", "C", "D"],
                   customers=["1", "2", "3"], sequences=seqs)


def test_row_normalised_transitions_are_conditional_probabilities() -> None:
    data = _toy()
    raw, norm = transition_matrix(data), transition_matrix(data, normalised=True)
    sums = norm.sum(axis=1)
    assert np.allclose(sums[raw.sum(axis=1) > 0], 1.0) and np.allclose(sums[raw.sum(axis=1) == 0], 0.0)
    assert norm[1, 2] == pytest.approx(raw[1, 2] / raw[1].sum())


def test_top_n_table_keeps_the_strongest_successors_and_its_bytes() -> None:
    matrix = np.array([[0.0, 0.5, 0.1, 0.4], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    ids, weights = top_n_table(matrix, 2)
    assert ids.dtype == np.int16 and weights.dtype == np.float16
    assert ids[0].tolist() == [1, 3] and weights[0].astype(float).tolist() == pytest.approx([0.5, 0.4], abs=1e-3)
    dense = dense_from_table(ids, weights, 4)
    assert dense[0].tolist() == pytest.approx([0.0, 0.5, 0.0, 0.4], abs=1e-3) and dense[1].sum() == 0.0
    assert table_bytes(3659, 20) == 3659 * 20 * 4 == 292720
    with pytest.raises(ValueError):
        table_bytes(10, 0)


def test_tuning_reads_validation_only() -> None:
    """Changing every TEST target must not change the chosen setting (test is never looked at)."""
    data = _toy()
    tuned = tune_itemknn(data)
    assert len(tuned["grid"]) == 2 * len(DECAY_GRID) and tuned["tuned_on"] == "val"
    best_val = max(g["val_ndcg10"] for g in tuned["grid"])
    assert tuned["val_ndcg10"] == best_val
    flipped = Dataset(codes=data.codes, descriptions=data.descriptions, customers=data.customers,
                      sequences=[np.concatenate([s[:-1], [5 - s[-1] if s[-1] != 4 else 1]]).astype(np.int32)
                                 for s in data.sequences])
    again = tune_itemknn(flipped)
    assert (again["normalised"], again["decay"]) == (tuned["normalised"], tuned["decay"])
    assert again["ndcg10"] == pytest.approx(evaluate_itemknn(flipped, "test", decay=tuned["decay"],
                                                             normalised=tuned["normalised"])["ndcg10"])


def test_sknn_never_uses_the_customers_own_session() -> None:
    data = _toy()
    sessions = session_matrix(data)
    assert np.allclose(np.asarray(sessions.multiply(sessions).sum(axis=1)).ravel(), 1.0)  # cosine rows
    figures = evaluate_sknn(data, "test", k=1, decay=1.0)
    assert 0.0 <= figures["ndcg10"] <= 1.0 and figures["n"] == 3
    assert device_bytes(data) == sum(len(np.unique(s[:-2])) * 2 + 4 for s in data.sequences)
    with pytest.raises(ValueError, match="k must be"):
        evaluate_sknn(data, k=0)


def test_baselines_block_on_full_data_has_the_tuned_table() -> None:
    result = evaluate_baselines(load_dataset(str(DERIVED_DIR)))
    tuned = result["itemknn_tuned"]
    # quality.md: row-normalised counts with a short decay reach about NDCG@10 0.207 / HR@10 0.30
    assert tuned["normalised"] is True and tuned["decay"] in (0.2, 0.3)
    assert tuned["ndcg10"] == pytest.approx(0.207, abs=0.004) and tuned["hr10"] == pytest.approx(0.303, abs=0.006)
    assert tuned["table_bytes"] == tuned["tables"]["top20"]["bytes"] == 3659 * 20 * 4
    assert tuned["tables"]["top20"]["ndcg10"] <= tuned["ndcg10"] + 1e-3
    assert result["itemknn"]["ndcg10"] < tuned["ndcg10"]
    assert result["sknn"]["tuned_on"] == "val" and result["sknn"]["device_bytes"] > 0
