"""Int4 storage for the per-item score tables a ``.tflite`` reads only through FULLY_CONNECTED.

Why: at V = 3,659 items every [V+1, r] table costs 3.6 KB per rank step in int8. LiteRT's
hybrid FULLY_CONNECTED (float input, quantized weights) also runs INT4 weights, two per byte,
and returns exactly what the same values stored as int8 give (measured with ai-edge-litert
2.3.0: an int4-packed FPMC table scores bit-identically to its int4 values on the int8
grid; tflite-runtime 2.14 loads and runs it too). GATHER of INT4
params did not (0.4-0.6 off), so a table a GATHER reads (the tied item table) stays int8, as
does everything below ``min_elements``; the FPMC "last" factors are read by a
FULLY_CONNECTED for that reason (``compression.seqmodel.TransitionHeads``).

This is lossy (15 levels per tensor instead of 255): it is an export mode (``dynamic-int4``),
applied to a ``dynamic-tensor`` model, and every figure is measured on its output.
"""

from __future__ import annotations

import logging

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from compression.compact import pack_model

_LOGGER = logging.getLogger(__name__)

LEVELS = 7  # symmetric int4: -7..7, like the converter's symmetric int8 weights use -127..127
MIN_ELEMENTS = 16384  # the per-item tables; attention kernels (64 x 64) stay int8
MSE_CLIP = True  # step chosen for least squared error (``int4_step``), not max |w| / 7


class Int4Error(Exception):
    """Raised when a model cannot be given int4 tables."""


def _builtin(model: schema.ModelT, op: schema.OperatorT) -> int:
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def pack_nibbles(values: np.ndarray) -> bytes:
    """Int4 values (-8..7), flat, two per byte: element 2i in the low nibble, 2i+1 in the high one."""
    nibbles = (np.asarray(values, dtype=np.int8).ravel() & 0x0F).astype(np.uint8)
    if len(nibbles) % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def int4_step(q8: np.ndarray) -> float:
    """The int4 step (in int8 units) with the least squared error over ``q8``: clipping a few
    outliers buys finer steps for every other weight."""
    peak = max(float(np.abs(q8).max()), 1.0)
    best, best_err = peak / LEVELS, np.inf
    for fraction in np.linspace(0.4, 1.0, 25):
        step = fraction * peak / LEVELS
        err = float(np.square(np.clip(np.round(q8 / step), -LEVELS, LEVELS) * step - q8).sum())
        if err < best_err:
            best, best_err = step, err
    return best


def int4_fc_tables(blob: bytes, min_elements: int = MIN_ELEMENTS, mse_clip: bool = MSE_CLIP) -> tuple[bytes, dict]:
    """Repack every per-tensor int8 weight read only as a FULLY_CONNECTED filter to int4.

    Returns the new model and notes (``tables``: shapes converted, ``bytes_before/after``).
    """
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(blob, 0))
    readers: dict[int, set[tuple[int, int]]] = {}  # buffer -> {(op code, input position)}
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            for position, index in enumerate(op.inputs):
                if index >= 0:
                    buffer = subgraph.tensors[index].buffer
                    readers.setdefault(buffer, set()).add((_builtin(model, op), position))
    fc_filter = {(schema.BuiltinOperator.FULLY_CONNECTED, 1)}
    converted: dict[int, list[int]] = {}
    scales: dict[int, float] = {}
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            data = model.buffers[tensor.buffer].data
            quant = tensor.quantization
            eligible = (tensor.type == schema.TensorType.INT8 and data is not None and len(data) >= min_elements
                        and readers.get(tensor.buffer) == fc_filter and quant is not None
                        and quant.scale is not None and len(quant.scale) == 1
                        and not any(int(z) for z in quant.zeroPoint))
            if tensor.buffer not in converted and not eligible:
                continue
            if tensor.buffer not in converted:
                q8 = np.frombuffer(bytes(data), dtype=np.int8).astype(np.float64)
                step = int4_step(q8) if mse_clip else 127.0 / LEVELS  # in int8 units
                q4 = np.clip(np.round(q8 / step), -LEVELS, LEVELS).astype(np.int8)
                model.buffers[tensor.buffer].data = np.frombuffer(pack_nibbles(q4), dtype=np.uint8)
                converted[tensor.buffer] = [int(d) for d in tensor.shape]
                scales[tensor.buffer] = float(quant.scale[0]) * step
            tensor.type = schema.TensorType.INT4
            tensor.quantization.scale = [scales[tensor.buffer]]
    if not converted:
        raise Int4Error(f"no int8 FULLY_CONNECTED-only weight of >= {min_elements} elements to repack")
    out = pack_model(model, len(blob))
    notes = {"tables": sorted(converted.values()), "bytes_before": len(blob), "bytes_after": len(out)}
    _LOGGER.info("int4 tables %s: %d -> %d bytes", notes["tables"], len(blob), len(out))
    return out, notes
