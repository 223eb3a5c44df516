"""Sequential recommenders: shapes, the transition terms' meaning, bad input, export + agent."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compression.data import DERIVED_DIR, load_dataset
from compression.seqmodel import Architecture, architecture_of, build_model
from compression.train import TrainConfig, evaluate_keras, train_reference

V, L = 30, 6


@pytest.mark.parametrize("kind", ["sasrec", "gru", "fpmc", "mlp"])
def test_every_architecture_maps_histories_to_all_item_scores(kind: str) -> None:
    arch = Architecture(kind=kind, dim=8, hidden=8, fpmc_dim=4, heads=2, blocks=1)
    model = build_model(V, arch, window=L)
    histories = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]], dtype=np.int32)
    scores = model(histories, training=False).numpy()
    assert scores.shape == (3, V + 1) and np.isfinite(scores).all()  # an empty history still scores
    back = architecture_of(model)
    assert back.kind == kind and (kind == "fpmc" or back.dim == arch.dim)
    if kind != "mlp":
        assert (back.fpmc_dim, back.offset_window, back.repeat) == (arch.fpmc_dim, arch.offset_window, arch.repeat)


def test_architecture_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="architecture must be one of"):
        Architecture(kind="lstm")
    with pytest.raises(ValueError, match="multiple of heads"):
        Architecture(dim=10, heads=3)
    with pytest.raises(ValueError, match="fpmc_dim >= 1"):
        Architecture(kind="fpmc", fpmc_dim=0)
    with pytest.raises(ValueError, match="TrainConfig.architecture"):
        TrainConfig(architecture="transformer")


def test_transition_terms_score_catalogue_neighbours_and_repeats() -> None:
    """Offsets are relative to the item at each recent position; repeats reward items in the window."""
    model = build_model(V, Architecture(kind="fpmc", fpmc_dim=1, offset_window=2, offset_positions=1,
                                        repeat=True), window=L)
    heads = model.get_layer("transitions")
    weights = {w.name.split("/")[-1].split(":")[0]: w for w in heads.weights}
    for w in heads.weights:
        w.assign(np.zeros(w.shape, dtype=np.float32))
    offsets = np.zeros(weights["offsets"].shape, dtype=np.float32)
    offsets[0, 2 + 1 + 1] = 5.0  # position "newest", offset +1 (index = offset + w + 1)
    offsets[0, 0] = -1.0         # everything more than w=2 below
    weights["offsets"].assign(offsets)
    repeats = np.zeros(L, dtype=np.float32)
    repeats[0] = 2.0             # the oldest position
    weights["repeats"].assign(repeats)
    scores = model(np.array([[7, 0, 0, 0, 0, 10]], dtype=np.int32), training=False).numpy()[0]
    assert scores[11] == pytest.approx(5.0)          # 10 -> 11 follows in catalogue order
    assert scores[7] == pytest.approx(2.0 - 1.0)     # repeat of position 0; 7 is 3 below 10
    assert scores[10] == pytest.approx(0.0) and scores[12] == pytest.approx(0.0)
    # an empty history has no "newest" item: no offsets, no repeats (padding is not an item)
    empty = model(np.zeros((1, L), dtype=np.int32), training=False).numpy()[0]
    assert np.allclose(empty[1:], 0.0)  # column 0 (padding) is never recommended


@pytest.fixture(scope="module")
def slice_data():
    return load_dataset(str(DERIVED_DIR), max_customers=150)


def test_training_on_a_slice_with_items_unseen_in_training(slice_data) -> None:
    """Items that occur only as validation/test targets keep an (untrained) row and can be ranked."""
    unseen = np.flatnonzero(slice_data.popularity[1:] == 0) + 1
    assert len(unseen) > 0, "the slice must contain items never seen in training"
    config = TrainConfig.quick(epochs=1, window=8, patience=1)
    model, history = train_reference(slice_data, config, progress=False)
    assert history["best_epoch"] == 1 and len(history["val_ndcg10"]) == 1
    histories, _ = slice_data.eval_histories("test", 8)
    scores = model(histories[:16], training=False).numpy()
    assert scores.shape == (16, slice_data.num_items + 1) and np.isfinite(scores[:, unseen]).all()
    figures = evaluate_keras(model, slice_data, "test")
    assert 0.0 <= figures["ndcg10"] <= 1.0 and figures["n"] == len(slice_data.customers)


def test_histories_longer_than_the_window_keep_the_newest_items(slice_data) -> None:
    long_seq = max(slice_data.sequences, key=len)
    u = next(i for i, s in enumerate(slice_data.sequences) if s is long_seq)
    histories, _ = slice_data.eval_histories("test", 8)
    assert len(long_seq) - 1 > 8
    assert histories[u].tolist() == long_seq[-9:-1].tolist()
    model = build_model(slice_data.num_items, Architecture(dim=8, fpmc_dim=4, blocks=1, heads=1), window=8)
    with pytest.raises(ValueError):
        model(np.zeros((1, 9), dtype=np.int32))  # the graph takes exactly L items: callers crop


def test_early_stopping_restores_the_best_validation_epoch(slice_data) -> None:
    """A learning rate that overfits 150 customers within a few epochs, a cap far above that and
    patience 1: training must stop one epoch after the best, well before the cap, and hand back the
    best epoch's weights (not the last, worse ones)."""
    cap = 20
    config = TrainConfig(architecture="fpmc", epochs=cap, batch_size=512, lr=5e-2, window=8, fpmc_dim=8,
                         patience=1)
    model, history = train_reference(slice_data, config, progress=False)
    ran = len(history["val_ndcg10"])
    best = int(np.argmax(history["val_ndcg10"]))
    assert ran < cap, f"no early stop: all {cap} epochs ran ({history['val_ndcg10']})"
    assert history["best_epoch"] == best + 1 and ran == best + 2, history["val_ndcg10"]  # one epoch after the best
    assert history["val_ndcg10"][-1] < history["val_ndcg10"][best]  # the last epoch was worse: restoring matters
    assert evaluate_keras(model, slice_data, "val")["ndcg10"] == pytest.approx(history["val_ndcg10"][best])


