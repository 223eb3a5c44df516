"""A small numpy recommender (a real matrix product) implementing the Recommender interface.

Why: tests, benches and hardware checks of the measurement code need a model whose cost and
output are real and known, without a .tflite file or a TFLite runtime.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ToyRuntime:
    """Mirrors ``agent.runtime.RuntimeInfo``'s fields."""

    name: str
    version: str


class MatrixRecommender:
    """Scores = item embeddings @ mean of the history's embeddings; top-K excludes padding index 0.

    ``noise`` perturbs the item table (seeded) to imitate a lossy compression of the same model.
    """

    def __init__(self, num_items: int = 500, dim: int = 32, k: int = 20, seed: int = 0,
                 noise: float = 0.0) -> None:
        if num_items < k:
            raise ValueError(f"num_items ({num_items}) must be >= k ({k})")
        rng = np.random.default_rng(seed)
        table = rng.standard_normal((num_items + 1, dim)).astype(np.float32)
        if noise:
            table += noise * np.random.default_rng(seed + 1).standard_normal(table.shape).astype(np.float32)
        self.table = table
        self.k = k
        self.runtime = ToyRuntime("numpy", np.__version__)

    def recommend(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-K ``(ids int32, scores float32)`` for an int32 history (0 = padding)."""
        items = history[history > 0]
        if items.size == 0:
            raise ValueError("history holds only padding (0); nothing to recommend from")
        query = self.table[items].mean(axis=0)
        scores = self.table @ query
        scores[0] = -np.inf
        top = np.argpartition(-scores, self.k)[: self.k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return top.astype(np.int32), scores[top].astype(np.float32)

    def golden(self, histories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reference top-K ids and scores for every history (what export writes to golden.json)."""
        pairs = [self.recommend(h) for h in histories]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def make_histories(count: int, window: int = 20, num_items: int = 500, seed: int = 0) -> np.ndarray:
    """``count`` left-padded int32 histories of 4..window real items, most recent last."""
    if count < 1 or window < 4:
        raise ValueError(f"need count >= 1 and window >= 4, got count={count} window={window}")
    rng = np.random.default_rng(seed)
    out = np.zeros((count, window), dtype=np.int32)
    for row in range(count):
        length = int(rng.integers(4, window + 1))
        out[row, window - length:] = rng.integers(1, num_items + 1, size=length)
    return out
