"""Logarithmic (power-of-two) quantization: w ~= sign(w) * 2^e with an integer exponent e.

One code is zero, one bit is the sign, the other 2^(b-1) - 1 codes are consecutive exponents
ending at the tensor's largest magnitude; weights below the smallest level round to zero.
Multiplying by 2^e is a shift, which is why the scheme exists; like ``quant_linear`` it is
simulated here (dequantized float weights, packed size in the notes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tf_keras as keras

from compression.data import Dataset
from compression.techniques.base import StepResult, TechniqueError
from compression.techniques.common import clone_model

_LOGGER = logging.getLogger(__name__)

ALL_KERNELS = ("item_embedding", "hidden", "projection", "logits")


def log2_quantize(x: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """Power-of-two round trip of ``x`` with ``bits`` bits per weight; returns (values, top exponent)."""
    if not 2 <= bits <= 8:
        raise TechniqueError(f"bits must be in [2, 8], got {bits}")
    x = np.asarray(x, dtype=np.float64)
    magnitude = np.abs(x)
    peak = float(magnitude.max(initial=0.0))
    if peak == 0.0:
        return np.zeros_like(x), 0
    n_exponents = 2 ** (bits - 1) - 1
    e_max = int(np.round(np.log2(peak)))
    e_min = e_max - n_exponents + 1
    with np.errstate(divide="ignore"):
        e = np.round(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
    e = np.clip(e, e_min, e_max)
    values = np.sign(x) * np.exp2(e)
    # Below half the smallest level, zero is the nearer code.
    values[magnitude < 2.0 ** e_min / 2] = 0.0
    return values, e_max


@dataclass
class LogQuantization:
    """Technique ``quant-log``: simulate power-of-two weights in the named layers."""

    bits: int = 4
    layers: Sequence[str] = field(default_factory=lambda: ALL_KERNELS)
    name: str = "quant-log"

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Replace each named kernel by its power-of-two round trip."""
        del dataset  # post-training, data-free
        from compression.techniques import sequential as seq

        if seq.is_sequential(model):  # every matrix (table, FPMC, attention kernels)
            out = seq.rebuild(model)
            targets = [(name, variable, None) for name, variable in seq.matrices(out).items()]
        else:
            out = clone_model(model)
            targets = [(name, None, out.get_layer(name)) for name in self.layers]
        per_layer = {}
        for name, variable, layer in targets:
            weights = [variable.numpy()] if layer is None else layer.get_weights()
            values, e_max = log2_quantize(weights[0], self.bits)
            rel = float(np.linalg.norm(values - weights[0]) / max(np.linalg.norm(weights[0]), 1e-12))
            per_layer[name] = {"e_max": e_max, "relative_error": rel,
                               "packed_bytes": int(np.ceil(weights[0].size * self.bits / 8)) + 1,
                               "distinct": int(len(np.unique(values)))}
            weights[0] = values.astype(weights[0].dtype)
            if layer is None:
                variable.assign(weights[0])
            else:
                layer.set_weights(weights)
        _LOGGER.info("quant-log %d-bit: %s", self.bits, per_layer)
        return StepResult(out, [self.name], {"bits": self.bits, "simulated": True, "layers": per_layer})
