"""Quantization techniques: the linear quantizer's error bound, power-of-two levels, clustering, QAT."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from compression.techniques import (
    LinearQuantization,
    LogQuantization,
    QuantizationAwareTraining,
    TechniqueError,
    WeightClustering,
)
from compression.techniques.cluster import distinct_values
from compression.techniques.quant_linear import linear_dequantize, linear_quantize
from compression.techniques.quant_log import log2_quantize


def _half_step_bound(x: np.ndarray, q) -> np.ndarray:
    step = q.step
    return step / 2 + 1e-9 * np.maximum(1.0, np.abs(x).max())


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
                    elements=st.floats(-1e3, 1e3, allow_nan=False, width=32)),
       bits=st.integers(2, 8), per_row=st.booleans())
def test_linear_round_trip_error_is_at_most_half_a_step(x, bits, per_row):
    q = linear_quantize(x, bits, axis=0 if per_row else None)
    assert q.codes.max() <= 2 ** bits - 1
    error = np.abs(linear_dequantize(q) - x)
    assert (error <= _half_step_bound(x, q)).all()


def test_linear_quantizer_per_row_beats_per_tensor_and_hits_range_ends():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)) * np.linspace(0.01, 10, 50)[:, None]  # rows of very different scale
    per_tensor = linear_quantize(x, 4)
    per_row = linear_quantize(x, 4, axis=0)
    assert per_row.x_min.shape == (50, 1)
    err_t = np.abs(linear_dequantize(per_tensor) - x).mean()
    err_r = np.abs(linear_dequantize(per_row) - x).mean()
    assert err_r < err_t / 2
    assert per_row.codes.min() == 0 and per_row.codes.max() == 15
    assert per_tensor.packed_bytes() == 50 * 16 * 4 // 8 + 8


def test_linear_quantizer_constant_tensor_and_bad_bits():
    q = linear_quantize(np.full((3, 3), 2.5), 3)
    np.testing.assert_array_equal(linear_dequantize(q), np.full((3, 3), 2.5))
    with pytest.raises(TechniqueError, match="got 9"):
        linear_quantize(np.ones(3), 9)


def test_quant_linear_technique_simulates_bits(tiny):
    model, dataset = tiny
    result = LinearQuantization(bits=3, granularity="row").apply(model, dataset)
    table = result.model.get_layer("item_embedding").get_weights()[0]
    assert max(len(np.unique(row)) for row in table) <= 8
    original = model.get_layer("item_embedding").get_weights()[0]
    assert not np.array_equal(table, original)
    notes = result.notes["layers"]["item_embedding"]
    rows = table.shape[0]
    assert notes["packed_bytes"] == rows * 16 * 3 // 8 + rows * 8  # 3-bit codes + a float32 min/max per row
    assert notes["packed_bytes"] < notes["float32_bytes"] / 4


def test_log2_quantize_gives_signed_powers_of_two():
    x = np.array([0.9, -0.3, 0.13, 0.0, -0.0009, 0.049])
    values, e_max = log2_quantize(x, bits=3)  # 3 exponents: 2^0, 2^-1, 2^-2
    assert e_max == 0
    np.testing.assert_array_equal(values, [1.0, -0.25, 0.25, 0.0, 0.0, 0.0])
    nonzero = values[values != 0]
    np.testing.assert_array_equal(np.log2(np.abs(nonzero)), np.round(np.log2(np.abs(nonzero))))


def test_quant_log_technique_limits_distinct_values(tiny):
    model, dataset = tiny
    result = LogQuantization(bits=4).apply(model, dataset)
    for name in ("item_embedding", "hidden", "logits"):
        # 7 exponents x 2 signs + zero
        assert distinct_values(result.model, name) <= 15
        assert result.notes["layers"][name]["relative_error"] < 0.5


def test_clustering_leaves_at_most_k_distinct_values(tiny):
    model, dataset = tiny
    result = WeightClustering(clusters=6, epochs=0.3).apply(model, dataset)
    for name in ("item_embedding", "hidden", "projection", "logits"):
        assert distinct_values(result.model, name) <= 6
        assert result.notes["distinct"][name] <= 6
    assert distinct_values(model, "hidden") > 100, "the input model must not be mutated"


def test_qat_wraps_dense_layers_only_and_trains(tiny):
    model, dataset = tiny
    result = QuantizationAwareTraining(epochs=0.3).apply(model, dataset)
    assert result.terminal and result.quantization == "int8"
    names = {la.name for la in result.model.layers}
    assert {"quant_hidden", "quant_projection", "quant_logits"} <= names
    assert "item_embedding" in names, "tfmot cannot quantize Embedding: it stays unwrapped"
    histories, _ = dataset.eval_histories("test")
    logits = result.model(histories[:4]).numpy()
    reference = model(histories[:4]).numpy()
    assert np.isfinite(logits).all()
    # fake quantization + short fine-tuning keep the ranking close to the float model
    assert np.mean(np.argmax(logits, 1) == np.argmax(reference, 1)) >= 0.5
