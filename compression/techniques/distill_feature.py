"""Feature distillation (technique ``distill-feature``).

Besides the (soft) label loss, the student's hidden representation, mapped through a learned
linear projection to the teacher's width, is regressed (MSE) onto the teacher's representation
of the same history, so the student copies how the teacher encodes a basket, not only its
final scores. The projection is training scaffolding and is not part of the returned model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import tensorflow as tf
import tf_keras as keras

from compression.data import Dataset
from compression.techniques.base import StepResult
from compression.techniques.common import find_layer
from compression.techniques.distillation import (
    StudentShape,
    build_student,
    check_alpha_temperature,
    kd_loss,
    train_student,
)

_LOGGER = logging.getLogger(__name__)


def with_feature_output(model: keras.Model, layer: str) -> keras.Model:
    """The same layers, returning (logits, ``layer``'s output)."""
    return keras.Model(model.inputs, [model.outputs[0], find_layer(model, layer).output])


def feature_loss(student_features: tf.Tensor, teacher_features: tf.Tensor,
                 projection: keras.layers.Dense) -> tf.Tensor:
    """MSE between projection(student features) and the teacher's features, mean over batch and units."""
    return tf.reduce_mean(tf.square(projection(student_features) - teacher_features))


@dataclass
class FeatureDistillation:
    """Technique ``distill-feature``: kd_loss plus ``beta`` x feature MSE through a learned projection."""

    student: StudentShape = field(default_factory=StudentShape)
    layer: str = "projection"
    beta: float = 1.0
    alpha: float = 0.5
    temperature: float = 2.0
    epochs: float = 4.0
    learning_rate: float = 2e-3
    max_pairs: int | None = None
    name: str = "distill-feature"

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Train a fresh student on label + feature losses against ``model``."""
        check_alpha_temperature(self.alpha, self.temperature)
        student = build_student(model, dataset.num_items, self.student)
        layer = self.layer
        if layer == "projection" and any(la.name == "last_step" for la in model.layers):
            layer = "last_step"  # a sequential model's user vector (the MLP's is its projection)
        s_pair = with_feature_output(student, layer)
        t_pair = with_feature_output(model, layer)
        teacher_width = int(t_pair.outputs[1].shape[-1])
        projection = keras.layers.Dense(teacher_width, use_bias=True, name="feature_projection")
        projection.build((None, int(s_pair.outputs[1].shape[-1])))

        def loss(labels, s_out, t_out):
            label_term = kd_loss(labels, s_out[0], t_out[0], self.alpha, self.temperature)
            return label_term + self.beta * feature_loss(s_out[1], t_out[1], projection)

        curve = train_student(s_pair, t_pair, dataset, loss, epochs=self.epochs,
                              learning_rate=self.learning_rate,
                              extra_variables=projection.trainable_variables, max_pairs=self.max_pairs,
                              desc=self.name)
        notes = {"student": vars(self.student) | {"params": int(student.count_params())},
                 "teacher_params": int(model.count_params()), "layer": layer, "beta": self.beta,
                 "alpha": self.alpha, "temperature": self.temperature, "epochs": self.epochs,
                 "loss_curve": curve}
        return StepResult(student, [self.name], notes)
