"""Activation-based structured pruning: rank units by how much they fire on real histories.

Units that are almost always zero (ReLU) or small carry little signal to the next layer;
removing them physically shrinks the layers (see ``surgery``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import tf_keras as keras

from compression.data import Dataset
from compression.techniques import sequential as seq
from compression.techniques.base import StepResult, TechniqueError
from compression.techniques.common import calibration_histories, model_window
from compression.techniques.surgery import DEFAULT_KEEP, removable_keep, structured_prune

_LOGGER = logging.getLogger(__name__)

CRITERIA = ("mean", "nonzero")


def activation_statistics(model: keras.Model, histories: np.ndarray, layers: list[str],
                          batch_size: int = 256) -> dict[str, dict[str, np.ndarray]]:
    """Per layer and unit: mean |activation| and fraction of exact zeros over ``histories``.

    Embedding outputs count every history position as one row.
    """
    probe = keras.Model(model.inputs, [model.get_layer(name).output for name in layers])
    sums: dict[str, np.ndarray] = {}
    zeros: dict[str, np.ndarray] = {}
    rows: dict[str, int] = dict.fromkeys(layers, 0)
    for start in range(0, len(histories), batch_size):
        outputs = probe(histories[start:start + batch_size], training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for name, out in zip(layers, outputs, strict=True):
            a = out.numpy().reshape(-1, out.shape[-1])
            sums[name] = sums.get(name, 0) + np.abs(a).sum(axis=0, dtype=np.float64)
            zeros[name] = zeros.get(name, 0) + (a == 0).sum(axis=0)
            rows[name] += a.shape[0]
    return {name: {"mean_abs": sums[name] / rows[name], "zero_fraction": zeros[name] / rows[name]}
            for name in layers}


def activation_scores(model: keras.Model, histories: np.ndarray, layers: list[str],
                      criterion: str = "mean") -> dict[str, np.ndarray]:
    """Importance per unit: mean |activation| ("mean") or fraction of non-zero outputs ("nonzero")."""
    if criterion not in CRITERIA:
        raise TechniqueError(f"activation criterion must be one of {CRITERIA}, got {criterion!r}")
    stats = activation_statistics(model, histories, layers)
    if criterion == "mean":
        return {name: stats[name]["mean_abs"] for name in layers}
    return {name: 1.0 - stats[name]["zero_fraction"] for name in layers}


def ffn_activation_scores(model: keras.Model, histories: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per attention block: mean |ReLU output| of each feed-forward unit over ``histories``."""
    blocks = [layer for layer in model.layers if layer.name.startswith("block")]
    seq.ffn_units(model)  # the clear error for models without attention blocks
    probe = keras.Model(model.inputs, [block.input[0] for block in blocks])
    sums = {block.name: 0.0 for block in blocks}
    rows = 0
    for start in range(0, len(histories), batch_size):
        batch = histories[start:start + batch_size]
        inputs = probe(batch, training=False)
        inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        valid = (batch > 0).reshape(-1)
        for block, x in zip(blocks, inputs, strict=True):
            hidden = block.ffn_hidden(x, batch).numpy().reshape(-1, block.dim)[valid]
            sums[block.name] = sums[block.name] + np.abs(hidden).sum(axis=0, dtype=np.float64)
        rows += int(valid.sum())
    return {name: total / max(rows, 1) for name, total in sums.items()}


@dataclass
class ActivationPruning:
    """Technique ``prune-activation``: keep the given fraction of units per layer, then fine-tune."""

    keep: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_KEEP))
    criterion: str = "mean"
    calibration: int = 1024
    epochs: float = 1.0
    max_pairs: int | None = None
    ffn_keep: float = 0.5
    name: str = "prune-activation"

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Score units on real training histories, remove the weakest, fine-tune.

        On a sequential model the units are the attention blocks' feed-forward units, kept at
        ``ffn_keep`` per block (``seq.structured_mask_tune``).
        """
        if seq.is_sequential(model):
            histories = calibration_histories(dataset, model_window(model), self.calibration)
            scores = ffn_activation_scores(model, histories)
            pruned, notes = seq.structured_mask_tune(model, dataset, scores, self.ffn_keep, epochs=self.epochs,
                                                     max_pairs=self.max_pairs)
            return StepResult(pruned, [self.name], notes | {"criterion": "mean", "calibration": len(histories)})
        keep = removable_keep(model, self.keep)
        histories = calibration_histories(dataset, model_window(model), self.calibration)
        scores = activation_scores(model, histories, list(keep), self.criterion)
        return structured_prune(model, dataset, scores, keep, epochs=self.epochs, technique=self.name,
                                max_pairs=self.max_pairs,
                                extra_notes={"criterion": self.criterion, "calibration": len(histories)})
