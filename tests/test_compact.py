"""The exported graph's fixed part: what `compact_tflite` and the transition heads keep small.

A small SASRec over the FULL real catalogue (3,659 items, so every [V+1] tensor is large
enough for the converter's weight quantization, as in production) with a non-zero item bias:

- both signatures run from one subgraph, with the same names, inputs and outputs, and
  return bit-identical outputs to the two-subgraph model;
- the item bias is stored int8 and the catalogue index is made at run time (no [V+1]
  float32/int32 constant), while the scores stay within int8 tolerance of Keras;
- two signatures that compute different things keep their own subgraphs.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from compression.compact import compact_tflite
from compression.data import DERIVED_DIR, load_dataset
from compression.export import convert
from compression.seqmodel import Architecture, build_model

ARCH = Architecture(kind="sasrec", dim=8, blocks=1, heads=2, fpmc_dim=4, dropout=0.0)
WINDOW = 8
K = 10


@pytest.fixture(scope="module")
def exported():
    import tf_keras as keras

    dataset = load_dataset(str(DERIVED_DIR))
    keras.utils.set_random_seed(11)
    model = build_model(dataset.num_items, ARCH, WINDOW)
    heads = model.get_layer("transitions")
    rng = np.random.default_rng(3)
    heads.item_bias.assign(rng.normal(0.0, 1.0, size=heads.item_bias.shape).astype(np.float32))
    # the layer's initializer draws the same values for both FPMC factors; shared buffers would hide them
    heads.next_factors.assign(rng.normal(0.0, 0.3, size=heads.next_factors.shape).astype(np.float32))
    raw = convert(model, dataset, k=K, quantization="dynamic-tensor", compact=False)
    histories = dataset.eval_histories("test", WINDOW)[0][:12]
    return model, dataset, raw, histories


def _parse(blob: bytes) -> schema.ModelT:
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(blob, 0))


def _run_all(blob: bytes, histories: np.ndarray) -> dict[str, list[dict[str, np.ndarray]]]:
    interpreter = Interpreter(model_content=blob)
    runs: dict[str, list[dict[str, np.ndarray]]] = {}
    for key in sorted(interpreter.get_signature_list()):
        runner = interpreter.get_signature_runner(key)
        runs[key] = [{n: np.array(v) for n, v in runner(history=h[None, :].astype(np.int32)).items()}
                     for h in histories]
    return runs


def test_both_signatures_share_one_subgraph_and_return_identical_outputs(exported) -> None:
    _, _, raw, histories = exported
    two, two_notes = compact_tflite(raw, merge_signatures=False)
    one, one_notes = compact_tflite(raw)
    assert len(_parse(raw).subgraphs) == 2 and len(_parse(two).subgraphs) == 2
    assert len(_parse(one).subgraphs) == 1 and one_notes["merged_signatures"] is True
    assert two_notes["merged_signatures"] is False
    assert len(one) < len(two) < len(raw)
    lists = [Interpreter(model_content=b).get_signature_list() for b in (two, one)]
    assert lists[0] == lists[1] and sorted(lists[1]) == ["recommend", "score"]
    assert lists[1]["recommend"] == {"inputs": ["history"], "outputs": ["item_ids", "scores"]}
    assert lists[1]["score"] == {"inputs": ["history"], "outputs": ["scores"]}
    a, b = _run_all(two, histories), _run_all(one, histories)
    for key in a:
        for left, right in zip(a[key], b[key], strict=True):
            assert left.keys() == right.keys()
            for name in left:
                np.testing.assert_array_equal(left[name], right[name])
    # the shared subgraph's recommend is still the top-K of its own full scores
    for rec, full in zip(b["recommend"], b["score"], strict=True):
        ids = rec["item_ids"][0]
        assert 0 not in ids
        np.testing.assert_array_equal(rec["scores"][0], full["scores"][0][ids])
        assert rec["scores"][0][-1] >= np.sort(full["scores"][0][1:])[-K]


def test_item_bias_is_int8_and_the_catalogue_index_is_not_a_constant(exported) -> None:
    model, dataset, raw, histories = exported
    blob, _ = compact_tflite(raw)
    parsed = _parse(blob)
    rows = dataset.num_items + 1
    assert rows >= 1024  # the converter leaves smaller weights in float
    big = [(schema_type, [int(d) for d in t.shape]) for sg in parsed.subgraphs for t in sg.tensors
           for schema_type in [t.type] if parsed.buffers[t.buffer].data is not None
           and len(parsed.buffers[t.buffer].data) >= rows]
    per_item = [(tp, shape) for tp, shape in big if int(np.prod(shape)) == rows]
    assert per_item == [(schema.TensorType.INT8, [rows])], per_item  # the bias; no float/int32 [V+1] left
    ops = {max(c.builtinCode, c.deprecatedBuiltinCode) for c in parsed.operatorCodes}
    assert schema.BuiltinOperator.RANGE in ops
    interpreter = Interpreter(model_content=blob)
    runner = interpreter.get_signature_runner("score")
    for history in histories:
        got = runner(history=history[None, :].astype(np.int32))["scores"][0]
        want = model(history[None, :]).numpy()[0]
        np.testing.assert_allclose(got[1:], want[1:], atol=0.05)  # int8 steps of a N(0, 1) bias: ~0.03


def test_signatures_that_compute_different_things_keep_their_subgraphs() -> None:
    class Two(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
        def double(self, x):
            return {"y": x * 2.0}

        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])
        def shift(self, x):
            return {"y": x + 1.0}

    module = Two()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.double.get_concrete_function(), module.shift.get_concrete_function()], module)
    raw = converter.convert()
    out, notes = compact_tflite(raw)
    assert notes["merged_signatures"] is False and len(_parse(out).subgraphs) == 2
    interpreter = Interpreter(model_content=out)
    x = np.arange(4, dtype=np.float32)[None, :]
    results = {key: interpreter.get_signature_runner(key)(x=x)["y"] for key in interpreter.get_signature_list()}
    assert len(results) == 2
    assert sorted(tuple(v[0].tolist()) for v in results.values()) == [(0.0, 2.0, 4.0, 6.0), (1.0, 2.0, 3.0, 4.0)]


def _int8_grid_copy(blob: bytes, int4_blob: bytes) -> bytes:
    """``blob`` with every table the int4 model packed replaced by the same int4 values on the int8 grid."""
    from compression.compact import pack_model
    from compression.int4 import unpack_nibbles

    int4 = _parse(int4_blob)
    model = _parse(blob)
    for sg8, sg4 in zip(model.subgraphs, int4.subgraphs, strict=True):
        for t8, t4 in zip(sg8.tensors, sg4.tensors, strict=True):
            if t4.type != schema.TensorType.INT4:
                continue
            t8.quantization.scale = list(t4.quantization.scale)  # also the rows a GATHER of the table yields
            if int4.buffers[t4.buffer].data is None:
                continue
            values = unpack_nibbles(int4.buffers[t4.buffer].data, int(np.prod(t4.shape)))
            model.buffers[t8.buffer].data = np.frombuffer(values.tobytes(), dtype=np.uint8)
            t8.quantization.scale = list(t4.quantization.scale)
    return pack_model(model, len(blob))


def test_int4_tables_are_fc_only_half_size_and_run_exactly_as_their_values(exported) -> None:
    from compression.int4 import Int4Error, int4_tables

    _, dataset, raw, histories = exported
    blob, _ = compact_tflite(raw)
    small, notes = int4_tables(blob, min_elements=1024, gather=False)
    rows = dataset.num_items + 1
    # both FPMC tables ("last" read through an indicator x table FC); not the tied item table,
    # which a GATHER reads for the history
    assert notes["tables"] == [[ARCH.fpmc_dim, rows], [rows, ARCH.fpmc_dim]]
    assert len(blob) - len(small) >= rows * ARCH.fpmc_dim - 64
    parsed = _parse(small)
    int4 = [t for t in parsed.subgraphs[0].tensors if t.type == schema.TensorType.INT4]
    assert len(int4) == 2
    assert all(len(parsed.buffers[t.buffer].data) == rows * ARCH.fpmc_dim // 2 for t in int4)
    a, b = _run_all(small, histories), _run_all(_int8_grid_copy(blob, small), histories)
    for key in a:
        for left, right in zip(a[key], b[key], strict=True):
            for name in left:
                np.testing.assert_array_equal(left[name], right[name])
    with pytest.raises(Int4Error, match="no int8 weight of >= "):
        int4_tables(blob)  # the test model's tables are all below the default size


def test_int4_tied_table_read_by_gather_and_fc_runs_exactly_as_its_values(exported) -> None:
    """gather=True also packs the tied item table (history lookups GATHER it, scores read it through a
    FULLY_CONNECTED): one int4 copy, and both signatures return what its int4 values on the int8 grid give."""
    from compression.int4 import int4_tables

    _, dataset, raw, histories = exported
    blob, _ = compact_tflite(raw)
    fc_only, _ = int4_tables(blob, min_elements=4096, gather=False)
    small, notes = int4_tables(blob, min_elements=4096, gather=True)  # the [V+1] item bias stays int8
    rows = dataset.num_items + 1
    _, lowered_notes = int4_tables(blob, min_elements=2048, gather=True)
    assert [rows] not in lowered_notes["tables"]  # even above the size floor: a 1-D table is never packed
    assert [rows, ARCH.dim] in notes["tables"] and len(notes["tables"]) == 3
    assert len(fc_only) - len(small) >= rows * ARCH.dim // 2 - 64
    parsed = _parse(small)
    gathers = [op for op in parsed.subgraphs[0].operators
               if parsed.operatorCodes[op.opcodeIndex].builtinCode == schema.BuiltinOperator.GATHER
               and parsed.subgraphs[0].tensors[op.inputs[0]].type == schema.TensorType.INT4]
    assert len(gathers) == 1
    rows_out = parsed.subgraphs[0].tensors[gathers[0].outputs[0]]
    assert rows_out.type == schema.TensorType.INT4
    a, b = _run_all(small, histories), _run_all(_int8_grid_copy(blob, small), histories)
    for key in a:
        for left, right in zip(a[key], b[key], strict=True):
            for name in left:
                np.testing.assert_array_equal(left[name], right[name])
    # and int4 changed the scores (the comparison above is not between two int8 models)
    c = _run_all(blob, histories)
    assert any(not np.array_equal(x["scores"], y["scores"]) for x, y in zip(a["score"], c["score"], strict=True))


def _gather_model(table: np.ndarray) -> bytes:
    """A 2-op model (GATHER of a constant table, DEQUANTIZE) as the project's dynamic-tensor export writes it."""
    class Lookup(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = tf.Variable(table)

        @tf.function(input_signature=[tf.TensorSpec([1, 5], tf.int32, name="ids")])
        def rows(self, ids):
            return {"rows": tf.gather(self.table, ids)}

    module = Lookup()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.rows.get_concrete_function()], module)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter._experimental_disable_per_channel = True
    return converter.convert()


