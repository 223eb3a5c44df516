"""Low-rank techniques: SVD rank selection and reconstruction error; CP factors and lookup."""

from __future__ import annotations

import numpy as np
import pytest

from compression.techniques import CPDecomposition, CPEmbedding, TechniqueError, TruncatedSVD
from compression.techniques.cp import cp_factors, tensor_shape
from compression.techniques.svd import factorize, rank_for_energy, rank_for_size, truncated_svd


def test_rank_rules():
    s = np.array([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert rank_for_energy(s, 0.7) == 1
    assert rank_for_energy(s, 0.9) == 2
    assert rank_for_energy(s, 1.0) == 4
    assert rank_for_size((100, 100), 0.25) == 12  # 12 * 200 <= 2500 < 13 * 200
    with pytest.raises(TechniqueError, match="got 0"):
        rank_for_energy(s, 0)


def test_truncated_svd_is_exact_at_full_rank_and_error_follows_singular_values():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(30, 12)).astype(np.float32)
    a, b, s = truncated_svd(w, 12)
    np.testing.assert_allclose(a @ b, w, atol=1e-4)
    a, b, s = truncated_svd(w, 5)
    expected = np.sqrt(np.sum(s[5:] ** 2))  # Eckart-Young
    assert np.linalg.norm(w - a @ b) == pytest.approx(expected, rel=1e-4)


def test_svd_factorize_replaces_layers_by_factors_of_chosen_rank(tiny):
    model, dataset = tiny
    factored, notes = factorize(model, {"item_embedding": {"rank": 4}, "hidden": {"energy": 0.9},
                                        "logits": {"rank": 16}})
    assert factored.get_layer("item_embedding").output_dim == 4
    assert factored.get_layer("item_embedding_up").get_weights()[0].shape == (4, 16)
    assert factored.get_layer("hidden_down").units == notes["hidden"]["rank"]
    assert notes["hidden"]["energy"] >= 0.9
    assert notes["logits"]["relative_error"] < 1e-4, "rank 16 of a 16-row kernel is exact"
    histories, _ = dataset.eval_histories("test")
    exact, _ = factorize(model, {"logits": {"rank": 16}, "hidden": {"rank": 32}})
    np.testing.assert_allclose(exact(histories[:8]).numpy(), model(histories[:8]).numpy(), atol=2e-3)
    assert 0 < notes["item_embedding"]["relative_error"] < 1


def test_svd_technique_shrinks_and_runs(tiny):
    model, dataset = tiny
    result = TruncatedSVD(rules={"item_embedding": {"ratio": 0.3}, "logits": {"ratio": 0.3}},
                          epochs=0.3).apply(model, dataset)
    assert result.notes["params_after"] < 0.5 * result.notes["params_before"]
    histories, _ = dataset.eval_histories("test")
    assert np.isfinite(result.model(histories[:4]).numpy()).all()
    with pytest.raises(TechniqueError, match="nope"):
        factorize(model, {"nope": {"rank": 2}})


def test_tensor_shape_covers_rows():
    for rows in (1, 2, 7, 3660, 3661):
        a, b = tensor_shape(rows)
        assert a * b >= rows and abs(a - b) <= 1 + (rows == 2)


def test_cp_factors_recover_an_exact_cp_table():
    rng = np.random.default_rng(2)
    a, b, c = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)), rng.normal(size=(5, 3))
    table = np.einsum("ir,jr,dr->ijd", a, b, c).reshape(36, 5)
    fa, fb, fc, grid = cp_factors(table, rank=3, n_iter_max=500)
    assert grid == (6, 6)
    approx = np.einsum("ir,jr,dr->ijd", fa, fb, fc).reshape(36, 5)
    assert np.linalg.norm(approx - table) / np.linalg.norm(table) < 1e-3


def test_cp_embedding_lookup_matches_full_table():
    layer = CPEmbedding(37, 5, rank=3)
    ids = np.array([[0, 1, 36], [7, 20, 5]], dtype=np.int32)
    rows = layer(ids).numpy()
    np.testing.assert_allclose(rows, layer.full_table()[ids], atol=1e-5)
    assert rows.shape == (2, 3, 5)


def test_cp_technique_replaces_the_table_and_runs(tiny):
    model, dataset = tiny
    result = CPDecomposition(rank=8, epochs=0.3).apply(model, dataset)
    layer = result.model.get_layer("item_embedding")
    assert isinstance(layer, CPEmbedding)
    assert result.notes["params_after"] == (sum(tensor_shape(dataset.num_items + 1)) + 16) * 8
    assert result.notes["params_after"] < result.notes["params_before"] / 10
    assert 0 < result.notes["relative_error"] <= 1.0
    histories, _ = dataset.eval_histories("test")
    assert np.isfinite(result.model(histories[:4]).numpy()).all()
