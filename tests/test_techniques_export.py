"""Compressed models export to plain TFLite builtins, load in ai-edge-litert and return K ids."""

from __future__ import annotations

import json

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from compression.export import export_artifact
from compression.techniques import (
    ActivationPruning,
    CPDecomposition,
    QuantizationAwareTraining,
    Recipe,
    TruncatedSVD,
)


def _recommend(path, histories):
    runner = Interpreter(model_path=str(path)).get_signature_runner("recommend")
    return [runner(history=h[None, :].astype(np.int32)) for h in histories]


def test_low_rank_model_exports_to_builtins_and_matches_keras(tiny, tmp_path):
    model, dataset = tiny
    svd = TruncatedSVD(rules={"hidden": {"rank": 8}, "logits": {"rank": 8}}, epochs=0.2)
    result = Recipe([CPDecomposition(rank=8, epochs=0.2), svd]).apply(model, dataset)
    out = export_artifact(result.model, dataset, tmp_path / "lowrank", model_id="t-lowrank", k=10,
                          techniques=result.techniques, check_compat=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["techniques"] == ["cp", "svd"]
    assert not [op for op, _ in metrics["ops"] if op.startswith("CUSTOM") or op == "FLEX"], metrics["ops"]
    histories, _ = dataset.eval_histories("test")
    outputs = _recommend(out / "model.tflite", histories[:8])
    keras_logits = result.model(histories[:8]).numpy()
    for row, logits in zip(outputs, keras_logits, strict=True):
        ids = row["item_ids"][0]
        assert ids.shape == (10,) and ids.min() >= 1 and ids.max() <= dataset.num_items
        np.testing.assert_allclose(row["scores"][0], logits[ids], rtol=1e-4, atol=1e-4)
        assert set(ids) == set(np.argsort(-logits[1:])[:10] + 1)


def test_qat_model_exports_int8_smaller_and_returns_k_ids(tiny, tmp_path):
    model, dataset = tiny
    result = QuantizationAwareTraining(epochs=0.2, export_mode="int8").apply(model, dataset)
    out = export_artifact(result.model, dataset, tmp_path / "qat", model_id="t-qat", k=20,
                          quantization=result.quantization, techniques=result.techniques, check_compat=False)
    float_out = export_artifact(model, dataset, tmp_path / "float", model_id="t-float", k=20,
                                check_compat=False)
    size = (out / "model.tflite").stat().st_size
    assert size < (float_out / "model.tflite").stat().st_size / 3
    histories, _ = dataset.eval_histories("test")
    for row in _recommend(out / "model.tflite", histories[:4]):
        ids = row["item_ids"][0]
        assert ids.shape == (20,) and len(set(ids)) == 20 and ids.min() >= 1


def test_structured_pruning_shrinks_the_exported_file(tiny, tmp_path):
    model, dataset = tiny
    technique = ActivationPruning(keep={"item_embedding": 0.5, "projection": 0.5}, epochs=0.1)
    pruned = technique.apply(model, dataset).model
    small = export_artifact(pruned, dataset, tmp_path / "pruned", model_id="t-pruned", check_compat=False)
    full = export_artifact(model, dataset, tmp_path / "full", model_id="t-full", check_compat=False)
    small_bytes = json.loads((small / "metrics.json").read_text())["tflite_bytes"]
    full_bytes = json.loads((full / "metrics.json").read_text())["tflite_bytes"]
    # embedding and logits (both V x 16) dominate; halving their width nearly halves the file
    assert small_bytes < 0.6 * full_bytes