def _lookup(blob: bytes, ids: np.ndarray) -> np.ndarray:
    runner = Interpreter(model_content=blob).get_signature_runner()
    return runner(ids=ids)["rows"]


@pytest.mark.parametrize("shape", [(600, 6), (600, 5), (601, 7), (3001,)], ids=["even", "odd", "odd-rows", "1-d"])
def test_int4_gather_only_for_rows_of_an_even_width(shape) -> None:
    """LiteRT's INT4 GATHER returned wrong values for odd rows and 1-D tables: those stay int8 (no int4 table is
    left to make: a clear error), even rows are packed and looked up exactly as their int4 values."""
    from compression.int4 import Int4Error, int4_tables

    table = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    blob = _gather_model(table)
    ids = np.array([[0, 1, 2, 299, 42]], dtype=np.int32)
    if len(shape) == 1 or shape[1] % 2:
        with pytest.raises(Int4Error, match="no int8 weight"):
            int4_tables(blob, min_elements=1024, gather=True)
        return
    small, notes = int4_tables(blob, min_elements=1024, gather=True)
    assert notes["tables"] == [list(shape)] and len(small) < len(blob) - table.size // 2 + 256
    np.testing.assert_array_equal(_lookup(small, ids), _lookup(_int8_grid_copy(blob, small), ids))
    assert not np.array_equal(_lookup(small, ids), _lookup(blob, ids))
    with pytest.raises(Int4Error):
        int4_tables(blob, min_elements=1024, gather=False)  # a GATHER reads it: FULLY_CONNECTED-only mode refuses
