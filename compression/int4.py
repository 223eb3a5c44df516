"""Int4 storage for the per-item tables of a dynamic-range ``.tflite``.

Why: at V = 3,659 items every [V+1, r] table costs 3.6 KB per rank step in int8. LiteRT's
hybrid FULLY_CONNECTED (float input, quantized weights) also runs INT4 weights, two per byte,
and returns exactly what the same values stored as int8 give (measured with ai-edge-litert
2.3.0: an int4-packed FPMC table scores bit-identically to its int4 values on the int8
grid; tflite-runtime 2.14 loads and runs it too). A GATHER of INT4 params followed by a
DEQUANTIZE (how a dynamic-range model looks up the tied item table) also returns exactly the
int4 values when the GATHER's output is typed INT4 as well (typed INT8, as the converter left
it, the DEQUANTIZE read the packed bytes as int8: 0.4-0.6 off), and only for rows of an even
number of values along axis 0 (a 1-D table and rows of 5 or 7 values came back wrong, so those
stay int8). tflite-runtime 2.14 has no INT4 GATHER, so ``gather=False`` keeps such tables int8
for it. Everything below ``min_elements`` stays int8.

This is lossy (15 levels per tensor instead of 255): it is applied by the export modes
``dynamic-int4`` and ``dynamic-int4-all`` (``compression.export.INT4_SETTINGS``) to a
``dynamic-tensor`` model, and every figure is measured on their output.
"""

from __future__ import annotations

import logging

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from compression.compact import pack_model

_LOGGER = logging.getLogger(__name__)

LEVELS = 7  # symmetric int4: -7..7, like the converter's symmetric int8 weights use -127..127
MIN_ELEMENTS = 16384  # the per-item tables; attention kernels (64 x 64) stay int8 unless a mode lowers it
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


def unpack_nibbles(packed: bytes | np.ndarray, count: int) -> np.ndarray:
    """The inverse of ``pack_nibbles``: ``count`` int4 values as int8 (for reading a packed table back)."""
    raw = np.frombuffer(bytes(packed), dtype=np.uint8)
    nibbles = np.stack([raw & 0x0F, raw >> 4], axis=1).ravel()[:count]
    return np.where(nibbles > 7, nibbles.astype(np.int16) - 16, nibbles).astype(np.int8)


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


def int4_values(q8: np.ndarray, mse_clip: bool = MSE_CLIP) -> tuple[np.ndarray, float]:
    """int8 weights (as numbers) -> their int4 values (-7..7) and the step, in int8 units, between levels."""
    step = int4_step(q8) if mse_clip else 127.0 / LEVELS
    return np.clip(np.round(q8 / step), -LEVELS, LEVELS).astype(np.int8), step


_FC_FILTER = (schema.BuiltinOperator.FULLY_CONNECTED, 1)
_GATHER_PARAMS = (schema.BuiltinOperator.GATHER, 0)


def _gather_reads_int4(subgraph: schema.SubGraphT, op: schema.OperatorT, consumers: dict[int, set[int]]) -> bool:
    """May this GATHER read int4 params? Only along axis 0 without batch dims, over rows of an even number of
    values (measured: a 1-D table and rows of 5 or 7 values came back wrong), and with an output that only
    DEQUANTIZE reads and that is not a subgraph output (nothing else takes int4 activations)."""
    options = op.builtinOptions
    axis, batch_dims = (getattr(options, "axis", 0), getattr(options, "batchDims", 0)) if options else (0, 0)
    shape = [int(d) for d in subgraph.tensors[op.inputs[0]].shape]
    row = int(np.prod(shape[1:])) if len(shape) >= 2 else 0
    out = op.outputs[0]
    return (axis == 0 and batch_dims == 0 and row > 0 and row % 2 == 0
            and consumers.get(out) == {schema.BuiltinOperator.DEQUANTIZE}
            and out not in set(subgraph.outputs if subgraph.outputs is not None else ()))


