"""Pick the float32 reference among candidate architectures by VALIDATION NDCG@10.

Each candidate (SASRec, GRU4Rec-style GRU, FPMC, the earlier MLP) is trained with full-softmax
cross-entropy and early stopping on validation NDCG@10, exported once as float32 to learn its
``.tflite`` size and which runtimes load it, and reported on test. Trained weights are cached
per candidate under a key of its full training configuration, so an interrupted run resumes
and a changed configuration is retrained, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import tf_keras as keras

from compression.data import Dataset
from compression.export import export_artifact
from compression.seqmodel import build_model
from compression.train import TrainConfig, evaluate_keras, train_reference
from compression.variants import SearchError

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A named training configuration competing to be the reference."""

    name: str
    config: TrainConfig

    def key(self) -> str:
        """A digest of the full configuration: cached results are only reused under the same key."""
        text = json.dumps({"name": self.name, "config": self.config.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_candidates(preset: str, epochs: int | None = None) -> list[Candidate]:
    """The reference candidates of a preset; ``epochs`` overrides every candidate's cap."""
    over = {"epochs": epochs} if epochs else {}
    if preset == "quick":
        return [Candidate("sasrec", TrainConfig.quick(patience=1, **over)),
                Candidate("mlp", TrainConfig(**{"architecture": "mlp", "epochs": 3, "batch_size": 512, "lr": 5e-3}
                                             | over))]
    if preset != "full":
        raise ValueError(f"preset must be 'quick' or 'full', got {preset!r}")
    return [
        Candidate("sasrec", TrainConfig.full(**over)),
        Candidate("gru", TrainConfig.full(architecture="gru", **({"epochs": 2} | over))),
        Candidate("fpmc", TrainConfig.full(architecture="fpmc", batch_size=512, lr=5e-3,
                                           **({"epochs": 2} | over))),
        Candidate("mlp", TrainConfig(**{"architecture": "mlp", "epochs": 3, "batch_size": 512, "lr": 5e-3}
                                     | over)),
    ]


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def train_candidate(candidate: Candidate, dataset: Dataset, cache_dir: Path) -> tuple[keras.Model, dict]:
    """Train (or load from ``cache_dir`` under the same key) one candidate; returns model and record."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights = cache_dir / f"{candidate.name}.weights.h5"
    record_path = cache_dir / f"{candidate.name}.json"
    config = candidate.config
    model = build_model(dataset.num_items, config.arch(), config.window)
    if record_path.is_file() and weights.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("key") == candidate.key():
            model.load_weights(str(weights))
            # figures are re-measured with the current code, never copied from an older run
            record["val"] = evaluate_keras(model, dataset, "val")
            record["test"] = evaluate_keras(model, dataset, "test")
            record["resumed"] = True
            _LOGGER.info("candidate %s: cached weights reused (key %s), val NDCG@10 %.4f",
                         candidate.name, candidate.key(), record["val"]["ndcg10"])
            return model, record
        _LOGGER.warning("candidate %s: cached under key %s, configuration now %s; retraining",
                        candidate.name, record.get("key"), candidate.key())
    model, history = train_reference(dataset, config, progress=False)
    record = {"name": candidate.name, "key": candidate.key(), "architecture": config.arch().to_dict(),
              "config": config.to_dict(), "history": history,
              "val": evaluate_keras(model, dataset, "val"), "test": evaluate_keras(model, dataset, "test")}
    model.save_weights(str(weights))
    _write_json(record_path, record)
    _LOGGER.info("candidate %s: val NDCG@10 %.4f test %.4f (%d params, best epoch %d, %.0f s)",
                 candidate.name, record["val"]["ndcg10"], record["test"]["ndcg10"], history["params"],
                 history["best_epoch"], history["seconds"])
    return model, record


def choose_reference(dataset: Dataset, candidates: list[Candidate],
                     cache_dir: Path) -> tuple[str, dict[str, keras.Model], dict[str, dict]]:
    """Train every candidate; return (name of the best by validation NDCG@10, models, records)."""
    if not candidates:
        raise ValueError("no reference candidates")
    models, records = {}, {}
    for candidate in candidates:
        models[candidate.name], records[candidate.name] = train_candidate(candidate, dataset, cache_dir)
    best = max(records, key=lambda name: records[name]["val"]["ndcg10"])
    _LOGGER.info("reference: %s (validation NDCG@10 %.4f)", best, records[best]["val"]["ndcg10"])
    return best, models, records


def load_reference_model(path: str | Path, dataset: Dataset, window: int = 20) -> keras.Model:
    """A saved Keras model (.keras/.h5) or MLP weights (.weights.h5) of the reference."""
    from compression.model import build_reference

    path = Path(path)
    if not path.exists():
        raise SearchError(f"reference model {path} does not exist")
    if path.name.endswith(".weights.h5"):
        model = build_reference(dataset.num_items, window=window)
        model.load_weights(str(path))
        return model
    return keras.models.load_model(str(path), compile=False)


def export_candidates(models: dict[str, keras.Model], records: dict[str, dict], dataset: Dataset,
                      out_dir: Path, check_compat: bool) -> dict[str, dict]:
    """Export each candidate as float32 once: its .tflite size and which runtimes load it."""
    for name, model in models.items():
        record = records[name]
        path = out_dir / name
        metrics_path = path / "metrics.json"
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            if metrics.get("model_id") == f"candidate-{name}-{record['key']}":
                record["export"] = _candidate_export(metrics, path)
                continue
        export_artifact(model, dataset, path, model_id=f"candidate-{name}-{record['key']}", quantization="none",
                        training=record["config"], check_compat=check_compat)
        record["export"] = _candidate_export(json.loads(metrics_path.read_text(encoding="utf-8")), path)
    return records


def _candidate_export(metrics: dict, path: Path) -> dict:
    return {key: metrics[key] for key in ("tflite_bytes", "hr10", "ndcg10", "mrr", "runtimes")} | {
        "artifact": str(path)}


def obtain_references(dataset: Dataset, out_dir: Path, *, preset: str, epochs: int | None = None,
                      check_compat: bool = True) -> tuple[keras.Model, dict, dict[str, keras.Model]]:
    """Train the candidate architectures (cached), pick the reference by validation NDCG@10.

    Returns (reference, training record incl. every candidate's figures, the other candidates
    by name as bases for techniques that only apply to them).
    """
    best, models, records = choose_reference(dataset, default_candidates(preset, epochs),
                                             out_dir / "candidates")
    export_candidates(models, records, dataset, out_dir / "candidates", check_compat)
    training = {"architecture": records[best]["architecture"], "config": records[best]["config"],
                "history": records[best]["history"], "selected_by": "val_ndcg10", "chosen": best,
                "candidates": {name: {key: rec.get(key) for key in ("architecture", "config", "val", "test",
                                                                    "export")}
                               | {"best_epoch": rec["history"]["best_epoch"], "params": rec["history"]["params"],
                                  "seconds": rec["history"]["seconds"]}
                               for name, rec in records.items()}}
    bases = {name: model for name, model in models.items() if name != best}
    return models[best], training, bases


