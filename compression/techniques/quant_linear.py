"""Uniform asymmetric b-bit quantization (b = 2..8): our own reference implementation.

x_q = round((x - x_min) / (x_max - x_min) * (2^b - 1)), x ~= x_min + x_q * (x_max - x_min) / (2^b - 1),
per tensor or per row (embedding rows / kernel output channels). TFLite has no sub-byte
embedding lookup our runtimes all load, so the technique SIMULATES the low-bit tables: the
model carries the dequantized float weights and the notes give the packed size
(b bits per weight + one float32 x_min/x_max pair per row or tensor) the table would take.
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

MIN_BITS, MAX_BITS = 2, 8
GRANULARITIES = ("tensor", "row", "channel")


@dataclass(frozen=True)
class LinearQuantized:
    """Integer codes plus the range(s) needed to invert them. ``axis`` None = per tensor."""

    codes: np.ndarray
    x_min: np.ndarray
    x_max: np.ndarray
    bits: int
    axis: int | None

    @property
    def step(self) -> np.ndarray:
        """Quantization step (x_max - x_min) / (2^b - 1), broadcastable against ``codes``."""
        return (self.x_max - self.x_min) / (2 ** self.bits - 1)

    def packed_bytes(self) -> int:
        """Bytes when codes are bit-packed and each range is two float32 numbers."""
        return int(np.ceil(self.codes.size * self.bits / 8)) + 8 * int(np.size(self.x_min))


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise TechniqueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")


def linear_quantize(x: np.ndarray, bits: int, axis: int | None = None) -> LinearQuantized:
    """Quantize ``x`` to ``bits``; with ``axis`` each slice along it gets its own range.

    ``axis=0`` on an embedding table [V, d] means one range per row (item); ``axis=-1`` on a
    Dense kernel [in, out] means one range per output channel.
    """
    _check_bits(bits)
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        raise TechniqueError("cannot quantize an empty tensor")
    if axis is None:
        x_min, x_max = np.min(x), np.max(x)
    else:
        axis = axis % x.ndim
        reduce = tuple(a for a in range(x.ndim) if a != axis)
        x_min, x_max = np.min(x, axis=reduce, keepdims=True), np.max(x, axis=reduce, keepdims=True)
    levels = 2 ** bits - 1
    span = x_max - x_min
    # A constant slice has no range: every element maps to code 0 and dequantizes exactly.
    safe = np.where(span > 0, span, 1.0)
    codes = np.clip(np.round((x - x_min) / safe * levels), 0, levels).astype(np.uint8)
    return LinearQuantized(codes, np.asarray(x_min), np.asarray(x_max), bits, axis)


def linear_dequantize(q: LinearQuantized) -> np.ndarray:
    """The inverse map: x_min + code * step (float64)."""
    return q.x_min + q.codes.astype(np.float64) * q.step


def _axis_for(layer: keras.layers.Layer, granularity: str) -> int | None:
    if granularity == "tensor":
        return None
    # Embedding rows are items; Dense channels are kernel columns (outputs).
    return 0 if isinstance(layer, keras.layers.Embedding) else -1


@dataclass
class LinearQuantization:
    """Technique ``quant-linear``: simulate b-bit tables for the named layers."""

    bits: int = 4
    granularity: str = "row"
    layers: Sequence[str] = field(default_factory=lambda: ("item_embedding", "logits"))
    name: str = "quant-linear"

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Replace each named layer's kernel by its b-bit round trip; report packed sizes."""
        del dataset  # post-training, data-free
        _check_bits(self.bits)
        if self.granularity not in GRANULARITIES:
            raise TechniqueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        from compression.techniques import sequential as seq

        if seq.is_sequential(model):
            return self._apply_sequential(model, seq)
        out = clone_model(model)
        per_layer = {}
        for name in self.layers:
            layer = out.get_layer(name)
            weights = layer.get_weights()
            q = linear_quantize(weights[0], self.bits, _axis_for(layer, self.granularity))
            approx = linear_dequantize(q)
            per_layer[name] = {"float32_bytes": int(weights[0].size * 4), "packed_bytes": q.packed_bytes(),
                               "max_abs_error": float(np.max(np.abs(approx - weights[0])))}
            weights[0] = approx.astype(weights[0].dtype)
            layer.set_weights(weights)
        _LOGGER.info("quant-linear %d-bit per %s: %s", self.bits, self.granularity, per_layer)
        return StepResult(out, [self.name], {"bits": self.bits, "granularity": self.granularity,
                                             "simulated": True, "layers": per_layer})

    def _apply_sequential(self, model: keras.Model, seq) -> StepResult:
        """Every matrix of a sequential model (tables per item row, kernels per output channel)."""
        out = seq.rebuild(model)
        per_matrix = {}
        for name, variable in seq.matrices(out).items():
            values = variable.numpy()
            table = name.startswith(("item_embedding", "transitions"))
            axis = None if self.granularity == "tensor" else (0 if table else -1)
            q = linear_quantize(values, self.bits, axis)
            approx = linear_dequantize(q)
            per_matrix[name] = {"float32_bytes": int(values.size * 4), "packed_bytes": q.packed_bytes(),
                                "max_abs_error": float(np.max(np.abs(approx - values)))}
            variable.assign(approx.astype(values.dtype))
        _LOGGER.info("quant-linear %d-bit per %s on %d matrices", self.bits, self.granularity, len(per_matrix))
        return StepResult(out, [self.name], {"bits": self.bits, "granularity": self.granularity,
                                             "simulated": True, "layers": per_matrix})
