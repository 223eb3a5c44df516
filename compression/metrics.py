"""Full-ranking metrics (HR@K, NDCG@K, MRR) over ALL items, index 0 (padding) excluded.

Sampled-negative metrics mislead (Krichene & Rendle 2020), so every item is ranked. Ties
matter for quantized models, whose scores collide: a target tied with ``e`` other items gets
the EXPECTED metric over a uniformly random order of the tied block (neither the optimistic
nor the pessimistic rank), computed exactly in closed form.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

_LOGGER = logging.getLogger(__name__)

DEFAULT_CHUNK = 1024


def rank_counts(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (#items scoring above the target, #other items scoring equal to it).

    ``scores`` is [N, V+1] with column 0 the padding index, which is ignored.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets).astype(np.int64).reshape(-1)
    if scores.ndim != 2 or scores.shape[0] != targets.shape[0]:
        raise ValueError(f"scores {scores.shape} do not match targets {targets.shape}")
    if targets.size and (targets.min() < 1 or targets.max() >= scores.shape[1]):
        raise ValueError(f"targets must lie in 1..{scores.shape[1] - 1}, got range "
                         f"{targets.min()}..{targets.max()}")
    items = scores[:, 1:]
    target_scores = items[np.arange(len(targets)), targets - 1][:, None]
    greater = (items > target_scores).sum(axis=1)
    equal = (items == target_scores).sum(axis=1) - 1
    return greater.astype(np.int64), equal.astype(np.int64)


def metrics_from_counts(greater: np.ndarray, equal: np.ndarray, num_items: int,
                        k: int = 10) -> dict[str, float]:
    """Expected HR@k, NDCG@k and MRR when each tied block is ordered uniformly at random."""
    greater = np.asarray(greater, dtype=np.int64)
    equal = np.asarray(equal, dtype=np.int64)
    if greater.size == 0:
        raise ValueError("no rows to evaluate")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    first, last, span = greater, greater + equal, equal + 1  # 0-based positions the target may take
    hits = np.clip(np.minimum(last, k - 1) - first + 1, 0, None)
    # cumulative sums turn "mean over positions first..last" into two look-ups
    gain = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))])
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, num_items + 1))])
    ndcg = (gain[np.clip(last + 1, 0, k)] - gain[np.clip(first, 0, k)]) / span
    mrr = (harmonic[last + 1] - harmonic[first]) / span
    return {
        f"hr{k}": float(np.mean(hits / span)),
        f"ndcg{k}": float(np.mean(ndcg)),
        "mrr": float(np.mean(mrr)),
        "n": int(greater.size),
    }


@dataclass
class RankingAccumulator:
    """Collects rank counts chunk by chunk, so no [users, items] matrix has to exist at once."""

    num_items: int
    k: int = 10
    _greater: list[np.ndarray] = field(default_factory=list)
    _equal: list[np.ndarray] = field(default_factory=list)

    def add(self, scores: np.ndarray, targets: np.ndarray) -> None:
        """Add a block of score rows [n, V+1] and their targets [n]."""
        if np.asarray(scores).shape[-1] != self.num_items + 1:
            raise ValueError(f"scores have {np.asarray(scores).shape[-1]} columns, expected "
                             f"num_items + 1 = {self.num_items + 1}")
        greater, equal = rank_counts(scores, targets)
        self._greater.append(greater)
        self._equal.append(equal)

    def result(self) -> dict[str, float]:
        """The metrics over everything added so far."""
        if not self._greater:
            raise ValueError("RankingAccumulator.result() called before any add()")
        return metrics_from_counts(np.concatenate(self._greater), np.concatenate(self._equal),
                                   self.num_items, self.k)


def full_ranking_metrics(scores: np.ndarray, targets: np.ndarray, k: int = 10,
                         chunk: int = DEFAULT_CHUNK) -> dict[str, float]:
    """HR@k / NDCG@k / MRR of a whole score matrix [N, V+1], processed ``chunk`` rows at a time."""
    scores = np.asarray(scores)
    acc = RankingAccumulator(num_items=scores.shape[1] - 1, k=k)
    for start in range(0, scores.shape[0], chunk):
        acc.add(scores[start:start + chunk], np.asarray(targets)[start:start + chunk])
    return acc.result()