def export_grid(values: np.ndarray, *, int4: bool) -> np.ndarray:
    """The float values a dynamic-range export stores for a weight the converter quantizes: its per-tensor
    symmetric int8 (max |w| / 127), then, if ``int4``, the int4 step ``int4_tables`` picks.

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
    q4, step = int4_values(q8)
    return (q4 * step * scale).astype(np.float32)


def int4_tables(blob: bytes, min_elements: int = MIN_ELEMENTS, mse_clip: bool = MSE_CLIP,
                gather: bool = False) -> tuple[bytes, dict]:
    """Repack to int4 every per-tensor int8 weight buffer of >= ``min_elements`` that only FULLY_CONNECTED
    reads as its filter (or, with ``gather``, also GATHERs that ``_gather_reads_int4`` allows).

    Decided per buffer: every tensor on it must be per-tensor int8 with the same scale and no zero point.
    Returns the new model and notes (``tables``: shapes converted, ``bytes_before/after``).
    """
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(blob, 0))
    allowed = {_FC_FILTER, _GATHER_PARAMS} if gather else {_FC_FILTER}
    readers: dict[int, set[tuple[int, int]]] = {}  # buffer -> {(op code, input position)}
    tensors: dict[int, list[schema.TensorT]] = {}  # buffer -> the tensors that hold it
    gathers: dict[int, list[tuple[schema.TensorT, bool]]] = {}  # buffer -> (GATHER output, may be int4)
    for subgraph in model.subgraphs:
        consumers: dict[int, set[int]] = {}
        for op in subgraph.operators:
            for index in op.inputs if op.inputs is not None else ():
                consumers.setdefault(int(index), set()).add(_builtin(model, op))
        for tensor in subgraph.tensors:
            tensors.setdefault(tensor.buffer, []).append(tensor)
        for op in subgraph.operators:
            code = _builtin(model, op)
            for position, index in enumerate(op.inputs if op.inputs is not None else ()):
                if index < 0:
                    continue
                buffer = subgraph.tensors[index].buffer
                readers.setdefault(buffer, set()).add((code, position))
                if (code, position) == _GATHER_PARAMS:
                    gathers.setdefault(buffer, []).append(
                        (subgraph.tensors[op.outputs[0]], _gather_reads_int4(subgraph, op, consumers)))

    def eligible(buffer: int) -> bool:
        data = model.buffers[buffer].data
        held = tensors.get(buffer, [])
        quants = [t.quantization for t in held]
        return (data is not None and len(data) >= min_elements and bool(held)
                and all(t.type == schema.TensorType.INT8 for t in held)
                and all(q is not None and q.scale is not None and len(q.scale) == 1
                        and not any(int(z) for z in (q.zeroPoint if q.zeroPoint is not None else ())) for q in quants)
                and len({float(q.scale[0]) for q in quants}) == 1
                and bool(readers.get(buffer)) and readers[buffer] <= allowed
                and all(ok for _, ok in gathers.get(buffer, [])))

    converted: dict[int, list[int]] = {}
    for buffer in sorted(b for b in tensors if eligible(b)):
        held = tensors[buffer]
        q8 = np.frombuffer(bytes(model.buffers[buffer].data), dtype=np.int8).astype(np.float64)
        q4, step = int4_values(q8, mse_clip)
        model.buffers[buffer].data = np.frombuffer(pack_nibbles(q4), dtype=np.uint8)
        scale = float(held[0].quantization.scale[0]) * step
        converted[buffer] = [int(d) for d in held[0].shape]
        for tensor in held:
            tensor.type = schema.TensorType.INT4
            tensor.quantization.scale = [scale]
        for rows, _ in gathers.get(buffer, []):  # a GATHER of int4 params yields int4 rows, with the same scale
            rows.type = schema.TensorType.INT4
            rows.quantization = rows.quantization or schema.QuantizationParametersT()
            rows.quantization.scale = [scale]
            rows.quantization.zeroPoint = [0]
    if not converted:
        raise Int4Error(f"no int8 weight of >= {min_elements} elements that only FULLY_CONNECTED (or GATHER, then "
                         "DEQUANTIZE) reads, to repack")
    out = pack_model(model, len(blob))
    notes = {"tables": sorted(converted.values()), "bytes_before": len(blob), "bytes_after": len(out)}
    _LOGGER.info("int4 tables %s: %d -> %d bytes", notes["tables"], len(blob), len(out))
    return out, notes