def test_sequential_export_follows_the_contract_and_the_agent_serves_it(slice_data, tmp_path) -> None:
    from agent.runtime import load_recommender
    from compression.export import export_artifact

    keras_model = build_model(slice_data.num_items, Architecture(dim=8, fpmc_dim=4, blocks=1, heads=1),
                              window=8)
    out = export_artifact(keras_model, slice_data, tmp_path / "art", model_id="seq", quantization="none",
                          check_compat=False)
    metrics = json.loads((out / "metrics.json").read_text())
    golden = json.loads((out / "golden.json").read_text())
    assert metrics["ndcg10"] == pytest.approx(evaluate_keras(keras_model, slice_data, "test")["ndcg10"], abs=1e-4)
    recommender = load_recommender(out / "model.tflite")
    for history, ids in zip(golden["histories"][:8], golden["item_ids"][:8], strict=True):
        got, _ = recommender.recommend(np.array(history, dtype=np.int32))
        assert got.tolist() == ids and 0 not in got.tolist()
    got, _ = recommender.recommend(np.zeros(8, dtype=np.int32))  # empty history: valid ids, no padding
    assert got.min() >= 1 and got.max() <= slice_data.num_items


def test_int8_sequential_export_serves_an_empty_history(slice_data, tmp_path) -> None:
    """Full-integer attention must not divide by a zero sum when every key is padding."""
    from agent.runtime import load_recommender
    from compression.export import export_artifact
    from compression.runtimes import check_litert

    model = build_model(slice_data.num_items, Architecture(dim=8, fpmc_dim=4, blocks=1, heads=1), window=8)
    out = export_artifact(model, slice_data, tmp_path / "int8", model_id="seq-int8", quantization="int8",
                          representative_n=32, check_compat=False)
    assert check_litert(out / "model.tflite")["loads"] is True
    ids, _ = load_recommender(out / "model.tflite").recommend(np.zeros(8, dtype=np.int32))
    assert ids.min() >= 1 and ids.max() <= slice_data.num_items
