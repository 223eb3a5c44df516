"""Reference training, TFLite export, host evaluation, runtime checks and the CLI, on tiny slices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compression.cli import main as cli_main
from compression.data import DERIVED_DIR, Dataset, load_dataset
from compression.export import ExportError, export_artifact
from compression.model import build_reference
from compression.runtimes import check_runtimes, classify_error
from compression.tflite_eval import evaluate_tflite, recommend_tflite, tflite_ops
from compression.train import TrainConfig, evaluate_keras, train_reference

TINY = TrainConfig(epochs=2, batch_size=128, lr=5e-3, dim=16, hidden=32, window=8, seed=3, max_customers=150)
K = 10


@pytest.fixture(scope="module")
def tiny_data() -> Dataset:
    return load_dataset(str(DERIVED_DIR), max_customers=TINY.max_customers)


@pytest.fixture(scope="module")
def trained(tiny_data: Dataset):
    return train_reference(tiny_data, TINY, progress=False)


@pytest.fixture(scope="module")
def float_artifact(trained, tiny_data: Dataset, tmp_path_factory) -> Path:
    model, history = trained
    return export_artifact(model, tiny_data, tmp_path_factory.mktemp("float"), model_id="tiny-float", k=K,
                           training=TINY.to_dict(), reference=evaluate_keras(model, tiny_data),
                           check_compat=False)


def test_reference_architecture() -> None:
    model = build_reference(3659)
    assert model.count_params() == 816_524  # ~817k, as quality.md measured
    assert [layer.name for layer in model.layers][1:] == ["item_embedding", "flatten", "hidden", "projection",
                                                          "logits"]
    assert model.inputs[0].dtype == "int32" and model.inputs[0].name == "history"
    assert tuple(model.outputs[0].shape) == (None, 3660)
    with pytest.raises(ValueError, match="num_items must be >= 1, got 0"):
        build_reference(0)


def test_training_reports_progress_and_learns(trained, tiny_data: Dataset) -> None:
    model, history = trained
    assert len(history["loss"]) == len(history["val_hr10"]) == TINY.epochs
    assert history["loss"][-1] < history["loss"][0]
    assert history["train_pairs"] == sum(len(s) - 3 for s in tiny_data.sequences)
    assert history["seconds"] > 0
    assert TrainConfig.quick().epochs >= 1 and TrainConfig.full().epochs > TrainConfig.quick().epochs
    with pytest.raises(ValueError, match="TrainConfig.lr must be > 0, got 0"):
        TrainConfig(lr=0)


def test_exported_float_model_matches_keras(float_artifact: Path, trained, tiny_data: Dataset) -> None:
    model, _ = trained
    keras_figures = evaluate_keras(model, tiny_data, "test")
    histories, targets = tiny_data.eval_histories("test", TINY.window)
    tflite_figures = evaluate_tflite(float_artifact / "model.tflite", histories, targets)
    for key in ("hr10", "ndcg10", "mrr"):
        assert tflite_figures[key] == pytest.approx(keras_figures[key], abs=1e-4), key
    # recommend = Keras's own top-K with index 0 excluded
    golden = json.loads((float_artifact / "golden.json").read_text())
    logits = model.predict(np.array(golden["histories"], dtype=np.int32), verbose=0)
    logits[:, 0] = -np.inf
    expected = np.argsort(-logits, axis=1, kind="stable")[:, :K]
    assert np.array_equal(np.array(golden["item_ids"]), expected)
    assert np.allclose(golden["scores"], np.take_along_axis(logits, expected, axis=1), atol=1e-4)


def test_artifact_files_follow_the_design(float_artifact: Path, tiny_data: Dataset) -> None:
    metrics = json.loads((float_artifact / "metrics.json").read_text())
    items = json.loads((float_artifact / "items.json").read_text())
    golden = json.loads((float_artifact / "golden.json").read_text())
    assert items["items"][0] == ["", "<padding>"] and len(items["items"]) == tiny_data.num_items + 1
    assert items["popular"] == tiny_data.popular(100) and 0 not in items["popular"]
    assert (golden["window"], golden["k"], len(golden["histories"])) == (TINY.window, K, 64)
    assert all(len(h) == TINY.window for h in golden["histories"])
    assert np.array(golden["item_ids"]).min() >= 1
    assert metrics["tflite_bytes"] == (float_artifact / "model.tflite").stat().st_size
    assert 0 < metrics["gzip_bytes"] < metrics["tflite_bytes"]
    assert metrics["num_items"] == tiny_data.num_items and metrics["window"] == TINY.window
    assert set(metrics["baselines"]) == {"popularity", "itemknn", "itemknn_tuned", "sknn"}
    assert metrics["reference"]["hr10"] == pytest.approx(metrics["hr10"], abs=1e-4)
    assert metrics["split"]["protocol"] == "leave-last-out" and metrics["training"]["dim"] == TINY.dim
    assert ["FULLY_CONNECTED", 1] in metrics["ops"] and any(op[0] == "TOPK_V2" for op in metrics["ops"])


@pytest.mark.slow
def test_int8_export_loads_and_never_recommends_padding(trained, tiny_data: Dataset, tmp_path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    model, _ = trained
    out = export_artifact(model, tiny_data, tmp_path, model_id="tiny-int8", k=K, quantization="int8",
                          representative_n=64, check_compat=False)
    runner = Interpreter(model_path=str(out / "model.tflite")).get_signature_runner("recommend")
    assert runner.get_input_details()["history"]["dtype"] == np.int32
    assert runner.get_output_details()["scores"]["dtype"] == np.float32
    # the emptiest history (all padding) is where a padding id would surface first
    histories = np.vstack([np.zeros((1, TINY.window), np.int32),
                           tiny_data.eval_histories("test", TINY.window)[0][:20]])
    ids, scores = recommend_tflite(out / "model.tflite", histories)
    assert ids.shape == (21, K) and scores.shape == (21, K)
    assert ids.min() >= 1 and ids.max() <= tiny_data.num_items
    assert all(len(set(row)) == K for row in ids.tolist())
    assert (np.diff(scores, axis=1) <= 0).all()
    assert any(op[0] == "GATHER" for op in tflite_ops(out / "model.tflite"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tflite_bytes"] < 0.6 * (tiny_data.num_items + 1) * TINY.dim * 4 + 200_000


def test_export_rejects_wrong_arguments(trained, tiny_data: Dataset, tmp_path) -> None:
    model, _ = trained
    with pytest.raises(ExportError, match="quantization must be one of"):
        export_artifact(model, tiny_data, tmp_path, model_id="x", quantization="int4")
    other = load_dataset(str(DERIVED_DIR), max_customers=20)
    with pytest.raises(ExportError, match=f"has {tiny_data.num_items + 1} logits but the dataset has "
                                          f"{other.num_items} items"):
        export_artifact(model, other, tmp_path, model_id="x")


def test_error_classification() -> None:
    assert classify_error(None) is None
    assert classify_error("ValueError: Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'") \
        == "op_version"
    assert classify_error("ValueError: Could not open 'x.tflite'") == "load_error"


@pytest.mark.legacy
@pytest.mark.slow
def test_tflite_runtime_214_rejects_dynamic_range_with_op_version(trained, tiny_data: Dataset,
                                                                  float_artifact: Path, tmp_path) -> None:
    model, _ = trained
    dynamic = export_artifact(model, tiny_data, tmp_path, model_id="tiny-dyn", k=K, quantization="dynamic",
                              check_compat=True)
    verdict = json.loads((dynamic / "metrics.json").read_text())["runtimes"]
    litert = next(v for name, v in verdict.items() if name.startswith("ai-edge-litert=="))
    assert litert == {"loads": True, "error": None, "error_kind": None}
    legacy = verdict["tflite-runtime==2.14.0"]
    assert legacy["loads"] is False and legacy["error_kind"] == "op_version"
    assert "FULLY_CONNECTED" in legacy["error"]
    floats = check_runtimes(float_artifact / "model.tflite")
    assert all(v["loads"] is True for v in floats.values()), floats


def test_cli_train_export_evaluate(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    data = ["--data", str(DERIVED_DIR), "--max-customers", "60"]
    assert cli_main(["train", "--quick", *data, "--epochs", "1", "--out", str(run), "--no-progress",
                     "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["params"] > 0 and (run / "reference.keras").is_file()
    assert cli_main(["export", str(run), "--quantization", "float16", "--no-compat"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["model_id"] == "reference-float16" and exported["runtimes"] == {}
    artifact = run / "artifact-float16"
    assert cli_main(["evaluate", str(artifact), *data, "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["rows"]["tflite (now)"]["hr10"] == pytest.approx(exported["hr10"], abs=1e-9)
    assert cli_main(["evaluate", str(artifact), "--data", str(DERIVED_DIR), "--max-customers", "30"]) == 2
    assert "differ from the dataset" in capsys.readouterr().err
