"""One installed model opened for serving: the interpreter plus the catalogue it ranks.

The item list and the interpreter must agree (window, number of items), otherwise serving would
show the wrong products; `open_model` checks that before anything is swapped in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.runtime import ModelLoadError, Recommender, RuntimeInfo, load_recommender
from protocol import artifact
from protocol.errors import ProtocolError

_LOGGER = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to serve; `items[i]` is `(stock_code, description)` of model index i."""

    model_id: str
    version: int
    path: Path
    recommender: Recommender
    items: list[tuple[str, str]]
    popular: list[int]
    window: int
    k: int
    metrics: dict[str, Any] = field(default_factory=dict)
    runtime: RuntimeInfo | None = None

    @property
    def model_file(self) -> Path:
        return self.path / artifact.MODEL_FILE

    @property
    def model_bytes(self) -> int:
        return self.model_file.stat().st_size

    def describe(self) -> dict[str, Any]:
        """Small JSON-able summary (state messages, HTTP model info, logs)."""
        return {"model_id": self.model_id, "version": self.version, "window": self.window, "k": self.k,
                "num_items": len(self.items) - 1,
                "runtime": self.runtime.to_dict() if self.runtime else None}

    def close(self) -> None:
        """Release the interpreter."""
        self.recommender.close()


def _parse_items(slot_dir: Path) -> tuple[list[tuple[str, str]], list[int]]:
    obj = artifact.read_items(slot_dir)
    items = [(str(code), str(desc)) for code, desc in obj["items"]]
    popular_raw = obj.get("popular", [])
    if not isinstance(popular_raw, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 < i < len(items) for i in popular_raw):
        raise ProtocolError(
            f"{slot_dir}/{artifact.ITEMS_FILE}: 'popular' must list item indices in 1..{len(items) - 1}")
    return items, list(popular_raw)


def open_model(slot_dir: Path | str, *, model_id: str, version: int, threads: int = 1,
               runtime: str | None = None) -> LoadedModel:
    """Open an unpacked artifact folder; raise ModelLoadError (or OpVersionError) if anything is off."""
    slot_dir = Path(slot_dir)
    model_file = slot_dir / artifact.MODEL_FILE
    try:
        items, popular = _parse_items(slot_dir)
        metrics = artifact.read_metrics(slot_dir)
    except (ProtocolError, OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"artifact metadata is broken: {exc}", path=slot_dir) from exc
    recommender = load_recommender(model_file, threads=threads, runtime=runtime)
    try:
        _check_consistent(recommender, items, metrics, slot_dir)
    except ModelLoadError:
        recommender.close()
        raise
    model = LoadedModel(model_id=model_id, version=version, path=slot_dir, recommender=recommender, items=items,
                        popular=popular, window=recommender.window, k=recommender.k, metrics=metrics,
                        runtime=recommender.runtime)
    _LOGGER.info("model_opened model_id=%s version=%s items=%d path=%s", model_id, version, len(items) - 1, slot_dir)
    return model


def _check_consistent(rec: Recommender, items: list[tuple[str, str]], metrics: dict[str, Any], slot_dir: Path) -> None:
    """Metadata that disagrees with the graph means a mixed-up artifact: refuse it."""
    window = metrics.get("window")
    if window is not None and window != rec.window:
        raise ModelLoadError(f"metrics.json window {window} != model input length {rec.window}",
                             path=slot_dir, runtime=rec.runtime)
    num_items = metrics.get("num_items")
    if num_items is not None and num_items + 1 != len(items):
        raise ModelLoadError(f"metrics.json num_items {num_items} but items.json lists {len(items) - 1} items",
                             path=slot_dir, runtime=rec.runtime)
