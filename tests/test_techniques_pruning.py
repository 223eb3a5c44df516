"""Pruning techniques on a tiny real recommender: sparsity reached, units really removed."""

from __future__ import annotations

import numpy as np
import pytest

from compression.techniques import ActivationPruning, GradientPruning, MagnitudePruning, TechniqueError
from compression.techniques.prune_activation import activation_statistics
from compression.techniques.prune_gradient import taylor_scores
from compression.techniques.prune_magnitude import sparsity
from compression.techniques.surgery import keep_indices, remove_units, unit_groups


def test_tfmot_magnitude_pruning_reaches_target_sparsity(tiny):
    model, dataset = tiny
    result = MagnitudePruning(target=0.6, method="tfmot", epochs=1.0).apply(model, dataset)
    assert result.notes["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert sparsity(result.model) == pytest.approx(0.6, abs=0.01)
    assert sparsity(model) < 0.01, "the input model must not be mutated"
    assert [la.name for la in result.model.layers] == [la.name for la in model.layers], "wrappers stripped"


def test_oneshot_magnitude_pruning_zeroes_the_smallest_weights(tiny):
    model, dataset = tiny
    pruned = MagnitudePruning(target=0.5, method="oneshot").apply(model, dataset).model
    assert sparsity(pruned) == pytest.approx(0.5, abs=0.001)
    before = model.get_layer("hidden").get_weights()[0]
    after = pruned.get_layer("hidden").get_weights()[0]
    survivors = after != 0
    np.testing.assert_array_equal(after[survivors], before[survivors])
    assert np.abs(before[~survivors]).max() <= np.abs(before[survivors]).min()


def test_magnitude_pruning_rejects_bad_target(tiny):
    model, dataset = tiny
    with pytest.raises(TechniqueError, match="1.5"):
        MagnitudePruning(target=1.5, method="oneshot").apply(model, dataset)


@pytest.mark.parametrize("technique", [ActivationPruning(epochs=0.3), GradientPruning(epochs=0.3)],
                         ids=["activation", "gradient"])
def test_structured_pruning_removes_units_and_still_runs(tiny, technique):
    model, dataset = tiny
    result = technique.apply(model, dataset)
    pruned = result.model
    assert unit_groups(pruned) == {"item_embedding": 8, "hidden": 16, "projection": 8}
    assert pruned.get_layer("item_embedding").get_weights()[0].shape == (dataset.num_items + 1, 8)
    assert pruned.get_layer("hidden").get_weights()[0].shape == (20 * 8, 16)
    assert pruned.get_layer("logits").get_weights()[0].shape == (8, dataset.num_items + 1)
    assert result.notes["params_after"] < result.notes["params_before"] / 2 + 1000
    histories, _ = dataset.eval_histories("test")
    logits = pruned(histories[:4]).numpy()
    assert logits.shape == (4, dataset.num_items + 1) and np.isfinite(logits).all()


def test_removing_dead_units_keeps_outputs_exactly(tiny):
    """Surgery is exact: units whose outgoing weights are zero can go without changing logits."""
    model, dataset = tiny
    from compression.techniques.common import clone_model

    edited = clone_model(model)
    projection = edited.get_layer("projection")
    kernel, bias = projection.get_weights()
    kernel[5] = 0.0  # hidden unit 5 no longer reaches the projection
    projection.set_weights([kernel, bias])
    keep = np.array([i for i in range(32) if i != 5])
    smaller = remove_units(edited, {"hidden": keep})
    histories, _ = dataset.eval_histories("test")
    np.testing.assert_allclose(smaller(histories[:16]).numpy(), edited(histories[:16]).numpy(), atol=1e-5)
    assert smaller.get_layer("hidden").units == 31


def test_activation_statistics_see_relu_zeros(tiny):
    model, dataset = tiny
    histories, _ = dataset.training_pairs(20)
    stats = activation_statistics(model, histories[:256], ["hidden", "projection"])
    assert stats["hidden"]["zero_fraction"].shape == (32,)
    assert stats["hidden"]["zero_fraction"].max() > 0, "ReLU units output exact zeros"
    assert stats["projection"]["zero_fraction"].max() == 0, "a linear layer practically never outputs 0.0"
    assert (stats["hidden"]["mean_abs"] >= 0).all()


def test_taylor_scores_are_zero_for_a_unit_without_effect(tiny):
    model, dataset = tiny
    from compression.techniques.common import clone_model

    edited = clone_model(model)
    hidden = edited.get_layer("hidden")
    kernel, bias = hidden.get_weights()
    kernel[:, 3] = 0.0
    bias[3] = 0.0
    hidden.set_weights([kernel, bias])
    x, y = dataset.training_pairs(20)
    scores = taylor_scores(edited, x[:256], y[:256], ["hidden"])["hidden"]
    assert scores[3] == 0.0
    assert (np.delete(scores, 3) > 0).all()
    assert 3 not in keep_indices(scores, 0.5)


def test_keep_indices_validates_fraction():
    with pytest.raises(TechniqueError, match="got 0"):
        keep_indices(np.arange(4.0), 0)
    np.testing.assert_array_equal(keep_indices(np.array([0.1, 5.0, 3.0, 0.2]), 0.5), [1, 2])
