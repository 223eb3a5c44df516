"""Training-free baselines printed beside every model (quality.md): popularity and item-to-item.

They anchor the figures: a learned recommender that does not beat item-to-item transitions
is not worth shipping, however small it is.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np

from compression.data import DEFAULT_WINDOW, Dataset
from compression.metrics import DEFAULT_CHUNK, RankingAccumulator

_LOGGER = logging.getLogger(__name__)

DEFAULT_DECAY = 0.8
# Every export of a search reports the same baselines: compute them once per dataset object.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def popularity_scores(dataset: Dataset) -> np.ndarray:
    """Score vector [V+1]: how often each item was bought in the training parts."""
    return dataset.popularity.astype(np.float64)


def transition_matrix(dataset: Dataset) -> np.ndarray:
    """T[a, b] = how often b directly followed a in a training sequence, float32 [V+1, V+1]."""
    size = dataset.num_items + 1
    counts = np.zeros((size, size), dtype=np.float32)
    for seq in dataset.train_sequences():
        if len(seq) > 1:
            np.add.at(counts, (seq[:-1], seq[1:]), 1.0)
    return counts


def history_weights(histories: np.ndarray, size: int, decay: float = DEFAULT_DECAY) -> np.ndarray:
    """W[u, i] = sum of decay**age over the positions of item i in history u (age 0 = most recent)."""
    histories = np.asarray(histories)
    window = histories.shape[1]
    ages = decay ** np.arange(window - 1, -1, -1, dtype=np.float64)  # left-padded: last column newest
    weights = np.zeros((len(histories), size), dtype=np.float32)
    rows = np.repeat(np.arange(len(histories)), window)
    np.add.at(weights, (rows, histories.reshape(-1)), np.tile(ages, len(histories)).astype(np.float32))
    weights[:, 0] = 0.0  # padding carries no evidence
    return weights


def evaluate_popularity(dataset: Dataset, split: str = "test") -> dict[str, float]:
    """Full-ranking metrics of recommending the training best-sellers to everyone."""
    _, targets = dataset.eval_histories(split, 1)
    scores = popularity_scores(dataset)
    acc = RankingAccumulator(num_items=dataset.num_items)
    for start in range(0, len(targets), DEFAULT_CHUNK):
        block = targets[start:start + DEFAULT_CHUNK]
        acc.add(np.broadcast_to(scores, (len(block), len(scores))), block)
    return acc.result()


def evaluate_itemknn(dataset: Dataset, split: str = "test", window: int = DEFAULT_WINDOW,
                     decay: float = DEFAULT_DECAY) -> dict[str, float]:
    """Full-ranking metrics of decayed item-to-item transitions from the last ``window`` items."""
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    histories, targets = dataset.eval_histories(split, window)
    transitions = transition_matrix(dataset)
    # tiny popularity prior breaks the ties among items no history item ever led to
    prior = popularity_scores(dataset).astype(np.float32) * 1e-6 / max(1, dataset.popularity.max())
    acc = RankingAccumulator(num_items=dataset.num_items)
    for start in range(0, len(targets), DEFAULT_CHUNK):
        weights = history_weights(histories[start:start + DEFAULT_CHUNK], transitions.shape[0], decay)
        acc.add(weights @ transitions + prior, targets[start:start + DEFAULT_CHUNK])
    return acc.result()


def evaluate_baselines(dataset: Dataset, split: str = "test") -> dict[str, dict[str, float]]:
    """The ``baselines`` block of metrics.json (cached per dataset object and split)."""
    per_split = _CACHE.setdefault(dataset, {})
    if split not in per_split:
        per_split[split] = {"popularity": evaluate_popularity(dataset, split),
                            "itemknn": evaluate_itemknn(dataset, split)}
        _LOGGER.info("baselines on %s: %s", split, per_split[split])
    return {name: dict(figures) for name, figures in per_split[split].items()}
