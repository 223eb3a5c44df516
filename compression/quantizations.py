"""The post-training quantization modes of an export, named once.

A light module: the command line offers them without importing TensorFlow, and
``compression.export`` and the techniques check against the same tuple.

- "none": float32.
- "dynamic": int8 weights with per-channel scales, float activations (TF's default; FULLY_CONNECTED
  v12, which tflite-runtime 2.14 rejects).
- "dynamic-tensor": the same with one scale per tensor.
- "dynamic-int4": dynamic-tensor with the per-item tables only FULLY_CONNECTED reads in int4
  (``compression.int4``; ai-edge-litert 2.3 and tflite-runtime 2.14 both run it).
- "dynamic-int4-all": dynamic-tensor with every int8 weight of >= 4,096 numbers that FULLY_CONNECTED or
  a GATHER (rows of an even width, then DEQUANTIZE) reads in int4 (the tied item table, the FPMC tables,
  the attention kernels): ai-edge-litert only (tflite-runtime 2.14 has no INT4 GATHER).
- "int8": full-integer quantization with a representative dataset.
- "float16": float16 weights.
"""

QUANTIZATIONS = ("none", "dynamic", "dynamic-tensor", "dynamic-int4", "dynamic-int4-all", "int8", "float16")
