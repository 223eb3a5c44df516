"""What a purchase history and the catalogue say before any training: popularity and decayed
history weights. Shared by the transition and session-kNN baselines (so neither imports the other).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from compression.data import Dataset

DEFAULT_DECAY = 0.8


def popularity_scores(dataset: Dataset) -> np.ndarray:
    """Score vector [V+1]: how often each item was bought in the training parts."""
    return dataset.popularity.astype(np.float64)


def popularity_prior(dataset: Dataset) -> np.ndarray:
    """A tiny popularity score [V+1] that only breaks ties among items with no other evidence."""
    return popularity_scores(dataset).astype(np.float32) * 1e-6 / max(1, dataset.popularity.max())


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


def sparse_history_weights(histories: np.ndarray, size: int, decay: float) -> sparse.csr_matrix:
    """``history_weights`` as a sparse matrix: at most L non-zeros per row makes W @ T cheap."""
    histories = np.asarray(histories)
    window = histories.shape[1]
    ages = (decay ** np.arange(window - 1, -1, -1, dtype=np.float64)).astype(np.float32)
    rows = np.repeat(np.arange(len(histories)), window)
    cols = histories.reshape(-1)
    keep = cols > 0  # padding carries no evidence
    vals = np.tile(ages, len(histories))[keep]
    return sparse.csr_matrix((vals, (rows[keep], cols[keep])), shape=(len(histories), size))
