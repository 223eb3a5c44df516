"""Training of the float32 reference recommender, and its full-ranking evaluation in Keras.

Presets: ``quick`` is the demo's model (a few minutes on two cores, must beat popularity
5x on HR@10); ``full`` is the reference the compressed models are judged against (must beat
the item-to-item baseline clearly on NDCG@10).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras

from compression.data import Dataset
from compression.metrics import DEFAULT_CHUNK, RankingAccumulator
from compression.model import build_reference

_LOGGER = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (stored verbatim in metrics.json ``training``)."""

    epochs: int = 3
    batch_size: int = 256
    lr: float = 2e-3
    dim: int = 64
    hidden: int = 256
    window: int = 20
    seed: int = 7
    max_customers: int | None = None
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "dim", "hidden", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")

    @classmethod
    def quick(cls, **overrides) -> TrainConfig:
        """The demo preset: ~1.5 min of fitting on two cores, HR@10 well above 5x popularity."""
        return cls(**{"epochs": 3, "batch_size": 512, "lr": 5e-3, **overrides})

    @classmethod
    def full(cls, **overrides) -> TrainConfig:
        """The reference preset: more epochs (val NDCG@10 plateaus after ~5), for the best NDCG@10."""
        return cls(**{"epochs": 5, "batch_size": 512, "lr": 5e-3, **overrides})

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return dataclasses.asdict(self)


class _ValidationCallback(keras.callbacks.Callback):
    """Logs full-ranking validation metrics after every epoch (cheap: one pass over U users)."""

    def __init__(self, dataset: Dataset, window: int) -> None:
        super().__init__()
        self._dataset = dataset
        self._window = window
        self.rows: list[dict[str, float]] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        result = evaluate_keras(self.model, self._dataset, split="val", window=self._window)
        self.rows.append(result)
        _LOGGER.info("epoch %d: val HR@10 %.4f NDCG@10 %.4f MRR %.4f",
                     epoch + 1, result["hr10"], result["ndcg10"], result["mrr"])


def train_reference(dataset: Dataset, config: TrainConfig,
                    progress: bool = True) -> tuple[keras.Model, dict]:
    """Train the reference model on the training windows of ``dataset``.

    Returns the model and a history dict: per-epoch ``loss`` and ``val_hr10``/``val_ndcg10``/
    ``val_mrr``, plus ``seconds`` (wall time of fit) and ``train_pairs``.
    """
    keras.utils.set_random_seed(config.seed)
    x, y = dataset.training_pairs(config.window)
    model = build_reference(dataset.num_items, config.window, config.dim, config.hidden)
    steps = config.epochs * int(np.ceil(len(x) / config.batch_size))
    # cosine decay to 5% of lr: late epochs refine instead of bouncing around
    schedule = keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=steps, alpha=0.05)
    if config.weight_decay > 0:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(schedule)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    val = _ValidationCallback(dataset, config.window)
    _LOGGER.info("training on %d pairs, V=%d, %s", len(x), dataset.num_items, config)
    start = time.perf_counter()
    fit = model.fit(x, y, batch_size=config.batch_size, epochs=config.epochs, shuffle=True,
                    verbose=1 if progress else 0, callbacks=[val])
    seconds = time.perf_counter() - start
    history = {
        "loss": [float(v) for v in fit.history["loss"]],
        "val_hr10": [r["hr10"] for r in val.rows],
        "val_ndcg10": [r["ndcg10"] for r in val.rows],
        "val_mrr": [r["mrr"] for r in val.rows],
        "seconds": seconds,
        "train_pairs": int(len(x)),
    }
    return model, history


def evaluate_keras(model: keras.Model, dataset: Dataset, split: str = "test",
                   window: int | None = None, chunk: int = DEFAULT_CHUNK) -> dict[str, float]:
    """Full-ranking HR@10/NDCG@10/MRR of a Keras model on the val or test histories."""
    window = window or int(model.inputs[0].shape[1])
    histories, targets = dataset.eval_histories(split, window)
    acc = RankingAccumulator(num_items=dataset.num_items)
    for start in range(0, len(histories), chunk):
        logits = model(tf.constant(histories[start:start + chunk]), training=False).numpy()
        acc.add(logits, targets[start:start + chunk])
    return acc.result()
