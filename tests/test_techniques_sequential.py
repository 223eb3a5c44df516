"""Every weight-editing technique applies to the SASRec reference itself, not only to the MLP.

A tiny SASRec (dim 8, one block) is trained once on 150 real customers; each technique must
return a new sequential model with the property it promises (sparsity, masked units, ranks,
codebooks, an int8 grid) and leave its input untouched. The factorised tables must score
exactly like the dense table they represent, and export to TFLite builtins matching Keras.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from compression.data import DERIVED_DIR, load_dataset
from compression.export import export_artifact
from compression.seqmodel import Architecture, architecture_of, build_model, cp_grid
from compression.techniques import (
    ActivationPruning,
    BlockPruning,
    CPDecomposition,
    FeatureDistillation,
    GradientPruning,
    LinearQuantization,
    LogQuantization,
    MagnitudePruning,
    QuantizationAwareTraining,
    StudentShape,
    TruncatedSVD,
    WeightClustering,
)
from compression.techniques.common import fine_tune
from compression.techniques.sequential import is_sequential, matrices

ARCH = Architecture(kind="sasrec", dim=8, blocks=1, heads=2, fpmc_dim=4, dropout=0.0)
WINDOW = 8
FAST = {"epochs": 0.2, "max_pairs": 600}


@pytest.fixture(scope="module")
def sasrec():
    import tf_keras as keras

    dataset = load_dataset(str(DERIVED_DIR), max_customers=150)
    keras.utils.set_random_seed(5)
    model = build_model(dataset.num_items, ARCH, WINDOW)
    fine_tune(model, dataset, epochs=0.5, learning_rate=5e-3)
    return model, dataset


def _histories(dataset, n=16):
    return dataset.eval_histories("test", WINDOW)[0][:n]


@pytest.mark.parametrize("storage", [{"item_rank": 3}, {"item_cp": 3}])
def test_factorised_item_tables_score_like_the_dense_table_they_stand_for(storage) -> None:
    """rank/CP storage: lookups and all-item logits equal a dense model holding table() as its table."""
    factored = build_model(40, ARCH.replace(**storage), WINDOW)
    dense = build_model(40, ARCH, WINDOW)
    for layer in dense.layers:
        if layer.name != "item_embedding" and layer.weights:
            layer.set_weights(factored.get_layer(layer.name).get_weights())
    table = factored.get_layer("item_embedding").table().numpy()
    assert table.shape == (41, 8)
    dense.get_layer("item_embedding").set_weights([table])
    histories = np.array([[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 3, 40, 5, 6, 1], [1, 2, 3, 4, 5, 6, 7, 8]],
                         dtype=np.int32)
    np.testing.assert_allclose(factored(histories).numpy(), dense(histories).numpy(), rtol=1e-4, atol=1e-5)
    assert architecture_of(factored) == ARCH.replace(**storage)
    assert factored.count_params() < dense.count_params()
    if "item_cp" in storage:
        assert cp_grid(41) == (7, 6)


def _property(name, result, model):
    new = result.model
    if name in ("prune-magnitude", "prune-magnitude-oneshot"):
        zeros = sum(int((v.numpy() == 0).sum()) for v in matrices(new).values())
        total = sum(int(v.shape[0] * v.shape[1]) for v in matrices(new).values())
        assert zeros / total >= 0.5 - 0.02 and result.notes["sparsity"] >= 0.48
    elif name in ("prune-activation", "prune-gradient"):
        block = new.get_layer("block0")
        dead = np.all(block.ffn_in.kernel.numpy() == 0, axis=0) & np.all(block.ffn_out.kernel.numpy() == 0, axis=1)
        assert int(dead.sum()) == 4 and result.notes["kept_units"] == {"block0": 4}
    elif name in ("svd", "svd-distilled"):
        arch = architecture_of(new)
        assert (arch.item_rank, arch.fpmc_dim) == (4, 2) and new.count_params() < model.count_params()
    elif name == "cp":
        assert architecture_of(new).item_cp == 3 and result.notes["params_after"] < result.notes["params_before"] / 2
    elif name == "quant-linear":
        table = new.get_layer("item_embedding").embeddings.numpy()
        assert max(len(np.unique(row)) for row in table) <= 16 and result.notes["simulated"]
    elif name == "quant-log":
        assert all(len(np.unique(v.numpy())) <= 15 for v in matrices(new).values())
    elif name == "cluster":
        assert all(len(np.unique(v.numpy())) <= 4 for v in matrices(new).values())
    elif name == "qat":
        kernel = new.get_layer("block0").query.kernel.numpy()
        scale = np.abs(kernel).max(axis=0) / 127.0
        np.testing.assert_allclose(kernel / scale, np.round(kernel / scale), atol=1e-3)
        assert result.quantization == "dynamic-tensor"
    elif name == "distill-feature":
        assert new.count_params() < model.count_params() and result.notes["layer"] == "last_step"


TECHNIQUES = {
    "prune-magnitude": MagnitudePruning(target=0.5, method="tfmot", **FAST),
    "prune-magnitude-oneshot": MagnitudePruning(target=0.5, method="oneshot"),
    "prune-activation": ActivationPruning(calibration=256, ffn_keep=0.5, **FAST),
    "prune-gradient": GradientPruning(calibration=256, ffn_keep=0.5, **FAST),
    "svd": TruncatedSVD(rules={"item_embedding": {"rank": 4}, "transitions": {"rank": 2}}, **FAST),
    "svd-distilled": TruncatedSVD(rules={"item_embedding": {"rank": 4}, "transitions": {"rank": 2}}, distill=True,
                                  **FAST),
    "cp": CPDecomposition(rank=3, **FAST),
    "quant-linear": LinearQuantization(bits=4, granularity="row"),
    "quant-log": LogQuantization(bits=4),
    "cluster": WeightClustering(clusters=4, **FAST),
    "qat": QuantizationAwareTraining(export_mode="int8", **FAST),
    "distill-feature": FeatureDistillation(student=StudentShape(4, 8, fpmc_dim=2), epochs=0.2, max_pairs=600),
}


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_technique_applies_to_sasrec_with_its_property_and_leaves_the_input_alone(sasrec, name) -> None:
    model, dataset = sasrec
    before = [w.copy() for w in model.get_weights()]
    result = TECHNIQUES[name].apply(model, dataset)
    assert is_sequential(result.model) and architecture_of(result.model).kind == "sasrec"
    scores = result.model(_histories(dataset)).numpy()
    assert scores.shape == (16, dataset.num_items + 1) and np.isfinite(scores).all()
    _property(name, result, model)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_structured_pruning_rejects_a_model_without_attention_blocks(sasrec) -> None:
    _, dataset = sasrec
    fpmc = build_model(dataset.num_items, Architecture(kind="fpmc", fpmc_dim=4), WINDOW)
    with pytest.raises(Exception, match="no attention block"):
        GradientPruning(calibration=64, epochs=0.0).apply(fpmc, dataset)


@pytest.mark.parametrize("technique", [TECHNIQUES["svd"], TECHNIQUES["cp"]], ids=["svd", "cp"])
def test_factorised_sasrec_exports_to_builtins_and_matches_keras(sasrec, technique, tmp_path) -> None:
    model, dataset = sasrec
    factored = technique.apply(model, dataset).model
    out = export_artifact(factored, dataset, tmp_path / technique.name, model_id=f"t-{technique.name}", k=10,
                          techniques=[technique.name], check_compat=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert not [op for op, _ in metrics["ops"] if op.startswith("CUSTOM") or op == "FLEX"], metrics["ops"]
    runner = Interpreter(model_path=str(out / "model.tflite")).get_signature_runner("recommend")
    histories = _histories(dataset, 6)
    logits = factored(histories).numpy()
    for history, row_logits in zip(histories, logits, strict=True):
        row = runner(history=history[None, :].astype(np.int32))
        ids = row["item_ids"][0]
        np.testing.assert_allclose(row["scores"][0], row_logits[ids], rtol=1e-4, atol=1e-4)


def test_compaction_is_lossless_and_the_tied_table_is_stored_once(sasrec) -> None:
    """dynamic-tensor export: one int8 copy of the [V+1, d] table; compaction changes no score."""
    from ai_edge_litert import schema_py_generated as schema

    from compression.compact import compact_tflite
    from compression.export import convert

    model, dataset = sasrec
    blob = convert(model, dataset, k=10, quantization="dynamic-tensor")
    parsed = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(blob, 0))
    tables = {t.buffer for sg in parsed.subgraphs for t in sg.tensors
              if [int(d) for d in t.shape] == [dataset.num_items + 1, ARCH.dim]}
    assert len(tables) == 1 and all(t.name is None for t in parsed.subgraphs[0].tensors)
    # compacting a plain converter output again: no names left to drop, nothing changes
    again, notes = compact_tflite(blob)
    assert notes["bytes_after"] <= len(blob) and notes["shared_buffers"] == 0
    histories = _histories(dataset, 5)
    runners = [Interpreter(model_content=b).get_signature_runner("score") for b in (blob, again)]
    for history in histories:
        a, b = (r(history=history[None, :].astype(np.int32))["scores"] for r in runners)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a[0], model(history[None, :]).numpy()[0], atol=0.05)


def test_int4_qat_trains_on_the_export_grid_so_the_export_adds_no_weight_error(sasrec) -> None:
    """QAT for "dynamic-int4-all": the int4 tables the exported file holds are exactly the trained Keras weights
    (same matrices, values within float rounding), and its scores sit closer to Keras than a plain int4 export
    of the same model does (only the activations' run-time quantization is left)."""
    from ai_edge_litert import schema_py_generated as schema

    from compression.export import convert
    from compression.int4 import unpack_nibbles

    model, dataset = sasrec
    result = QuantizationAwareTraining(export_mode="dynamic-int4-all", **FAST).apply(model, dataset)
    assert result.quantization == "dynamic-int4-all"
    new, int4 = result.model, set(result.notes["int4_matrices"])
    weights = {name: v.numpy() for name, v in matrices(new).items()}
    assert any(n.startswith("item_embedding") for n in int4) and any(n.startswith("transitions") for n in int4)
    assert not any(n.startswith("block") for n in int4)  # 8 x 8 kernels: below the size int4 is used for
    for name in int4:
        assert len(np.unique(weights[name])) <= 15, name

    blob = convert(new, dataset, k=10, quantization="dynamic-int4-all")
    parsed = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(blob, 0))
    stored = []
    for tensor in parsed.subgraphs[0].tensors:
        data = parsed.buffers[tensor.buffer].data
        if tensor.type != schema.TensorType.INT4 or data is None:
            continue
        values = unpack_nibbles(data, int(np.prod(tensor.shape))) * float(tensor.quantization.scale[0])
        stored.append(values.reshape([int(d) for d in tensor.shape]))
    assert len(stored) == len(int4)  # what QAT trained as int4 is what the export packed, no more, no less
    for values in stored:
        matches = [name for name in int4 for w in (weights[name], weights[name].T)
                   if w.shape == values.shape and np.allclose(w, values, rtol=1e-5, atol=1e-7)]
        assert matches, f"an int4 table {values.shape} of the file matches no trained weight"

    def export_error(keras_model, exported: bytes) -> float:
        runner = Interpreter(model_content=exported).get_signature_runner("score")
        return max(float(np.abs(runner(history=h[None, :].astype(np.int32))["scores"][0]
                                - keras_model(h[None, :]).numpy()[0]).max()) for h in _histories(dataset, 8))

    plain = convert(model, dataset, k=10, quantization="dynamic-int4-all")
    trained_on_grid, untrained = export_error(new, blob), export_error(model, plain)
    assert trained_on_grid < untrained / 2, (trained_on_grid, untrained)


