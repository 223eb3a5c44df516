"""Int4 storage for the per-item tables of a dynamic-range ``.tflite``.

Why: at V = 3,659 items every [V+1, r] table costs 3.6 KB per rank step in int8. LiteRT's
hybrid FULLY_CONNECTED (float input, quantized weights) also runs INT4 weights, two per byte,
and returns exactly what the same values stored as int8 give (measured with ai-edge-litert
2.3.0: an int4-packed FPMC table scores bit-identically to its int4 values on the int8
grid; tflite-runtime 2.14 loads and runs it too). A GATHER of INT4 params followed by a
DEQUANTIZE (how a dynamic-range model looks up the tied item table) also returns exactly the
int4 values when the GATHER's output is typed INT4 as well (typed INT8, as the converter left
it, the DEQUANTIZE read the packed bytes as int8: 0.4-0.6 off). tflite-runtime 2.14 has no
INT4 GATHER, so ``gather=False`` keeps such tables int8 for it. Everything below
``min_elements`` stays int8.

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


_FC_FILTER = (schema.BuiltinOperator.FULLY_CONNECTED, 1)
_GATHER_PARAMS = (schema.BuiltinOperator.GATHER, 0)


def _gathers_feed_dequantize(model: schema.ModelT, buffer: int) -> bool:
    """True when every GATHER of ``buffer`` is read only by DEQUANTIZE ops (so its output may be INT4)."""
    for subgraph in model.subgraphs:
        consumers: dict[int, set[int]] = {}
        for op in subgraph.operators:
            for index in op.inputs:
                consumers.setdefault(index, set()).add(_builtin(model, op))
        for op in subgraph.operators:
            if (_builtin(model, op) == schema.BuiltinOperator.GATHER
                    and subgraph.tensors[op.inputs[0]].buffer == buffer
                    and consumers.get(op.outputs[0], set()) != {schema.BuiltinOperator.DEQUANTIZE}):
                return False
    return True


def export_grid(values: np.ndarray, int4: bool) -> np.ndarray:
    """The float values a dynamic-range export stores for ``values``: the converter's per-tensor
    symmetric int8 (max |w| / 127), then, if ``int4``, the int4 step ``int4_fc_tables`` picks.

    Quantization-aware training snaps weights to this grid, so the export loses nothing more.
    """
    values = np.asarray(values, dtype=np.float64)
    peak = float(np.abs(values).max())
    if peak == 0.0:
        return values.astype(np.float32)
    scale = peak / 127.0
    q8 = np.clip(np.round(values / scale), -127, 127)
    if not int4:
        return (q8 * scale).astype(np.float32)
    step = int4_step(q8)
    return (np.clip(np.round(q8 / step), -LEVELS, LEVELS) * step * scale).astype(np.float32)


def int4_fc_tables(blob: bytes, min_elements: int = MIN_ELEMENTS, mse_clip: bool = MSE_CLIP,
                   gather: bool = False) -> tuple[bytes, dict]:
    """Repack every per-tensor int8 weight read only as a FULLY_CONNECTED filter (or, with ``gather``,
    also as the params of GATHERs whose outputs only DEQUANTIZE reads) to int4.

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
    allowed = {_FC_FILTER, _GATHER_PARAMS} if gather else {_FC_FILTER}
    converted: dict[int, list[int]] = {}
    scales: dict[int, float] = {}
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            data = model.buffers[tensor.buffer].data
            quant = tensor.quantization
            eligible = (tensor.type == schema.TensorType.INT8 and data is not None and len(data) >= min_elements
                        and bool(readers.get(tensor.buffer)) and readers[tensor.buffer] <= allowed
                        and (_GATHER_PARAMS not in readers[tensor.buffer]
                             or _gathers_feed_dequantize(model, tensor.buffer))
                        and quant is not None
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
        raise Int4Error(f"no int8 weight of >= {min_elements} elements that only FULLY_CONNECTED (or GATHER, then "
                         "DEQUANTIZE) reads, to repack")
    for subgraph in model.subgraphs:  # a GATHER of int4 params yields int4 rows, with the same scale
        for op in subgraph.operators:
            params = subgraph.tensors[op.inputs[0]] if op.inputs is not None and len(op.inputs) else None
            if (_builtin(model, op) == schema.BuiltinOperator.GATHER and params is not None
                    and params.buffer in converted):
                rows = subgraph.tensors[op.outputs[0]]
                rows.type = schema.TensorType.INT4
                rows.quantization.scale = [scales[params.buffer]]
                rows.quantization.zeroPoint = [0]
    out = pack_model(model, len(blob))
    notes = {"tables": sorted(converted.values()), "bytes_before": len(blob), "bytes_after": len(out)}
    _LOGGER.info("int4 tables %s: %d -> %d bytes", notes["tables"], len(blob), len(out))
    return out, notes
