"""Reference choice: by validation NDCG@10, cached per full configuration, retrained when it changes."""

from __future__ import annotations

import json

import pytest

from compression.data import DERIVED_DIR, load_dataset
from compression.reference import Candidate, choose_reference, default_candidates
from compression.train import TrainConfig


@pytest.fixture(scope="module")
def data():
    return load_dataset(str(DERIVED_DIR), max_customers=120)


def _fpmc(**changes) -> TrainConfig:
    return TrainConfig(**{"architecture": "fpmc", "epochs": 1, "batch_size": 512, "lr": 2e-2, "window": 8,
                          "fpmc_dim": 8} | changes)


def test_candidates_are_chosen_on_validation_and_cached_by_configuration(data, tmp_path) -> None:
    cache = tmp_path / "candidates"
    candidates = [Candidate("fpmc", _fpmc()), Candidate("mlp", TrainConfig(epochs=1, dim=8, hidden=16, window=8))]
    best, models, records = choose_reference(data, candidates, cache)
    assert best == max(records, key=lambda n: records[n]["val"]["ndcg10"])
    assert set(models) == {"fpmc", "mlp"} and records["fpmc"]["architecture"]["kind"] == "fpmc"
    first = json.loads((cache / "fpmc.json").read_text())
    # same configuration: weights reused, figures re-measured (and equal)
    _, _, again = choose_reference(data, candidates, cache)
    assert again["fpmc"]["resumed"] is True
    assert again["fpmc"]["val"]["ndcg10"] == pytest.approx(first["val"]["ndcg10"], abs=1e-6)
    # a changed configuration under the same name is retrained, never loaded from the old weights
    changed = [Candidate("fpmc", _fpmc(fpmc_dim=4))]
    _, models, records = choose_reference(data, changed, cache)
    assert "resumed" not in records["fpmc"] and records["fpmc"]["key"] != first["key"]
    assert models["fpmc"].get_layer("transitions").fpmc_dim == 4


def test_default_candidates_cover_the_sequential_families() -> None:
    kinds = {c.config.architecture for c in default_candidates("full")}
    assert kinds == {"sasrec", "gru", "fpmc", "mlp"}
    assert all(c.config.patience >= 1 for c in default_candidates("full") if c.config.architecture != "mlp")
    assert {c.config.epochs for c in default_candidates("quick", epochs=2)} == {2}
    with pytest.raises(ValueError, match="preset"):
        default_candidates("huge")
    with pytest.raises(ValueError, match="no reference candidates"):
        choose_reference(None, [], None)  # type: ignore[arg-type]
