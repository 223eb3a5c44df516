"""Top-N neighbour tables: how an item-to-item baseline would be stored on a device.

A device cannot hold a dense V x V transition matrix, so the honest device form of the
item-to-item baseline is, per item, its N strongest successors as int16 ids plus float16
weights: V x N x 4 bytes. Its figures are measured on that truncated, float16 table.
"""

from __future__ import annotations

import logging

import numpy as np

_LOGGER = logging.getLogger(__name__)

ID_BYTES = 2      # int16 item ids (V < 32768 here; checked)
WEIGHT_BYTES = 2  # float16 weights


def table_bytes(num_items: int, n: int) -> int:
    """Device bytes of a top-``n`` table over ``num_items`` items (padding row not stored)."""
    if n < 1 or num_items < 1:
        raise ValueError(f"num_items and n must be >= 1, got {num_items}, {n}")
    return num_items * n * (ID_BYTES + WEIGHT_BYTES)


def top_n_table(matrix: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int16 [R, n], weights float16 [R, n]): each row's ``n`` largest entries, largest first.

    Entries that are zero in the matrix keep weight 0 (their ids carry no evidence).
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {matrix.shape}")
    if matrix.shape[1] > np.iinfo(np.int16).max:
        raise ValueError(f"{matrix.shape[1]} columns do not fit int16 ids")
    n = min(n, matrix.shape[1])
    part = np.argpartition(-matrix, n - 1, axis=1)[:, :n]
    vals = np.take_along_axis(matrix, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    ids = np.take_along_axis(part, order, axis=1)
    weights = np.take_along_axis(vals, order, axis=1)
    return ids.astype(np.int16), weights.astype(np.float16)


def dense_from_table(ids: np.ndarray, weights: np.ndarray, columns: int) -> np.ndarray:
    """The dense float32 matrix a top-N table stands for (what scoring on the device computes)."""
    dense = np.zeros((ids.shape[0], columns), dtype=np.float32)
    rows = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    np.add.at(dense, (rows, ids.reshape(-1).astype(np.int64)), weights.reshape(-1).astype(np.float32))
    return dense
