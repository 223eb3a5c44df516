"""Distillation: the KD loss equals a hand computation; students train and are smaller."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from compression.data import DERIVED_DIR, load_dataset
from compression.model import build_reference
from compression.techniques import FeatureDistillation, SoftDistillation, StudentShape, TechniqueError
from compression.techniques.common import fine_tune
from compression.techniques.distill_feature import feature_loss
from compression.techniques.distillation import build_student, kd_loss


def _softmax(z):
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def test_kd_loss_equals_hand_computation():
    labels = [2, 0]
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[0.5, 1.0, 2.0], [2.0, 0.0, 1.0]]
    alpha, t = 0.3, 2.5
    hand = 0.0
    for y, s, te in zip(labels, student, teacher, strict=True):
        ce = -math.log(_softmax(s)[y])
        p = _softmax([v / t for v in te])
        q = _softmax([v / t for v in s])
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        hand += alpha * ce + (1 - alpha) * t * t * kl
    hand /= len(labels)
    got = kd_loss(tf.constant(labels), tf.constant(student), tf.constant(teacher), alpha, t)
    assert float(got) == pytest.approx(hand, rel=1e-5)


def test_kd_loss_soft_term_vanishes_when_student_equals_teacher():
    z = tf.constant([[0.1, 2.0, -1.0]])
    assert float(kd_loss(tf.constant([1]), z, z, 0.0, 3.0)) == pytest.approx(0.0, abs=1e-6)


def test_feature_loss_is_mse_through_projection():
    import tf_keras as keras

    projection = keras.layers.Dense(2, use_bias=False)
    projection.build((None, 3))
    projection.set_weights([np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)])
    s = tf.constant([[1.0, 2.0, 3.0]])
    t = tf.constant([[4.0, 4.0]])
    # projection(s) = [4, 5] -> squared errors [0, 1] -> mean 0.5
    assert float(feature_loss(s, t, projection)) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def teacher():
    dataset = load_dataset(str(DERIVED_DIR), max_customers=150)  # the derived copy loads in ~0.3 s
    model = build_reference(dataset.num_items, window=20, dim=16, hidden=32)
    fine_tune(model, dataset, epochs=2.0, learning_rate=3e-3)
    return model, dataset


@pytest.mark.parametrize("technique", [SoftDistillation(student=StudentShape(8, 16), epochs=2.0),
                                       FeatureDistillation(student=StudentShape(8, 16), epochs=2.0)],
                         ids=["soft", "feature"])
def test_distilled_student_is_smaller_and_learns(teacher, technique):
    model, dataset = teacher
    result = technique.apply(model, dataset)
    student = result.model
    assert student.get_layer("item_embedding").output_dim == 8
    assert student.count_params() < model.count_params() / 1.5
    curve = result.notes["loss_curve"]
    assert curve[-1] < curve[0], f"distillation loss did not fall: {curve}"
    histories, _ = dataset.eval_histories("test")
    assert student(histories[:3]).shape == (3, dataset.num_items + 1)


def test_distillation_rejects_bad_alpha(teacher):
    model, dataset = teacher
    with pytest.raises(TechniqueError, match="1.2"):
        SoftDistillation(alpha=1.2).apply(model, dataset)


def test_warm_started_sequential_student_inherits_the_teachers_transition_terms() -> None:
    from compression.seqmodel import Architecture, build_model
    from compression.techniques.distillation import low_rank_pair

    teacher = build_model(40, Architecture(dim=8, fpmc_dim=4, blocks=1, heads=1), window=6)
    for weight in teacher.get_layer("transitions").weights:
        weight.assign(np.random.default_rng(1).normal(size=weight.shape).astype(np.float32))
    same = build_student(teacher, 40, StudentShape(dim=8, fpmc_dim=4, warm_start=True))
    history = np.array([[0, 3, 9, 9, 20, 21]], dtype=np.int32)
    expected = teacher.get_layer("transitions")(history).numpy()
    assert np.allclose(same.get_layer("transitions")(history).numpy(), expected, atol=1e-4)
    # a narrower FPMC keeps the best rank-2 approximation of the teacher's last -> next map
    left = np.random.default_rng(2).normal(size=(40, 4))
    right = np.random.default_rng(3).normal(size=(40, 4))
    a, b = low_rank_pair(left, right, 2)
    u, s, vt = np.linalg.svd(left @ right.T)
    assert np.allclose(a @ b.T, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-4)
    small = build_student(teacher, 40, StudentShape(dim=4, fpmc_dim=2, warm_start=True))
    assert small.get_layer("item_embedding").embeddings.shape == (41, 4)


def test_markov_student_of_a_sequential_teacher_keeps_only_the_transition_terms() -> None:
    from compression.seqmodel import Architecture, architecture_of, build_model

    teacher = build_model(40, Architecture(dim=8, fpmc_dim=4, blocks=1, heads=1), window=6)
    student = build_student(teacher, 40, StudentShape(dim=8, fpmc_dim=2, kind="fpmc", warm_start=True))
    assert architecture_of(student).kind == "fpmc" and architecture_of(student).fpmc_dim == 2
    assert "item_embedding" not in {layer.name for layer in student.layers}
    with pytest.raises(TechniqueError, match="MLP"):
        build_student(teacher, 40, StudentShape(kind="mlp"))
