"""Training of the float32 reference recommender, and its full-ranking evaluation in Keras.

Presets: ``quick`` is the demo's model (a few minutes on two cores); ``full`` is the reference
the compressed models are judged against. Both train the SASRec family with transition terms
(``compression.seqmodel``); ``architecture="mlp"`` keeps the earlier MLP. Training minimises
full-softmax cross-entropy and stops early on the validation NDCG@10, restoring the best epoch.
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
from compression.seqmodel import ARCHITECTURES, Architecture, build_model

_LOGGER = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (stored verbatim in metrics.json ``training``).

    ``epochs`` is the cap; training stops after ``patience`` epochs without a better
    validation NDCG@10 (0 = never stop early) and keeps the best epoch's weights.
    """

    epochs: int = 3
    batch_size: int = 256
    lr: float = 2e-3
    dim: int = 64
    hidden: int = 256
    window: int = 20
    seed: int = 7
    max_customers: int | None = None
    weight_decay: float = 0.0
    architecture: str = "mlp"
    blocks: int = 2
    heads: int = 2
    fpmc_dim: int = 32
    offset_window: int = 8
    offset_positions: int = 3
    repeat: bool = True
    dropout: float = 0.2
    patience: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "dim", "hidden", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"TrainConfig.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.patience < 0:
            raise ValueError(f"TrainConfig.patience must be >= 0, got {self.patience}")
        self.arch()  # validates the architecture fields

    def arch(self) -> Architecture:
        """The model shape this config trains."""
        return Architecture(kind=self.architecture, dim=self.dim, hidden=self.hidden, blocks=self.blocks,
                            heads=self.heads, fpmc_dim=self.fpmc_dim, offset_window=self.offset_window,
                            offset_positions=self.offset_positions, repeat=self.repeat, dropout=self.dropout)

    @classmethod
    def quick(cls, **overrides) -> TrainConfig:
        """The demo preset: a small SASRec + transition terms, one epoch (~1-2 min on two cores)."""
        return cls(**{"architecture": "sasrec", "epochs": 1, "batch_size": 512, "lr": 5e-3, "dim": 32,
                      "blocks": 1, "heads": 1, "fpmc_dim": 16, **overrides})

    @classmethod
    def full(cls, **overrides) -> TrainConfig:
        """The reference preset (chosen on validation NDCG@10, see docs/design.md)."""
        return cls(**{"architecture": "sasrec", "epochs": 4, "batch_size": 256, "lr": 2e-3, "patience": 1,
                      **overrides})

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return dataclasses.asdict(self)


class _ValidationCallback(keras.callbacks.Callback):
    """Full-ranking validation after every epoch; keeps the best weights and stops early."""

    def __init__(self, dataset: Dataset, window: int, patience: int = 0) -> None:
        super().__init__()
        self._dataset = dataset
        self._window = window
        self._patience = patience
        self.rows: list[dict[str, float]] = []
        self.best_epoch = -1
        self._best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        result = evaluate_keras(self.model, self._dataset, split="val", window=self._window)
        self.rows.append(result)
        _LOGGER.info("epoch %d: val HR@10 %.4f NDCG@10 %.4f MRR %.4f",
                     epoch + 1, result["hr10"], result["ndcg10"], result["mrr"])
        if self.best_epoch < 0 or result["ndcg10"] > self.rows[self.best_epoch]["ndcg10"]:
            self.best_epoch = epoch
            self._best_weights = [w.copy() for w in self.model.get_weights()]
        elif self._patience and epoch - self.best_epoch >= self._patience:
            _LOGGER.info("early stop: no better validation NDCG@10 for %d epoch(s)", self._patience)
            self.model.stop_training = True

    def restore_best(self) -> None:
        """Load the weights of the epoch with the best validation NDCG@10."""
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)


def train_reference(dataset: Dataset, config: TrainConfig,
                    progress: bool = True) -> tuple[keras.Model, dict]:
    """Train the model ``config`` describes on the training windows of ``dataset``.

    Returns the model (best validation epoch) and a history dict: per-epoch ``loss`` and
    ``val_hr10``/``val_ndcg10``/``val_mrr``, ``best_epoch`` (1-based), ``seconds`` (wall time
    of fit), ``train_pairs`` and ``params``.
    """
    keras.utils.set_random_seed(config.seed)
    x, y = dataset.training_pairs(config.window)
    model = build_model(dataset.num_items, config.arch(), config.window)
    steps = config.epochs * int(np.ceil(len(x) / config.batch_size))
    # cosine decay to 5% of lr: late epochs refine instead of bouncing around
    schedule = keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=steps, alpha=0.05)
    if config.weight_decay > 0:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(schedule)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    val = _ValidationCallback(dataset, config.window, config.patience)
    _LOGGER.info("training %s on %d pairs, V=%d, %s", model.name, len(x), dataset.num_items, config)
    start = time.perf_counter()
    fit = model.fit(x, y, batch_size=config.batch_size, epochs=config.epochs, shuffle=True,
                    verbose=1 if progress else 0, callbacks=[val])
    seconds = time.perf_counter() - start
    val.restore_best()
    history = {
        "loss": [float(v) for v in fit.history["loss"]],
        "val_hr10": [r["hr10"] for r in val.rows],
        "val_ndcg10": [r["ndcg10"] for r in val.rows],
        "val_mrr": [r["mrr"] for r in val.rows],
        "best_epoch": val.best_epoch + 1,
        "seconds": seconds,
        "train_pairs": int(len(x)),
        "params": int(model.count_params()),
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
