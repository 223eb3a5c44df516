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
from dataclasses import dataclass

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
        qat_model = quantize_dense_layers(model)
        history = fine_tune(qat_model, dataset, epochs=self.epochs, learning_rate=self.learning_rate,
                            max_pairs=self.max_pairs)
        wrapped = [layer.name for layer in qat_model.layers if "quant" in type(layer).__name__.lower()]
        _LOGGER.info("qat: %d wrapped layers, loss %s", len(wrapped), history["loss"])
        return StepResult(qat_model, [self.name], {"wrapped_layers": wrapped, "fine_tune": history},
                          quantization=self.export_mode, terminal=True)
