"""Structured removal of units (Dense outputs, embedding dimensions) from the layer chain.

Removing unit j of a producer layer deletes its output column (and bias) and the matching
input rows of the next weight-bearing layer, so every tensor physically shrinks: the exported
``.tflite`` gets smaller and faster, unlike unstructured zeros. Importance scores come from
``prune_activation`` or ``prune_gradient``; this module only does the surgery.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import tf_keras as keras

from compression.data import Dataset
from compression.techniques.base import StepResult, TechniqueError
from compression.techniques.common import (
    LayerSpec,
    chain_layers,
    copy_specs,
    fine_tune,
    model_window,
    rebuild,
)

_LOGGER = logging.getLogger(__name__)

# Layers with no weights that units pass through unchanged (Flatten interleaves them by position).
_PASS_THROUGH = (keras.layers.Flatten, keras.layers.Activation, keras.layers.Dropout)
DEFAULT_KEEP = {"item_embedding": 0.5, "hidden": 0.5, "projection": 0.5}


def unit_groups(model: keras.Model) -> dict[str, int]:
    """Layers whose units can be removed -> their unit count.

    A unit is removable when a Dense layer consumes it, possibly behind Flatten; the last layer
    (the item logits) never is.
    """
    layers = chain_layers(model)
    groups = {}
    for i, layer in enumerate(layers):
        if type(layer) not in (keras.layers.Dense, keras.layers.Embedding):
            continue
        if _consumer_index(layers, i) is not None:
            size = layer.units if isinstance(layer, keras.layers.Dense) else layer.output_dim
            groups[layer.name] = int(size)
    return groups


def removable_keep(model: keras.Model, keep: Mapping[str, float]) -> dict[str, float]:
    """The entries of ``keep`` naming layers whose units can be removed; an error if there are none."""
    groups = unit_groups(model)
    removable = {name: fraction for name, fraction in keep.items() if name in groups}
    if not removable:
        raise TechniqueError(f"none of {list(keep)} has removable units; removable: {groups}")
    return removable


def _consumer_index(layers: list[keras.layers.Layer], producer: int) -> int | None:
    for j in range(producer + 1, len(layers)):
        if type(layers[j]) is keras.layers.Dense:
            return j
        if not isinstance(layers[j], _PASS_THROUGH):
            return None
    return None


def keep_indices(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the ``fraction`` highest-scoring units (at least one), in ascending order."""
    if not 0.0 < fraction <= 1.0:
        raise TechniqueError(f"keep fraction must be in (0, 1], got {fraction}")
    n_keep = max(1, int(round(fraction * len(scores))))
    return np.sort(np.argsort(-np.asarray(scores), kind="stable")[:n_keep])


def remove_units(model: keras.Model, keep: Mapping[str, np.ndarray]) -> keras.Model:
    """A new model where each named producer layer keeps only the unit indices given."""
    layers = chain_layers(model)
    groups = unit_groups(model)
    specs = copy_specs(model)
    window = model_window(model)
    index = {layer.name: i for i, layer in enumerate(layers)}
    for name, kept in keep.items():
        if name not in groups:
            raise TechniqueError(f"layer {name!r} has no removable units; removable: {groups}")
        kept = np.asarray(kept, dtype=np.int64)
        n_units = groups[name]
        if kept.size == 0 or kept.min() < 0 or kept.max() >= n_units or len(np.unique(kept)) != kept.size:
            raise TechniqueError(f"layer {name!r}: keep indices must be distinct, in [0, {n_units}), "
                                 f"non-empty; got {kept.size} indices in [{kept.min(initial=0)}, "
                                 f"{kept.max(initial=0)}]")
        i = index[name]
        producer = specs[i]
        weights = producer.weights
        if isinstance(producer.layer, keras.layers.Embedding):
            new_layer = LayerSpec(_fresh(producer.layer, output_dim=int(kept.size)), [weights[0][:, kept]])
        else:
            new_layer = LayerSpec(_fresh(producer.layer, units=int(kept.size)),
                                  [weights[0][:, kept]] + [w[kept] for w in weights[1:]])
        specs[i] = new_layer
        j = _consumer_index(layers, i)
        through_flatten = any(isinstance(layers[t], keras.layers.Flatten) for t in range(i + 1, j))
        rows = (np.arange(window)[:, None] * n_units + kept[None, :]).ravel() if through_flatten else kept
        consumer = specs[j]
        consumer.weights = [consumer.weights[0][rows, :]] + consumer.weights[1:]
    return rebuild(window, specs, model.name)


def _fresh(layer: keras.layers.Layer, **overrides) -> keras.layers.Layer:
    config = layer.get_config()
    config.update(overrides)
    return type(layer).from_config(config)


def structured_prune(model: keras.Model, dataset: Dataset, scores: Mapping[str, np.ndarray],
                     keep: Mapping[str, float], *, epochs: float, technique: str,
                     max_pairs: int | None = None, extra_notes: Mapping | None = None) -> StepResult:
    """Keep the best-scoring fraction of units per layer, rebuild smaller, then fine-tune."""
    kept = {name: keep_indices(scores[name], fraction) for name, fraction in keep.items()}
    before = {name: len(scores[name]) for name in keep}
    pruned = remove_units(model, kept)
    history = fine_tune(pruned, dataset, epochs=epochs, max_pairs=max_pairs)
    units = {name: {"before": before[name], "after": int(kept[name].size)} for name in keep}
    _LOGGER.info("%s: units %s, params %d -> %d", technique, units, model.count_params(),
                 pruned.count_params())
    notes = {"units": units, "params_before": int(model.count_params()),
             "params_after": int(pruned.count_params()), "fine_tune": history}
    notes.update(extra_notes or {})
    return StepResult(pruned, [technique], notes)
