"""agent.runtime and agent.model on real exported tiny models (LiteRT), including the failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_agent_support import build_artifacts

from agent import runtime
from agent.model import open_model
from agent.runtime import (
    ModelLoadError,
    OpVersionError,
    Recommender,
    RecommenderClosedError,
    RuntimeInfo,
    detect_runtime,
    load_recommender,
)
from protocol import artifact


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_artifacts(str(tmp_path_factory.getbasetemp() / "agent-artifacts"))


def test_detects_litert_first() -> None:
    info = detect_runtime()
    assert info == RuntimeInfo("ai-edge-litert", "2.3.0")
    assert str(info) == "ai-edge-litert==2.3.0"


@pytest.mark.parametrize("name", ["float", "dynamic"])
def test_recommend_reproduces_the_exported_golden_top_k(artifacts: dict[str, Path], name: str) -> None:
    folder = artifacts[name]
    golden = artifact.read_golden(folder)
    rec = load_recommender(folder / artifact.MODEL_FILE, threads=2)
    assert (rec.window, rec.k) == (golden["window"], golden["k"]) == (10, 10)
    assert rec.runtime.name == "ai-edge-litert" and rec.threads == 2
    for history, expected in list(zip(golden["histories"], golden["item_ids"], strict=True))[:16]:
        ids, scores = rec.recommend(np.asarray(history, dtype=np.int32))
        assert ids.dtype == np.int32 and scores.dtype == np.float32
        assert ids.tolist() == expected
        assert 0 not in ids.tolist() and np.all(np.diff(scores) <= 0)
    full = rec.score(np.asarray(golden["histories"][0], dtype=np.int32))
    assert full.shape == (artifact.read_metrics(folder)["num_items"] + 1,)
    rec.close()
    with pytest.raises(RuntimeError, match="closed"):
        rec.recommend(np.asarray(golden["histories"][0], dtype=np.int32))


@pytest.mark.parametrize("name", ["float", "dynamic"])
def test_serving_call_gives_the_golden_top_k_as_python_lists(artifacts: dict[str, Path], name: str) -> None:
    golden = artifact.read_golden(artifacts[name])
    rec = load_recommender(artifacts[name] / artifact.MODEL_FILE)
    for history, expected in list(zip(golden["histories"], golden["item_ids"], strict=True))[:16]:
        with rec.lock:
            ids, scores = rec.top_k_locked(list(history))
        assert ids == expected and all(type(i) is int for i in ids)
        ref_ids, ref_scores = rec.recommend(np.asarray(history, dtype=np.int32))
        assert ids == ref_ids.tolist() and scores == ref_scores.tolist()  # bit-identical float32 values
    rec.close()
    with pytest.raises(RecommenderClosedError, match=f"recommender for {rec.path} is closed"):
        rec.top_k_locked(list(golden["histories"][0]))
    with pytest.raises(RecommenderClosedError, match="closed"):
        rec.score(np.asarray(golden["histories"][0], dtype=np.int32))


def test_score_signature_ranks_like_the_recommend_signature(artifacts: dict[str, Path]) -> None:
    folder = artifacts["float"]
    golden = artifact.read_golden(folder)
    rec = load_recommender(folder / artifact.MODEL_FILE)
    for history in golden["histories"][:8]:
        batch = np.asarray(history, dtype=np.int32)
        ids, scores = rec.recommend(batch)
        full = rec.score(batch)
        np.testing.assert_allclose(full[ids], scores, rtol=1e-5, atol=1e-6)  # the same logits, two signatures
        assert full[1:].max() == pytest.approx(float(scores[0]), rel=1e-5, abs=1e-6)


def test_portable_runner_path_matches_the_direct_path(artifacts: dict[str, Path]) -> None:
    """Interpreters without the usual wrapper API fall back to the public SignatureRunner."""
    folder = artifacts["float"]
    golden = artifact.read_golden(folder)
    interpreter_cls, info = runtime._resolve(None)
    interpreter = interpreter_cls(model_path=str(folder / artifact.MODEL_FILE), num_threads=1)
    interpreter.allocate_tensors()
    portable = Recommender(interpreter, info, folder / artifact.MODEL_FILE, 1, direct=False)
    assert isinstance(portable._calls.invoke.__self__, runtime._RunnerCalls)
    direct = load_recommender(folder / artifact.MODEL_FILE)
    assert isinstance(direct._calls.invoke.__self__, type(interpreter._interpreter))
    for history, expected in list(zip(golden["histories"], golden["item_ids"], strict=True))[:8]:
        with portable.lock:
            got = portable.top_k_locked(list(history))
        with direct.lock:
            assert got == direct.top_k_locked(list(history))
        assert got[0] == expected
        batch = np.asarray(history, dtype=np.int32)
        np.testing.assert_array_equal(portable.score(batch), direct.score(batch))


def test_bad_history_shape_is_refused_with_the_expected_shape(artifacts: dict[str, Path]) -> None:
    rec = load_recommender(artifacts["float"] / artifact.MODEL_FILE)
    with pytest.raises(ValueError, match=r"shape \(10,\), got \(3,\)"):
        rec.recommend(np.array([1, 2, 3], dtype=np.int32))
    with pytest.raises(ValueError, match="integer item indices"):
        rec.recommend(np.zeros(10, dtype=np.float32))


def test_op_version_mismatch_is_its_own_error(artifacts: dict[str, Path]) -> None:
    path = artifacts["opversion"] / artifact.MODEL_FILE
    with pytest.raises(OpVersionError) as info:
        load_recommender(path)
    err = info.value
    assert (err.op, err.op_version) == ("FULLY_CONNECTED", 99)
    assert isinstance(err, ModelLoadError) and err.path == path
    assert str(path) in str(err) and "ai-edge-litert==2.3.0" in str(err)


def test_garbage_and_missing_files_raise_model_load_error(tmp_path: Path) -> None:
    garbage = tmp_path / "model.tflite"
    garbage.write_bytes(b"TFL3 but not really" * 10)
    with pytest.raises(ModelLoadError, match="not a valid Flatbuffer") as info:
        load_recommender(garbage)
    assert not isinstance(info.value, OpVersionError) and str(garbage) in str(info.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_recommender(tmp_path / "absent.tflite")


def test_forced_runtime_that_is_not_installed_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runtime, "_CACHE", {})
    monkeypatch.setenv(runtime.RUNTIME_ENV, "tflite_runtime")
    with pytest.raises(runtime.RuntimeNotFoundError, match="'tflite-runtime' was forced but cannot be imported"):
        detect_runtime()
    monkeypatch.setenv(runtime.RUNTIME_ENV, "onnx")
    with pytest.raises(runtime.RuntimeNotFoundError, match="unknown runtime 'onnx'"):
        detect_runtime()
    monkeypatch.setenv(runtime.RUNTIME_ENV, "ai_edge_litert")
    assert detect_runtime().name == "ai-edge-litert"


def test_open_model_reads_catalogue_and_metrics(artifacts: dict[str, Path]) -> None:
    model = open_model(artifacts["float"], model_id="tiny-float", version=3)
    items = json.loads((artifacts["float"] / "items.json").read_text())
    assert model.items[0] == ("", "<padding>") and len(model.items) == len(items["items"])
    assert model.popular == items["popular"] and (model.window, model.k) == (10, 10)
    assert model.metrics["model_id"] == "tiny-float" and model.runtime.name == "ai-edge-litert"
    assert model.describe()["num_items"] == model.metrics["num_items"]
    model.close()
    assert model.recommender.closed


def _broken_copy(src: Path, dst: Path, name: str, text: str) -> Path:
    shutil.copytree(src, dst)
    (dst / name).write_text(text)
    return dst


def test_open_model_refuses_broken_or_mismatched_metadata(artifacts: dict[str, Path], tmp_path: Path) -> None:
    src = artifacts["float"]
    broken = _broken_copy(src, tmp_path / "a", "items.json", "{not json")
    with pytest.raises(ModelLoadError, match="artifact metadata is broken"):
        open_model(broken, model_id="m", version=1)
    items = json.loads((src / "items.json").read_text())
    items["items"] = items["items"][:50]
    items["popular"] = [i for i in items["popular"] if i < 50]
    short = _broken_copy(src, tmp_path / "b", "items.json", json.dumps(items))
    with pytest.raises(ModelLoadError, match="items.json lists 49 items"):
        open_model(short, model_id="m", version=1)
    metrics = json.loads((src / "metrics.json").read_text()) | {"window": 20}
    wrong = _broken_copy(src, tmp_path / "c", "metrics.json", json.dumps(metrics))
    with pytest.raises(ModelLoadError, match="window 20 != model input length 10"):
        open_model(wrong, model_id="m", version=1)
