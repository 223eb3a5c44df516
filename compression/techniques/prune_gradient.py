"""Gradient-based structured pruning: first-order Taylor importance |w * dL/dw|.

The Taylor term estimates how much the loss would change if a weight were zeroed; summing it
over a unit's outgoing weights (kernel column and bias) and over calibration batches of real
histories ranks whole units, which ``surgery`` then removes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
import tf_keras as keras

from compression.data import Dataset
from compression.techniques import sequential as seq
from compression.techniques.base import StepResult, TechniqueError
from compression.techniques.common import model_window, training_arrays
from compression.techniques.surgery import DEFAULT_KEEP, removable_keep, structured_prune

_LOGGER = logging.getLogger(__name__)


def taylor_scores(model: keras.Model, histories: np.ndarray, targets: np.ndarray, layers: list[str],
                  batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per layer and output unit: sum over batches of sum over the unit's weights of |w * dL/dw|."""
    if len(histories) != len(targets):
        raise TechniqueError(f"{len(histories)} histories but {len(targets)} targets")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = {name: model.get_layer(name).trainable_weights for name in layers}
    flat = [v for name in layers for v in variables[name]]
    scores = {name: 0.0 for name in layers}
    for start in range(0, len(histories), batch_size):
        x = histories[start:start + batch_size]
        y = targets[start:start + batch_size]
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False))
        grads = dict(zip([id(v) for v in flat], tape.gradient(loss, flat), strict=True))
        for name in layers:
            total = 0.0
            for v in variables[name]:
                g = tf.convert_to_tensor(grads[id(v)])  # embedding gradients arrive as IndexedSlices
                taylor = np.abs((v * g).numpy())
                # Kernels/tables [..., units]: sum every axis but the last; biases are [units].
                total = total + taylor.reshape(-1, taylor.shape[-1]).sum(axis=0)
            scores[name] = scores[name] + total
    return {name: np.asarray(scores[name], dtype=np.float64) for name in layers}


def ffn_taylor_scores(model: keras.Model, histories: np.ndarray, targets: np.ndarray,
                      batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per attention block and feed-forward unit: sum of |w * dL/dw| over its ffn_in column and bias."""
    units = seq.ffn_units(model)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    flat = [v for kernel, bias, _ in units.values() for v in (kernel, bias)]
    scores = {name: 0.0 for name in units}
    for start in range(0, len(histories), batch_size):
        with tf.GradientTape() as tape:
            loss = loss_fn(targets[start:start + batch_size], model(histories[start:start + batch_size],
                                                                     training=False))
        grads = iter(tape.gradient(loss, flat))
        for name, (kernel, bias, _) in units.items():
            g_kernel, g_bias = next(grads), next(grads)
            taylor = np.abs((kernel * g_kernel).numpy()).sum(axis=0) + np.abs((bias * g_bias).numpy())
            scores[name] = scores[name] + taylor
    return {name: np.asarray(value, dtype=np.float64) for name, value in scores.items()}


@dataclass
class GradientPruning:
    """Technique ``prune-gradient``: Taylor-score units, keep the given fraction, fine-tune."""

    keep: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_KEEP))
    calibration: int = 1024
    epochs: float = 1.0
    max_pairs: int | None = None
    ffn_keep: float = 0.5
    name: str = "prune-gradient"

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Score units on real (history, next item) pairs, remove the weakest, fine-tune.

        On a sequential model the units are the attention blocks' feed-forward units (``ffn_keep``).
        """
        x, y = training_arrays(dataset, model_window(model), max_pairs=self.calibration, seed=1)
        if seq.is_sequential(model):
            pruned, notes = seq.structured_mask_tune(model, dataset, ffn_taylor_scores(model, x, y),
                                                     self.ffn_keep, epochs=self.epochs, max_pairs=self.max_pairs)
            return StepResult(pruned, [self.name], notes | {"calibration": len(x)})
        keep = removable_keep(model, self.keep)
        scores = taylor_scores(model, x, y, list(keep))
        return structured_prune(model, dataset, scores, keep, epochs=self.epochs, technique=self.name,
                                max_pairs=self.max_pairs, extra_notes={"calibration": len(x)})
