"""Lossless size trims of a converted ``.tflite``: identical constant buffers stored once, tensor
names dropped, and the two signatures run by one subgraph.

Why: the converter gives each op its own copy of a constant, so the tied item table of the
sequential models (read by a GATHER for the history and by a FULLY_CONNECTED for the scores)
is written twice once both copies are quantized the same way (one int8 scale per tensor);
each of the two signatures (``recommend``, ``score``) carries its own tensor names, tens of
KiB of strings no runtime needs; and each signature gets its own subgraph, although the
``recommend`` graph computes the full ``score`` row on its way to the top-K (~20 KB of ops
and tensor tables for a 2-block SASRec). When every output of one signature is computed,
op for op, inside the other's subgraph, that signature is pointed at those tensors and its
own subgraph dropped; the merge is kept only if both signatures then return bit-identical
outputs to the unmerged model on probe histories. Ops, shapes, types, quantization
parameters and the signatures' names, inputs and outputs are untouched.
"""

from __future__ import annotations

import hashlib
import logging

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

_LOGGER = logging.getLogger(__name__)

_IDENTIFIER = b"TFL3"
_ALIGN = 16  # buffer payloads stay 16-byte aligned, as the converter writes them
_MIN_SHARED = 64  # smaller buffers are not worth a lookup


class _AlignedBuffer(schema.BufferT):
    """A buffer whose payload is written 16-byte aligned (the generated ``Pack`` aligns to 1)."""

    def Pack(self, builder: flatbuffers.Builder) -> int:  # noqa: N802 - the generated API's name
        data = None
        if self.data is not None and len(self.data):
            payload = bytes(self.data)
            builder.StartVector(1, len(payload), _ALIGN)
            builder.head -= len(payload)
            builder.Bytes[builder.head:builder.head + len(payload)] = payload
            data = builder.EndVector()
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        schema.BufferAddOffset(builder, self.offset)
        schema.BufferAddSize(builder, self.size)
        return schema.BufferEnd(builder)


def pack_model(model: schema.ModelT, size_hint: int) -> bytes:
    """Serialise ``model`` with 16-byte aligned buffer payloads."""
    aligned = []
    for buffer in model.buffers:
        new = _AlignedBuffer()
        new.data, new.offset, new.size = buffer.data, buffer.offset, buffer.size
        aligned.append(new)
    model.buffers = aligned
    builder = flatbuffers.Builder(size_hint + 1024)
    builder.Finish(model.Pack(builder), file_identifier=_IDENTIFIER)
    return bytes(builder.Output())


def _options_key(value: object) -> str:
    """A stable text form of an op's options object (None, or a generated ``*OptionsT``)."""
    if value is None:
        return ""
    return repr(sorted((k, repr(v)) for k, v in vars(value).items()))


def _tensor_keys(model: schema.ModelT, subgraph: schema.SubGraphT) -> list[str]:
    """Per tensor, a digest of how it is computed: graph input position, constant, or op over inputs.

    Two tensors of two subgraphs with equal keys hold the same values for the same inputs:
    same op code, version and options applied to inputs with equal keys, same type, shape
    and quantization.
    """
    def describe(tensor: schema.TensorT) -> str:
        quant = tensor.quantization
        q = "" if quant is None else repr((quant.scale, quant.zeroPoint, quant.quantizedDimension))
        shape = None if tensor.shape is None else [int(d) for d in tensor.shape]
        return f"{tensor.type}|{shape}|{q}"

    keys = [""] * len(subgraph.tensors)
    for index, tensor in enumerate(subgraph.tensors):
        data = model.buffers[tensor.buffer].data
        if data is not None and len(data):
            keys[index] = f"const|{tensor.buffer}|{describe(tensor)}"
        else:  # unproduced and not an input (e.g. a variable): never equal to anything else
            keys[index] = f"free|{id(subgraph)}|{index}"
    for position, index in enumerate(subgraph.inputs):
        keys[index] = f"input|{position}|{describe(subgraph.tensors[index])}"
    for op in subgraph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        head = (f"{max(code.builtinCode, code.deprecatedBuiltinCode)}|{code.version}|{code.customCode}|"
                f"{op.builtinOptionsType}|{_options_key(op.builtinOptions)}|{op.customOptions}|"
                + ",".join(keys[i] if i >= 0 else "-" for i in op.inputs))
        for position, index in enumerate(op.outputs):
            digest = hashlib.sha256(f"{head}|{position}|{describe(subgraph.tensors[index])}".encode()).hexdigest()
            keys[index] = f"op|{digest}"
    return keys


def _drop_unused_buffers(model: schema.ModelT) -> None:
    """Remove buffers no tensor or metadata entry refers to any more (buffer 0 stays the empty sentinel)."""
    used = {0} | {t.buffer for sg in model.subgraphs for t in sg.tensors}
    used |= {m.buffer for m in model.metadata or []} | set(model.metadataBuffer or [])
    order = sorted(used)
    remap = {old: new for new, old in enumerate(order)}
    model.buffers = [model.buffers[i] for i in order]
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            tensor.buffer = remap[tensor.buffer]
    for entry in model.metadata or []:
        entry.buffer = remap[entry.buffer]
    if model.metadataBuffer is not None:
        model.metadataBuffer = [remap[i] for i in model.metadataBuffer]


