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
from compression.seqmodel import build_model
from compression.train import TrainConfig, evaluate_keras, train_reference

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
