"""Keras reference -> artifact folder (model.tflite, items.json, metrics.json, golden.json).

The artifact is what the server ships and the device gate judges, so every figure written
here is measured on the EXPORTED .tflite on the host (ai_edge_litert), not on Keras.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

from compression.baselines import evaluate_baselines
from compression.compact import compact_tflite
from compression.data import Dataset
from compression.quantizations import QUANTIZATIONS
from compression.tflite_eval import (
    INPUT_NAME,
    RECOMMEND,
    SCORE,
    evaluate_tflite,
    recommend_tflite,
    tflite_ops,
)

_LOGGER = logging.getLogger(__name__)

FORMAT = 1
GOLDEN_N = 64
# what each int4 export mode repacks (``compression.int4.int4_tables``): "dynamic-int4" only tables
# FULLY_CONNECTED reads (both runtimes run it); "-all" also GATHER-read tables and the 64 x 64 kernels
INT4_SETTINGS = {"dynamic-int4": {"gather": False},
                 "dynamic-int4-all": {"gather": True, "min_elements": 4096}}
POPULAR_N = 100


class ExportError(Exception):
    """Raised when a model cannot be exported as asked."""


class _Serving(tf.Module):
    """The two entry points of model.tflite, around one shared Keras model."""

    def __init__(self, model: keras.Model, window: int, k: int) -> None:
        super().__init__()
        self.model = model
        self._k = k
        spec = [tf.TensorSpec([1, window], tf.int32, name=INPUT_NAME)]
        self.recommend = tf.function(self._recommend, input_signature=spec)
        self.score = tf.function(self._score, input_signature=spec)

    def _recommend(self, history: tf.Tensor) -> dict[str, tf.Tensor]:
        # Slicing off column 0 masks the padding index without a -inf constant, which
        # would wreck the int8 calibration range of everything downstream.
        logits = self.model(history, training=False)[:, 1:]
        top = tf.math.top_k(logits, k=self._k, sorted=True)
        return {"item_ids": tf.cast(top.indices + 1, tf.int32), "scores": top.values}

    def _score(self, history: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"scores": self.model(history, training=False)}


def _representative(dataset: Dataset, window: int, n: int, seed: int = 0) -> Iterator:
    """Real training histories for int8 calibration, fed to both signatures."""
    histories, _ = dataset.training_pairs(window)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(histories), size=min(n, len(histories)), replace=False)
    for idx in picks:
        for key in (RECOMMEND, SCORE):
            yield key, {INPUT_NAME: histories[idx][None, :]}


def convert(model: keras.Model, dataset: Dataset, *, k: int = 20, quantization: str = "none",
            representative_n: int = 256, compact: bool = True) -> bytes:
    """Convert a Keras recommender to a two-signature .tflite with the given post-training quantization.

    ``compact`` False returns the converter's own output (for comparisons), else the lossless
    ``compact_tflite`` form.
    """
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    window = int(model.inputs[0].shape[1])
    num_outputs = int(model.outputs[0].shape[-1])
    if num_outputs != dataset.num_items + 1:
        raise ExportError(f"model has {num_outputs} logits but the dataset has {dataset.num_items} items "
                          f"(+1 padding); export with the dataset the model was trained on")
    if not 1 <= k <= dataset.num_items:
        raise ExportError(f"k must be in 1..{dataset.num_items}, got {k}")
    serving = _Serving(model, window, k)
    with tempfile.TemporaryDirectory(prefix="edgeguide-export-") as tmp:
        tf.saved_model.save(serving, tmp, signatures={
            RECOMMEND: serving.recommend.get_concrete_function(),
            SCORE: serving.score.get_concrete_function(),
        })
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[RECOMMEND, SCORE])
        if quantization != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization in ("dynamic-tensor", "dynamic-int4", "dynamic-int4-all", "int8"):
            # One scale per weight tensor: per-channel scales and zero points cost 12 bytes per
            # output channel, i.e. per item for every [V, d] score table, and each signature
            # stores its own copy (measured: 196 KB of a 530 KB dynamic-range SASRec at V=3659).
            converter._experimental_disable_per_channel = True
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8":
            converter.representative_dataset = lambda: _representative(dataset, window, representative_n)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            # inference_input/output_type stay at their float32 default, which leaves the int32
            # ids input alone and dequantizes the scores: the agent's interface does not change.
        blob = converter.convert()
    if not compact:
        return blob
    blob, _ = compact_tflite(blob)  # lossless: shared constants, no tensor names, one subgraph
    if quantization in INT4_SETTINGS:
        from compression.int4 import int4_tables

        blob, _ = int4_tables(blob, **INT4_SETTINGS[quantization])
    _LOGGER.info("converted %s model: %d bytes (%s)", quantization, len(blob), model.name)
    return blob


def _golden_histories(dataset: Dataset, window: int, n: int = GOLDEN_N) -> np.ndarray:
    """``n`` real test histories spread evenly over the customers (deterministic)."""
    histories, _ = dataset.eval_histories("test", window)
    picks = np.unique(np.linspace(0, len(histories) - 1, num=min(n, len(histories))).round().astype(int))
    return histories[picks]


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def export_artifact(model: keras.Model, dataset: Dataset, out_dir: str | Path, *, model_id: str,
                    k: int = 20, quantization: str = "none", techniques: list[str] | None = None,
                    training: dict | None = None, reference: dict | None = None,
                    representative_n: int = 256, check_compat: bool = True) -> Path:
    """Write the artifact folder of docs/design.md and return its path.

    ``reference`` carries the float32 reference's figures (or None), ``training`` the config
    dict; ``check_compat`` runs the runtime loadability checks (the tflite-runtime one builds
    a cached venv on first use).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    window = int(model.inputs[0].shape[1])
    blob = convert(model, dataset, k=k, quantization=quantization, representative_n=representative_n)
    tflite_path = out / "model.tflite"
    tflite_path.write_bytes(blob)

    items = [[code, desc] for code, desc in zip(dataset.codes, dataset.descriptions, strict=True)]
    _write_json(out / "items.json", {"format": FORMAT, "items": items, "popular": dataset.popular(POPULAR_N)})

    golden = _golden_histories(dataset, window)
    ids, scores = recommend_tflite(tflite_path, golden)
    if (ids == 0).any() or ids.min() < 1 or ids.max() > dataset.num_items:
        raise ExportError(f"exported recommend returned ids outside 1..{dataset.num_items}: "
                          f"min {ids.min()} max {ids.max()}")
    _write_json(out / "golden.json", {
        "format": FORMAT, "window": window, "k": k, "histories": golden.tolist(),
        "item_ids": ids.tolist(), "scores": [[float(s) for s in row] for row in scores],
    })

    histories, targets = dataset.eval_histories("test", window)
    figures = evaluate_tflite(tflite_path, histories, targets)
    runtimes: dict = {}
    if check_compat:
        from compression.runtimes import check_runtimes  # builds a venv on first use: only when asked
        runtimes = check_runtimes(tflite_path)
    metrics = {
        "format": FORMAT,
        "model_id": model_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "window": window,
        "k": k,
        "num_items": dataset.num_items,
        "tflite_bytes": len(blob),
        "gzip_bytes": len(gzip.compress(blob, compresslevel=9, mtime=0)),
        "hr10": figures["hr10"],
        "ndcg10": figures["ndcg10"],
        "mrr": figures["mrr"],
        "quantization": quantization,
        "baselines": evaluate_baselines(dataset, "test"),
        "reference": reference,
        "split": dataset.split_summary(),
        "training": training or {},
        "techniques": list(techniques or []),
        "runtimes": runtimes,
        "ops": tflite_ops(tflite_path),
    }
    _write_json(out / "metrics.json", metrics)
    _LOGGER.info("artifact %s at %s: %d bytes, HR@10 %.4f NDCG@10 %.4f",
                 model_id, out, len(blob), figures["hr10"], figures["ndcg10"])
    return out