def test_block_pruning_keeps_the_block_the_loss_needs_and_copies_its_weights(sasrec) -> None:
    """A 2-block SASRec loses one block: the one whose removal raised the calibration loss most stays,
    its weights moved to position 0 before fine-tuning; 1 block is the least it can keep."""
    import tf_keras as keras

    from compression.techniques.base import TechniqueError
    from compression.techniques.prune_blocks import without_blocks

    _, dataset = sasrec
    keras.utils.set_random_seed(8)
    two = build_model(dataset.num_items, ARCH.replace(blocks=2), WINDOW)
    fine_tune(two, dataset, epochs=0.3, learning_rate=5e-3, max_pairs=2000)
    second_only = without_blocks(two, [1])
    assert architecture_of(second_only).blocks == 1
    for a, b in zip(second_only.get_layer("block0").get_weights(), two.get_layer("block1").get_weights(),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(second_only.get_layer("item_embedding").get_weights()[0],
                                  two.get_layer("item_embedding").get_weights()[0])
    histories = _histories(dataset, 4)
    assert not np.allclose(second_only(histories).numpy(), two(histories).numpy())

    from compression.techniques.common import training_arrays
    from compression.techniques.prune_blocks import mean_loss

    # the same calibration pairs the technique draws: each block's cost computed here, independently
    x, y = training_arrays(dataset, WINDOW, max_pairs=256, seed=1)
    costs = {b: mean_loss(without_blocks(two, [1 - b]), x, y) for b in (0, 1)}
    assert costs[0] != costs[1]
    result = BlockPruning(keep=1, epochs=0, calibration=256).apply(two, dataset)  # no fine-tuning: weights as cut
    notes = result.notes
    assert architecture_of(result.model).blocks == 1 and architecture_of(two).blocks == 2
    for b in (0, 1):
        assert notes["loss_without_block"][str(b)] == pytest.approx(costs[b], rel=1e-5)
    kept = max(costs, key=costs.get)  # the block whose removal costs most stays
    assert notes["kept_blocks"] == [kept]
    for a, b in zip(result.model.get_layer("block0").get_weights(), two.get_layer(f"block{kept}").get_weights(),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert notes["params_after"] < notes["params_before"]
    tuned = BlockPruning(keep=1, epochs=0.1, calibration=256, max_pairs=600).apply(two, dataset)
    assert tuned.notes["fine_tune"]["steps"] >= 1 and architecture_of(tuned.model).blocks == 1
    with pytest.raises(TechniqueError, match="keep must be in 1..1"):
        BlockPruning(keep=2).apply(two, dataset)
    with pytest.raises(TechniqueError, match="distinct"):
        without_blocks(two, [1, 1])
    gru = build_model(dataset.num_items, ARCH.replace(kind="gru"), WINDOW)
    with pytest.raises(TechniqueError, match="needs attention blocks"):
        BlockPruning().apply(gru, dataset)
