"""Training-free baselines printed beside every model (quality.md): popularity, item-to-item
transitions (the untuned strawman and the version tuned on validation) and session-kNN.

They anchor the figures: a learned recommender that does not beat a tuned item-to-item table
is not worth shipping, however small it is. Every tuned setting is chosen on the validation
target only and then reported once on test; each baseline also carries its device bytes.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np

from compression.data import DEFAULT_WINDOW, Dataset
from compression.evidence import (  # noqa: F401 - history_weights/popularity_scores are part of this API
    DEFAULT_DECAY,
    history_weights,
    popularity_prior,
    popularity_scores,
    sparse_history_weights,
)
from compression.metrics import DEFAULT_CHUNK, RankingAccumulator
from compression.neighbours import dense_from_table, table_bytes, top_n_table
from compression.sknn import device_bytes, evaluate_sknn

_LOGGER = logging.getLogger(__name__)

DECAY_GRID = (0.1, 0.2, 0.3, 0.5, 0.8, 1.0)
TABLE_SIZES = (20, 50)
SKNN_GRID = {"k": (20, 50, 100), "decay": (1.0, 0.5, 0.3, 0.1)}
# Every export of a search reports the same baselines: compute them once per dataset object.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()




def transition_matrix(dataset: Dataset, normalised: bool = False) -> np.ndarray:
    """T[a, b] = how often b directly followed a in a training sequence, float32 [V+1, V+1].

    ``normalised`` divides each row by its total (P(next = b | last = a)), so a rarely bought
    item's few successors weigh as much as a best-seller's many.
    """
    size = dataset.num_items + 1
    counts = np.zeros((size, size), dtype=np.float32)
    for seq in dataset.train_sequences():
        if len(seq) > 1:
            np.add.at(counts, (seq[:-1], seq[1:]), 1.0)
    if normalised:
        counts /= np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    return counts



def evaluate_popularity(dataset: Dataset, split: str = "test") -> dict[str, float]:
    """Full-ranking metrics of recommending the training best-sellers to everyone."""
    _, targets = dataset.eval_histories(split, 1)
    scores = popularity_scores(dataset)
    acc = RankingAccumulator(num_items=dataset.num_items)
    for start in range(0, len(targets), DEFAULT_CHUNK):
        block = targets[start:start + DEFAULT_CHUNK]
        acc.add(np.broadcast_to(scores, (len(block), len(scores))), block)
    return acc.result()


def _check_decay(decay: float) -> None:
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")


def evaluate_transitions(dataset: Dataset, transitions: np.ndarray, split: str = "test",
                         window: int = DEFAULT_WINDOW, decay: float = DEFAULT_DECAY) -> dict[str, float]:
    """Full-ranking metrics of decayed transitions ``transitions`` from the last ``window`` items."""
    _check_decay(decay)
    histories, targets = dataset.eval_histories(split, window)
    # tiny popularity prior breaks the ties among items no history item ever led to
    prior = popularity_prior(dataset)
    acc = RankingAccumulator(num_items=dataset.num_items)
    for start in range(0, len(targets), DEFAULT_CHUNK):
        weights = sparse_history_weights(histories[start:start + DEFAULT_CHUNK], transitions.shape[0], decay)
        acc.add(np.asarray(weights @ transitions) + prior, targets[start:start + DEFAULT_CHUNK])
    return acc.result()



def evaluate_itemknn(dataset: Dataset, split: str = "test", window: int = DEFAULT_WINDOW,
                     decay: float = DEFAULT_DECAY, normalised: bool = False) -> dict[str, float]:
    """Full-ranking metrics of decayed item-to-item transitions from the last ``window`` items."""
    _check_decay(decay)
    return evaluate_transitions(dataset, transition_matrix(dataset, normalised), split, window, decay)


def tune_itemknn(dataset: Dataset, decays: tuple[float, ...] = DECAY_GRID,
                 window: int = DEFAULT_WINDOW) -> dict:
    """Item-to-item tuned on the VALIDATION target only (raw vs row-normalised x decay), then test.

    Returns the test figures of the chosen setting, the setting, the validation grid, and the
    device form: top-N tables (int16 ids + float16 weights) with their own test figures.
    """
    grid = []
    matrices = {norm: transition_matrix(dataset, norm) for norm in (False, True)}
    for normalised, matrix in matrices.items():
        for decay in decays:
            val = evaluate_transitions(dataset, matrix, "val", window, decay)
            grid.append({"normalised": normalised, "decay": decay, "val_ndcg10": val["ndcg10"],
                         "val_hr10": val["hr10"]})
    chosen = max(grid, key=lambda g: (g["val_ndcg10"], g["normalised"], -g["decay"]))
    matrix = matrices[chosen["normalised"]]
    test = evaluate_transitions(dataset, matrix, "test", window, chosen["decay"])
    tables = {}
    for n in TABLE_SIZES:
        ids, weights = top_n_table(matrix[1:], n)  # row a-1 = successors of item a
        dense = np.zeros_like(matrix)
        dense[1:] = dense_from_table(ids, weights, matrix.shape[1])
        figures = evaluate_transitions(dataset, dense, "test", window, chosen["decay"])
        tables[f"top{n}"] = {key: figures[key] for key in ("hr10", "ndcg10", "mrr")} | {
            "bytes": table_bytes(dataset.num_items, n)}
    _LOGGER.info("item-to-item tuned on validation: normalised=%s decay=%s val NDCG@10 %.4f test %.4f",
                 chosen["normalised"], chosen["decay"], chosen["val_ndcg10"], test["ndcg10"])
    return {"hr10": test["hr10"], "ndcg10": test["ndcg10"], "mrr": test["mrr"],
            "normalised": chosen["normalised"], "decay": chosen["decay"],
            "val_ndcg10": chosen["val_ndcg10"], "val_hr10": chosen["val_hr10"],
            "table_bytes": tables["top20"]["bytes"], "tables": tables, "grid": grid,
            "tuned_on": "val"}


def tune_sknn(dataset: Dataset, window: int = DEFAULT_WINDOW) -> dict:
    """Session-kNN with k and the recency decay chosen on validation, reported on test."""

    grid = []
    for k in SKNN_GRID["k"]:
        for decay in SKNN_GRID["decay"]:
            val = evaluate_sknn(dataset, "val", k=k, decay=decay, window=window)
            grid.append({"k": k, "decay": decay, "val_ndcg10": val["ndcg10"], "val_hr10": val["hr10"]})
    chosen = max(grid, key=lambda g: (g["val_ndcg10"], -g["k"]))
    test = evaluate_sknn(dataset, "test", k=chosen["k"], decay=chosen["decay"], window=window)
    return {"hr10": test["hr10"], "ndcg10": test["ndcg10"], "mrr": test["mrr"], "k": chosen["k"],
            "decay": chosen["decay"], "val_ndcg10": chosen["val_ndcg10"], "val_hr10": chosen["val_hr10"],
            "device_bytes": device_bytes(dataset), "grid": grid, "tuned_on": "val"}


def evaluate_baselines(dataset: Dataset, split: str = "test") -> dict[str, dict]:
    """The ``baselines`` block of metrics.json (cached per dataset object and split).

    ``itemknn`` is the untuned strawman (raw counts, decay 0.8) kept for continuity;
    ``itemknn_tuned`` and ``sknn`` are tuned on validation and reported on ``split``.
    """
    per_split = _CACHE.setdefault(dataset, {})
    if split not in per_split:
        block: dict[str, dict] = {"popularity": evaluate_popularity(dataset, split),
                                  "itemknn": evaluate_itemknn(dataset, split) | {
                                      "normalised": False, "decay": DEFAULT_DECAY, "tuned_on": None}}
        if split == "test":
            block["itemknn_tuned"] = tune_itemknn(dataset)
            block["sknn"] = tune_sknn(dataset)
        per_split[split] = block
        _LOGGER.info("baselines on %s: %s", split, {k: round(v["ndcg10"], 4) for k, v in block.items()})
    return _copy(per_split[split])


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
