"""The MLP recommender: one of the reference candidates (``compression.reference``).

An MLP over the embeddings of the last ``window`` items: small enough to train in minutes on
two cores, and made only of Embedding/Dense layers in a single chain, which every TFLite
runtime and every chain-rebuilding or tfmot technique (pruning, clustering, QAT, SVD, CP)
supports; the search runs those techniques on it when the chosen reference is sequential.
"""

from __future__ import annotations

import logging

import tf_keras as keras

_LOGGER = logging.getLogger(__name__)

INPUT_NAME = "history"


def build_reference(num_items: int, window: int = 20, dim: int = 64, hidden: int = 256) -> keras.Model:
    """Build the reference model: int32 history [B, window] -> logits [B, num_items + 1].

    Index 0 is padding: it has an embedding row and a logit column, and export masks it out.
    """
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    for name, value in (("window", window), ("dim", dim), ("hidden", hidden)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    history = keras.Input(shape=(window,), dtype="int32", name=INPUT_NAME)
    x = keras.layers.Embedding(num_items + 1, dim, name="item_embedding")(history)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(hidden, activation="relu", name="hidden")(x)
    x = keras.layers.Dense(dim, name="projection")(x)
    logits = keras.layers.Dense(num_items + 1, name="logits")(x)
    model = keras.Model(history, logits, name="edgeguide_reference")
    _LOGGER.debug("built reference model: V=%d L=%d dim=%d hidden=%d params=%d",
                  num_items, window, dim, hidden, model.count_params())
    return model
