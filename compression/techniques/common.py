"""Helpers shared by the techniques: walking the recommender's layer chain, rebuilding it with
replaced layers, fine-tuning, and drawing calibration histories from real training data.

The recommender is a chain (history -> embedding -> flatten -> dense ... -> logits), so a
structural edit is "replace layer X by layers Y, Z with these weights" followed by a rebuild.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras

from compression.data import Dataset
from compression.model import INPUT_NAME
from compression.techniques.base import TechniqueError

_LOGGER = logging.getLogger(__name__)


@dataclass
class LayerSpec:
    """A layer to place in a rebuilt chain, with the weights to load into it (None keeps init)."""

    layer: keras.layers.Layer
    weights: list[np.ndarray] | None = None


def model_window(model: keras.Model) -> int:
    """The history length L the model takes (its input is int32 [B, L])."""
    shape = model.inputs[0].shape
    if len(shape) != 2 or shape[1] is None:
        raise TechniqueError(f"model {model.name!r} input shape {shape} is not [B, L]")
    return int(shape[1])


def chain_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers after the input, in order; fails if the graph is not a single chain.

    Reads the functional config (not ``layer.inbound_nodes``): a layer object reused by a
    clone keeps nodes from both models.
    """
    config = model.get_config()
    entries = config.get("layers", [])
    previous = None
    names = []
    for entry in entries:
        if entry["class_name"] == "InputLayer":
            if previous is not None:
                raise TechniqueError(f"model {model.name!r} has several inputs; "
                                     "only single-chain models can be rebuilt")
            previous = entry["name"]
            continue
        nodes = entry.get("inbound_nodes", [])
        sources = [item[0] for node in nodes for item in node] if nodes else []
        if sources != [previous]:
            raise TechniqueError(f"layer {entry['name']!r} takes {sources}, not just the previous layer "
                                 f"{previous!r}; only single-chain models can be rebuilt")
        names.append(entry["name"])
        previous = entry["name"]
    return [model.get_layer(name) for name in names]


def find_layer(model: keras.Model, name: str) -> keras.layers.Layer:
    """The layer called ``name``, with the existing names in the error when it is missing."""
    for layer in model.layers:
        if layer.name == name:
            return layer
    raise TechniqueError(f"model {model.name!r} has no layer {name!r}; "
                         f"layers: {[la.name for la in model.layers]}")


def fresh_copy(layer: keras.layers.Layer, **overrides) -> keras.layers.Layer:
    """A new, unbuilt layer with ``layer``'s config, optionally changed (e.g. ``units``)."""
    config = layer.get_config()
    config.update(overrides)
    return type(layer).from_config(config)


def copy_specs(model: keras.Model) -> list[LayerSpec]:
    """The chain as specs that reproduce the model exactly when rebuilt."""
    return [LayerSpec(fresh_copy(layer), [w.copy() for w in layer.get_weights()])
            for layer in chain_layers(model)]


def rebuild(window: int, specs: Sequence[LayerSpec], name: str) -> keras.Model:
    """Build a functional model from a chain of specs and load their weights."""
    history = keras.Input(shape=(window,), dtype="int32", name=INPUT_NAME)
    x = history
    for spec in specs:
        x = spec.layer(x)
    model = keras.Model(history, x, name=name)
    for spec in specs:
        if spec.weights is not None:
            expected = [tuple(w.shape) for w in spec.layer.get_weights()]
            got = [tuple(np.shape(w)) for w in spec.weights]
            if expected != got:
                raise TechniqueError(f"layer {spec.layer.name!r}: weight shapes {got} do not fit {expected}")
            spec.layer.set_weights(spec.weights)
    return model


def clone_model(model: keras.Model, name: str | None = None) -> keras.Model:
    """An independent copy with the same weights (techniques must never mutate their input)."""
    return rebuild(model_window(model), copy_specs(model), name or model.name)


def training_arrays(dataset: Dataset, window: int, max_pairs: int | None = None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Training (histories, next items), optionally a random subset of ``max_pairs``."""
    x, y = dataset.training_pairs(window)
    if max_pairs is not None and len(x) > max_pairs:
        idx = np.random.default_rng(seed).choice(len(x), size=max_pairs, replace=False)
        x, y = x[idx], y[idx]
    return x, y


def calibration_histories(dataset: Dataset, window: int, n: int = 1024, seed: int = 0) -> np.ndarray:
    """``n`` real training histories (never test data) for calibration and importance scores."""
    return training_arrays(dataset, window, max_pairs=n, seed=seed)[0]


def compile_for_training(model: keras.Model, learning_rate: float) -> None:
    """Next-item cross-entropy on logits, the loss the reference is trained with."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def fine_tune(model: keras.Model, dataset: Dataset, *, epochs: float, batch_size: int = 256,
              learning_rate: float = 1e-3, callbacks: Sequence[keras.callbacks.Callback] = (),
              max_pairs: int | None = None, seed: int = 0) -> dict:
    """Train in place on the training pairs; ``epochs`` may be fractional (e.g. 0.5 of an epoch).

    Returns the loss history. Fine-tuning recovers the quality a structural edit lost.
    """
    if epochs <= 0:
        return {"epochs": 0, "loss": []}
    x, y = training_arrays(dataset, model_window(model), max_pairs=max_pairs, seed=seed)
    compile_for_training(model, learning_rate)
    steps = max(1, int(round(epochs * len(x) / batch_size)))
    full_epochs = steps * batch_size // len(x)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(x)) for _ in range(full_epochs + 1)])[: steps * batch_size]
    ds = tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(batch_size)
    history = model.fit(ds, epochs=1, verbose=0, callbacks=list(callbacks))
    losses = [float(v) for v in history.history.get("loss", [])]
    _LOGGER.debug("fine-tuned %s for %d steps (%.2f epochs of %d pairs), loss %s",
                  model.name, steps, epochs, len(x), losses)
    return {"steps": steps, "epochs": epochs, "loss": losses}
