"""Lossless size trims of a converted ``.tflite``: identical constant buffers stored once, tensor names dropped.

Why: the converter gives each op its own copy of a constant, so the tied item table of the
sequential models (read by a GATHER for the history and by a FULLY_CONNECTED for the scores)
is written twice once both copies are quantized the same way (one int8 scale per tensor);
and each of the two signatures (``recommend``, ``score``) carries its own tensor names,
tens of KiB of strings no runtime needs. The ops, shapes, types, quantization parameters and
signatures are untouched, so the model computes exactly the same scores.
"""

from __future__ import annotations

import hashlib
import logging

import flatbuffers
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


def compact_tflite(blob: bytes) -> tuple[bytes, dict]:
    """Return the compacted model and what was saved (``shared_buffers``, ``bytes_before/after``)."""
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
    aligned = []
    for index, buffer in enumerate(model.buffers):
        new = _AlignedBuffer()
        new.data = None if index in alias else buffer.data
        new.offset, new.size = buffer.offset, buffer.size
        aligned.append(new)
    model.buffers = aligned
    builder = flatbuffers.Builder(len(blob) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=_IDENTIFIER)
    out = bytes(builder.Output())
    notes = {"shared_buffers": len(alias), "bytes_before": len(blob), "bytes_after": len(out)}
    _LOGGER.info("compacted .tflite: %d -> %d bytes (%d duplicate buffers shared)", len(blob), len(out), len(alias))
    return out, notes
