"""On-device quality against the golden reference top-K (why: catches a model a runtime breaks)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from agent.measure.recommender import Recommender

_LOGGER = logging.getLogger(__name__)


def overlap_at_k(ids: np.ndarray, reference_ids: np.ndarray, k: int) -> float:
    """|top-k(ids) & top-k(reference)| / k, order ignored."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    got = set(np.asarray(ids).ravel()[:k].tolist())
    want = set(np.asarray(reference_ids).ravel()[:k].tolist())
    return len(got & want) / k


def ndcg_vs_reference(ids: np.ndarray, reference_ids: np.ndarray, k: int) -> float:
    """NDCG@k of ``ids`` when the reference's item at rank r (0-based) has gain k - r.

    Why graded gains: an item the reference ranks first matters more than its k-th; a ranking
    identical to the reference scores 1.0, one sharing no item scores 0.0.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    reference = np.asarray(reference_ids).ravel()[:k].tolist()
    gains = {item: float(k - rank) for rank, item in enumerate(reference)}
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    got = np.asarray(ids).ravel()[:k].tolist()
    dcg = sum(gains.get(item, 0.0) * discounts[pos] for pos, item in enumerate(got))
    ideal = sum(float(k - rank) * discounts[rank] for rank in range(len(reference)))
    return float(dcg / ideal) if ideal > 0 else 0.0


def measure_quality(recommender: Recommender, histories: np.ndarray, golden_ids: np.ndarray,
                    golden_scores: np.ndarray | None = None, *, k: int | None = None) -> dict[str, Any]:
    """Run every golden history once and compare with the reference top-K computed at export.

    Returns ``agreement_at_k`` (mean overlap@K), ``ndcg_vs_reference`` (mean), ``golden_n``, ``k``,
    ``exact_match`` (share of histories with the identical ordered top-K) and, when reference scores
    are given, ``score_max_abs_diff`` over positions where both lists hold the same item.
    """
    reference = np.asarray(golden_ids)
    if reference.ndim != 2 or reference.shape[0] != histories.shape[0]:
        raise ValueError(
            f"golden_ids must be N x K with N = {histories.shape[0]} histories, got shape {reference.shape}"
        )
    ref_scores = None if golden_scores is None else np.asarray(golden_scores, dtype=np.float64)
    if ref_scores is not None and ref_scores.shape != reference.shape:
        raise ValueError(f"golden_scores shape {ref_scores.shape} != golden_ids shape {reference.shape}")
    k = reference.shape[1] if k is None else k
    if not 1 <= k <= reference.shape[1]:
        raise ValueError(f"k must be in [1, {reference.shape[1]}] (the reference's K), got {k}")
    overlaps, ndcgs, exact = [], [], 0
    max_diff: float | None = None
    for row, history in enumerate(histories):
        ids, scores = recommender.recommend(history)
        ids = np.asarray(ids).ravel()
        if ids.size < k:
            raise ValueError(f"recommender returned {ids.size} ids for golden history {row}, need >= {k}")
        overlaps.append(overlap_at_k(ids, reference[row], k))
        ndcgs.append(ndcg_vs_reference(ids, reference[row], k))
        exact += int(np.array_equal(ids[:k], reference[row, :k]))
        if ref_scores is not None:
            same = ids[:k] == reference[row, :k]
            if same.any():
                got = np.asarray(scores, dtype=np.float64).ravel()[:k]
                diff = float(np.max(np.abs(got[same] - ref_scores[row, :k][same])))
                max_diff = diff if max_diff is None else max(max_diff, diff)
    result = {
        "agreement_at_k": float(np.mean(overlaps)),
        "ndcg_vs_reference": float(np.mean(ndcgs)),
        "golden_n": int(histories.shape[0]),
        "k": int(k),
        "exact_match": exact / histories.shape[0],
        "score_max_abs_diff": max_diff,
    }
    _LOGGER.info("quality: agreement@%d %.3f, ndcg vs reference %.3f over %d golden histories",
                 k, result["agreement_at_k"], result["ndcg_vs_reference"], result["golden_n"])
    return result
