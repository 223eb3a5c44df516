"""What the measurement needs from a model (why: agent.measure must not depend on one runtime)."""

from __future__ import annotations

import logging
from typing import Any, Protocol, runtime_checkable

import numpy as np

_LOGGER = logging.getLogger(__name__)


@runtime_checkable
class Recommender(Protocol):
    """Anything that ranks items for one history; ``agent.runtime`` provides the LiteRT one."""

    def recommend(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-K ``(item_ids, scores)`` for an int32 history of length L."""
        ...


def runtime_of(recommender: object) -> dict[str, Any] | None:
    """``{"name", "version"}`` from a recommender's optional ``.runtime`` attribute, else None."""
    runtime = getattr(recommender, "runtime", None)
    if runtime is None:
        return None
    if isinstance(runtime, dict):
        return {"name": runtime.get("name"), "version": runtime.get("version")}
    return {"name": getattr(runtime, "name", None), "version": getattr(runtime, "version", None)}


def validate_histories(histories: np.ndarray) -> np.ndarray:
    """Check golden histories are a non-empty int32-compatible N x L array with no all-padding row.

    Why: measurement.md forbids zero inputs; a padding-only history would time a degenerate path.
    """
    array = np.asarray(histories)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"histories must be a non-empty 2-D array N x L, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"histories must hold integer item ids, got dtype {array.dtype}")
    if array.min() < 0 or array.max() > np.iinfo(np.int32).max:
        raise ValueError(f"item ids must lie in [0, 2**31-1], got range [{array.min()}, {array.max()}]")
    empty = np.flatnonzero(~array.any(axis=1))
    if empty.size:
        raise ValueError(
            f"golden histories must be real inputs, but rows {empty[:10].tolist()} are all padding (0)"
        )
    return np.ascontiguousarray(array, dtype=np.int32)
