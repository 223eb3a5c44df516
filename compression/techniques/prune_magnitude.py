"""Unstructured weight-magnitude pruning: importance |w|.

Two variants: a one-shot global threshold (the baseline, no training) and tfmot's
``prune_low_magnitude`` with a polynomial sparsity schedule while fine-tuning. Zeros do not
shrink a ``.tflite`` file (dense tensors), only its gzip; the search reports both sizes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from compression.data import Dataset
from compression.techniques import sequential as seq
from compression.techniques.base import StepResult, TechniqueError
from compression.techniques.common import clone_model, fine_tune, model_window, training_arrays

_LOGGER = logging.getLogger(__name__)

# The weight matrices worth pruning; biases are tiny and pruning them hurts.
_KERNEL_ATTRS = {keras.layers.Dense: "kernel", keras.layers.Embedding: "embeddings"}
# tfmot updates the masks only every `frequency` steps: an end_step below it prunes nothing.
_MAX_FREQUENCY = 100


def prunable_kernels(model: keras.Model) -> dict[str, np.ndarray]:
    """Layer name -> its kernel (Dense) or table (Embedding)."""
    out = {}
    for layer in model.layers:
        for cls, attr in _KERNEL_ATTRS.items():
            if type(layer) is cls:
                out[layer.name] = getattr(layer, attr).numpy()
    return out


def sparsity(model: keras.Model) -> float:
    """Fraction of exact zeros over all prunable kernels."""
    kernels = prunable_kernels(model).values()
    total = sum(k.size for k in kernels)
    if total == 0:
        raise TechniqueError(f"model {model.name!r} has no Dense/Embedding kernel")
    return float(sum(int(np.count_nonzero(k == 0)) for k in kernels) / total)


def _check_target(target: float) -> None:
    if not 0.0 < target < 1.0:
        raise TechniqueError(f"target sparsity must be in (0, 1), got {target}")


def magnitude_prune_oneshot(model: keras.Model, target: float) -> keras.Model:
    """Zero the smallest-|w| fraction ``target`` of all kernels at once (one global threshold)."""
    _check_target(target)
    pruned = clone_model(model)
    kernels = prunable_kernels(pruned)
    magnitudes = np.concatenate([np.abs(k).ravel() for k in kernels.values()])
    threshold = np.quantile(magnitudes, target)
    for layer in pruned.layers:
        if layer.name in kernels:
            weights = layer.get_weights()
            weights[0] = np.where(np.abs(weights[0]) <= threshold, 0.0, weights[0]).astype(weights[0].dtype)
            layer.set_weights(weights)
    return pruned


def magnitude_prune_tfmot(model: keras.Model, dataset: Dataset, target: float, *, epochs: float = 1.0,
                          batch_size: int = 256, learning_rate: float = 5e-4, power: int = 3,
                          max_pairs: int | None = None) -> keras.Model:
    """Prune with tfmot's PolynomialDecay schedule (0 -> target) while fine-tuning, then strip.

    The schedule ends at 2/3 of the fine-tuning steps so the last third trains at the final
    sparsity and recovers quality.
    """
    _check_target(target)
    n_pairs = len(training_arrays(dataset, model_window(model), max_pairs=max_pairs)[0])
    steps = max(1, int(round(epochs * n_pairs / batch_size)))
    end_step = max(1, (2 * steps) // 3)
    frequency = max(1, min(_MAX_FREQUENCY, end_step // 10))
    schedule = tfmot.sparsity.keras.PolynomialDecay(initial_sparsity=0.0, final_sparsity=target,
                                                    begin_step=0, end_step=end_step, power=power,
                                                    frequency=frequency)

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        if type(layer) in _KERNEL_ATTRS:
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    # The wrappers take the copy's own layer objects, so the trained weights come along.
    wrapped = keras.models.clone_model(clone_model(model), clone_function=wrap)
    fine_tune(wrapped, dataset, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
              callbacks=[tfmot.sparsity.keras.UpdatePruningStep()], max_pairs=max_pairs)
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    _LOGGER.info("tfmot pruning: %d steps, schedule end %d, frequency %d", steps, end_step, frequency)
    return clone_model(stripped, name=model.name)


def magnitude_prune_sequential(model: keras.Model, dataset: Dataset, target: float, *, gradual: bool,
                               epochs: float = 1.0, batch_size: int = 256, learning_rate: float = 5e-4,
                               power: int = 3, max_pairs: int | None = None) -> keras.Model:
    """Magnitude pruning of a sequential model's matrices (item table, FPMC, attention kernels).

    tfmot's ``prune_low_magnitude`` only wraps top-level Dense/Embedding layers, and these
    Dense layers sit inside the attention blocks; so the same polynomial schedule (0 ->
    ``target`` over the first 2/3 of the steps, masks refreshed every ``frequency`` steps) is
    kept as masks re-applied after every step. ``gradual`` False = one-shot, no training.
    """
    _check_target(target)
    out = seq.rebuild(model)
    variables = seq.matrices(out)
    if not gradual:
        seq.apply_masks(variables, seq.global_magnitude_masks(variables, target))
        return out
    n_pairs = len(training_arrays(dataset, model_window(model), max_pairs=max_pairs)[0])
    steps = max(1, int(round(epochs * n_pairs / batch_size)))
    end_step = max(1, (2 * steps) // 3)
    frequency = max(1, min(_MAX_FREQUENCY, end_step // 10))
    masks: dict[str, np.ndarray] = {}
    levels: list[float] = []

    def project(step: int) -> None:
        if step < 0 or step >= end_step:
            level = target
        elif step % frequency == 0:
            level = target * (1.0 - (1.0 - step / end_step) ** power)
        else:
            level = levels[-1]
        if not levels or level != levels[-1]:
            levels.append(level)
            masks.update(seq.global_magnitude_masks(variables, level))
        seq.apply_masks(variables, masks)

    seq.constrained_fine_tune(out, dataset, project, epochs=epochs, learning_rate=learning_rate,
                              max_pairs=max_pairs)
    _LOGGER.info("sequential magnitude pruning: %d steps, schedule end %d, frequency %d", steps, end_step,
                 frequency)
    return out


@dataclass
class MagnitudePruning:
    """Technique ``prune-magnitude``: ``method`` "tfmot" (schedule + fine-tune) or "oneshot"."""

    target: float = 0.8
    method: str = "tfmot"
    epochs: float = 1.0
    max_pairs: int | None = None
    name: str = "prune-magnitude"

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Prune to ``target`` sparsity; the notes carry the sparsity actually reached."""
        if self.method not in ("oneshot", "tfmot"):
            raise TechniqueError(f"prune-magnitude method must be 'tfmot' or 'oneshot', got {self.method!r}")
        if seq.is_sequential(model):
            pruned = magnitude_prune_sequential(model, dataset, self.target, gradual=self.method == "tfmot",
                                                epochs=self.epochs, max_pairs=self.max_pairs)
            reached = seq.sparsity_of(seq.matrices(pruned))
            return StepResult(pruned, [self.name], {"method": self.method, "target": self.target,
                                                    "sparsity": reached, "scope": "item table, FPMC factors "
                                                    "and attention kernels; masks (tfmot cannot wrap the "
                                                    "Dense layers inside the attention blocks)"})
        if self.method == "oneshot":
            pruned = magnitude_prune_oneshot(model, self.target)
        elif self.method == "tfmot":
            pruned = magnitude_prune_tfmot(model, dataset, self.target, epochs=self.epochs,
                                           max_pairs=self.max_pairs)
        else:
            raise TechniqueError(f"prune-magnitude method must be 'tfmot' or 'oneshot', got {self.method!r}")
        reached = sparsity(pruned)
        _LOGGER.info("prune-magnitude (%s): target %.2f reached %.3f", self.method, self.target, reached)
        return StepResult(pruned, [self.name], {"method": self.method, "target": self.target,
                                                "sparsity": reached})
