"""Session-kNN baseline (SKNN / V-SKNN, Ludewig & Jannach 2018) over customers' training parts.

The query is the recent history (positions weighted by ``decay**age``; decay 1 is plain SKNN,
< 1 the V-SKNN recency weighting); neighbours are the ``k`` most cosine-similar OTHER
customers' training parts; an item scores the summed similarity of the neighbours holding it.
On a device it needs every stored session: ``device_bytes`` counts their int16 item ids.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import sparse

from compression.data import DEFAULT_WINDOW, Dataset
from compression.evidence import popularity_prior, sparse_history_weights
from compression.metrics import DEFAULT_CHUNK, RankingAccumulator

_LOGGER = logging.getLogger(__name__)


def session_matrix(dataset: Dataset) -> sparse.csr_matrix:
    """Binary customers x items matrix of the training parts, rows L2-normalised (cosine)."""
    rows, cols = [], []
    for u, seq in enumerate(dataset.train_sequences()):
        items = np.unique(seq)
        rows.append(np.full(len(items), u))
        cols.append(items)
    r, c = np.concatenate(rows), np.concatenate(cols)
    binary = sparse.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)),
                               shape=(len(dataset.sequences), dataset.num_items + 1))
    norms = np.sqrt(np.asarray(binary.sum(axis=1)).ravel()).astype(np.float32)
    return sparse.diags(1.0 / np.maximum(norms, 1.0)) @ binary


def device_bytes(dataset: Dataset) -> int:
    """Bytes of the session store a device would need: int16 ids of each session's items + offsets."""
    return int(sum(len(np.unique(s)) * 2 + 4 for s in dataset.train_sequences()))


def evaluate_sknn(dataset: Dataset, split: str = "test", k: int = 100, decay: float = 1.0,
                  window: int = DEFAULT_WINDOW) -> dict[str, float]:
    """Full-ranking metrics of session-kNN; the customer's own training part is never a neighbour."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    histories, targets = dataset.eval_histories(split, window)
    sessions = session_matrix(dataset)
    binary = (sessions > 0).astype(np.float32)
    prior = popularity_prior(dataset)
    acc = RankingAccumulator(num_items=dataset.num_items)
    for start in range(0, len(targets), DEFAULT_CHUNK):
        block = histories[start:start + DEFAULT_CHUNK]
        query = sparse_history_weights(block, dataset.num_items + 1, decay)
        sims = (query @ sessions.T).toarray()  # [n, customers]
        own = np.arange(start, start + len(block))
        sims[np.arange(len(block)), own] = 0.0
        kk = min(k, sims.shape[1])
        keep = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        rows = np.repeat(np.arange(len(block)), kk)
        top = sparse.csr_matrix((np.take_along_axis(sims, keep, axis=1).ravel(), (rows, keep.ravel())),
                                shape=sims.shape)
        scores = (top @ binary).toarray() + prior
        acc.add(scores, targets[start:start + DEFAULT_CHUNK])
    return acc.result()
