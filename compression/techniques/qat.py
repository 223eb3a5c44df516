"""Quantization-aware training of the Dense layers (tfmot).

tfmot has no QAT path for Embedding (and its default scheme fails on int32 id inputs), so only
Dense layers are annotated; the fake-quant nodes teach their weights to survive int8. The
result keeps tfmot wrappers, so QAT is the last step of a recipe. Export it as "int8": the
Dense kernels keep tfmot's per-tensor scales (per-channel PTQ stores one scale and zero point
per output channel, i.e. per item for the logits layer) and the table is calibrated on real
histories.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from compression.data import Dataset
from compression.techniques.base import StepResult, TechniqueError, check_quantization
from compression.techniques.common import clone_model, fine_tune

_LOGGER = logging.getLogger(__name__)


def quantize_dense_layers(model: keras.Model) -> keras.Model:
    """A QAT model: every Dense layer wrapped with tfmot's default 8-bit fake quantization."""
    annotated_names = []

    def annotate(layer: keras.layers.Layer) -> keras.layers.Layer:
        if type(layer) is keras.layers.Dense:
            annotated_names.append(layer.name)
            return tfmot.quantization.keras.quantize_annotate_layer(layer)
        return layer

    annotated = keras.models.clone_model(clone_model(model), clone_function=annotate)
    if not annotated_names:
        raise TechniqueError(f"model {model.name!r} has no Dense layer to quantize; "
                             f"layers: {[la.name for la in model.layers]}")
    with tfmot.quantization.keras.quantize_scope():
        return tfmot.quantization.keras.quantize_apply(annotated)


def int8_grid(values: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric int8 round trip with one scale per slice along ``axis`` (rows of a table, kernel columns)."""
    reduce = tuple(a for a in range(values.ndim) if a != axis % values.ndim)
    scale = np.max(np.abs(values), axis=reduce, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(values / scale), -127, 127) * scale).astype(np.float32)


CONVERTER_MIN_ELEMENTS = 1024  # the TFLite converter leaves smaller weights float under dynamic-range quantization


def repacked_as_int4(name: str, shape: Sequence[int], settings: Mapping[str, Any]) -> bool:
    """Whether an int4 export (``compression.export.INT4_SETTINGS``) stores this sequential-model matrix in int4.

    It mirrors ``compression.int4.int4_tables`` on the graphs ``compression.seqmodel`` builds: FPMC tables,
    table projections and attention kernels are FULLY_CONNECTED filters; the tied table's rows are also
    GATHERed (int4 only with ``gather`` and an even width); CP factors are read by MUL / BATCH_MATMUL (never).
    A test compares this with the exported file.
    """
    from compression.int4 import MIN_ELEMENTS

    if int(np.prod(shape)) < settings.get("min_elements", MIN_ELEMENTS) or "factor_" in name:
        return False
    if name.startswith("item_embedding") and name.split("/")[-1].startswith("embeddings"):
        return bool(settings.get("gather", False)) and int(shape[-1]) % 2 == 0
    return True


def qat_sequential(model: keras.Model, dataset: Dataset, *, epochs: float, learning_rate: float,
                   max_pairs: int | None = None, export_mode: str = "dynamic-tensor") -> tuple[keras.Model, dict]:
    """Weight QAT of a sequential model with a straight-through estimator, through a callback.

    tfmot's ``quantize_apply`` needs top-level Dense layers (and has no Embedding path); here
    every matrix trains on the int8 grid: each step's gradient is taken at the int8 weights and
    added to float shadow weights (the straight-through estimator), which are snapped to the grid
    again. Activations stay float, which is what a dynamic-range export runs.

    With an int4 ``export_mode`` ("dynamic-int4", "dynamic-int4-all") each matrix trains on the grid
    that export stores for it (``int4_matrices``): the converter's per-tensor int8, then int4 for the
    ones it repacks; matrices the converter leaves float (< 1,024 numbers) are left alone. Other
    modes: int8 per row/channel.
    """
    from compression.export import INT4_SETTINGS
    from compression.int4 import export_grid
    from compression.techniques import sequential as seq

    out = seq.rebuild(model)
    variables = seq.matrices(out)
    axes = {name: 0 if name.startswith(("item_embedding", "transitions")) else -1 for name in variables}
    settings = INT4_SETTINGS.get(export_mode)
    int4 = sorted(name for name, v in variables.items()
                  if settings is not None and repacked_as_int4(name, v.shape, settings))
    shadow = {name: v.numpy() for name, v in variables.items()}
    snapped: dict[str, np.ndarray] = {}

    def snap(name: str) -> np.ndarray:
        if settings is None:
            return int8_grid(shadow[name], axes[name])
        if shadow[name].size < CONVERTER_MIN_ELEMENTS:
            return shadow[name]
        return export_grid(shadow[name], int4=name in int4)

    def project(step: int) -> None:
        for name, variable in variables.items():
            if step != 0:
                shadow[name] = shadow[name] + (variable.numpy() - snapped[name])
            snapped[name] = snap(name)
            variable.assign(snapped[name])

    history = seq.constrained_fine_tune(out, dataset, project, epochs=epochs, learning_rate=learning_rate,
                                        max_pairs=max_pairs)
    scheme = ("int8 symmetric, per row/channel, STE" if settings is None
              else f"the {export_mode} export grid (per-tensor int8, int4 for the repacked matrices), STE")
    return out, {"quantized_matrices": sorted(variables), "int4_matrices": int4, "scheme": scheme,
                 "fine_tune": history}


@dataclass
class QuantizationAwareTraining:
    """Technique ``qat``: annotate Dense layers, fine-tune with fake quantization."""

    epochs: float = 1.0
    learning_rate: float = 2e-4
    export_mode: str = "int8"
    max_pairs: int | None = None
    name: str = "qat"

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Return the fake-quantized, fine-tuned model (terminal: only export may follow)."""
        check_quantization(self.export_mode)
        from compression.techniques.sequential import is_sequential

        if is_sequential(model):
            trained, notes = qat_sequential(model, dataset, epochs=self.epochs, learning_rate=self.learning_rate,
                                            max_pairs=self.max_pairs, export_mode=self.export_mode)
            mode = "dynamic-tensor" if self.export_mode == "int8" else self.export_mode
            weights = "int8 and int4 weights" if "int4" in mode else "int8 weights"
            notes["export"] = f"{mode} ({weights}, float activations: full-int8 outputs tie scores)"
            return StepResult(trained, [self.name], notes, quantization=mode)
        qat_model = quantize_dense_layers(model)
        history = fine_tune(qat_model, dataset, epochs=self.epochs, learning_rate=self.learning_rate,
                            max_pairs=self.max_pairs)
        wrapped = [layer.name for layer in qat_model.layers if "quant" in type(layer).__name__.lower()]
        _LOGGER.info("qat: %d wrapped layers, loss %s", len(wrapped), history["loss"])
        return StepResult(qat_model, [self.name], {"wrapped_layers": wrapped, "fine_tune": history},
                          quantization=self.export_mode, terminal=True)