def _merge_signatures(model: schema.ModelT) -> bool:
    """Run both signatures of a two-subgraph model from one subgraph when one contains the other."""
    if len(model.subgraphs) != 2 or len(model.signatureDefs or []) != 2:
        return False
    if sorted(s.subgraphIndex for s in model.signatureDefs) != [0, 1]:
        return False
    if any(op.builtinOptions is not None and any("subgraph" in k.lower() for k in vars(op.builtinOptions))
           for sg in model.subgraphs for op in sg.operators):
        return False  # control flow refers to subgraphs by index
    keys = [_tensor_keys(model, sg) for sg in model.subgraphs]
    for keep, drop in ((0, 1), (1, 0)):
        where = {}
        for index, key in enumerate(keys[keep]):
            where.setdefault(key, index)
        sig = next(s for s in model.signatureDefs if s.subgraphIndex == drop)
        wanted = [m.tensorIndex for m in list(sig.inputs or []) + list(sig.outputs or [])]
        if not all(keys[drop][i] in where for i in wanted):
            continue
        kept = model.subgraphs[keep]
        if any(where[keys[drop][entry.tensorIndex]] not in kept.inputs for entry in sig.inputs or []):
            return False
        for entry in list(sig.inputs or []) + list(sig.outputs or []):
            entry.tensorIndex = where[keys[drop][entry.tensorIndex]]
        # a subgraph output keeps its memory after Invoke; an intermediate's may be reused
        kept.outputs = list(kept.outputs) + [e.tensorIndex for e in sig.outputs or []
                                             if e.tensorIndex not in kept.outputs]
        model.subgraphs = [kept]
        for s in model.signatureDefs:
            s.subgraphIndex = 0
        _drop_unused_buffers(model)
        return True
    return False


def _signature_outputs(blob: bytes, probes: int = 3) -> dict[str, list[np.ndarray]]:
    """Every signature's outputs on a few deterministic inputs (zeros, then small valid ids)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=blob, num_threads=1)
    results: dict[str, list[np.ndarray]] = {}
    rng = np.random.default_rng(0)
    for key in sorted(interpreter.get_signature_list()):
        runner = interpreter.get_signature_runner(key)
        widths = [int(d["shape"][-1]) for d in runner.get_output_details().values() if len(d["shape"])]
        high = max(1, min(widths)) if widths else 1
        outs = []
        for probe in range(probes):
            feed = {}
            for name, detail in runner.get_input_details().items():
                shape = [int(d) for d in detail["shape"]]
                values = np.zeros(shape) if probe == 0 else rng.integers(0, high, size=shape)
                feed[name] = values.astype(detail["dtype"])
            out = runner(**feed)
            outs += [np.array(out[name]) for name in sorted(out)]
        results[key] = outs
    return results


def compact_tflite(blob: bytes, *, merge_signatures: bool = True) -> tuple[bytes, dict]:
    """Return the compacted model and what was saved (``shared_buffers``, ``merged_signatures``, bytes).

    ``merge_signatures`` False keeps one subgraph per signature (for comparisons).
    """
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(blob, 0))
    if any(getattr(b, "offset", 0) for b in model.buffers):
        return blob, {"skipped": "buffers stored outside the flatbuffer"}
    first: dict[bytes, int] = {}
    alias: dict[int, int] = {}
    for index, buffer in enumerate(model.buffers):
        if buffer.data is None or len(buffer.data) < _MIN_SHARED:
            continue
        key = hashlib.sha256(bytes(buffer.data)).digest()
        if key in first:
            alias[index] = first[key]
        else:
            first[key] = index
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            tensor.buffer = alias.get(tensor.buffer, tensor.buffer)
            tensor.name = None
    for index in alias:
        model.buffers[index].data = None
    out = pack_model(model, len(blob))
    merged = False
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(out, 0))
    if merge_signatures and _merge_signatures(model):
        candidate = pack_model(model, len(out))
        before, after = _signature_outputs(out), _signature_outputs(candidate)
        same = before.keys() == after.keys() and all(
            len(before[k]) == len(after[k])
            and all(np.array_equal(a, b) for a, b in zip(before[k], after[k], strict=True))
            for k in before)
        if same:
            out, merged = candidate, True
        else:
            _LOGGER.warning("one-subgraph model differs from the two-subgraph one: kept two subgraphs")
    notes = {"shared_buffers": len(alias), "merged_signatures": merged,
             "bytes_before": len(blob), "bytes_after": len(out)}
    _LOGGER.info("compacted .tflite: %d -> %d bytes (%d duplicate buffers shared, signatures %s)",
                 len(blob), len(out), len(alias), "on one subgraph" if merged else "on their own subgraphs")
    return out, notes
