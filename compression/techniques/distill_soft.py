"""Soft-label knowledge distillation into a smaller student (technique ``distill-soft``).

The teacher's tempered softmax carries which items are *almost* right, a richer signal than
the single next item, which lets a much smaller embedding/output table keep the ranking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import tf_keras as keras

from compression.data import Dataset
from compression.techniques.base import StepResult
from compression.techniques.distillation import (
    StudentShape,
    build_student,
    check_alpha_temperature,
    kd_loss,
    train_student,
)

_LOGGER = logging.getLogger(__name__)


@dataclass
class SoftDistillation:
    """Technique ``distill-soft``: the input model is the teacher; returns a trained student."""

    student: StudentShape = field(default_factory=StudentShape)
    alpha: float = 0.5
    temperature: float = 2.0
    epochs: float = 4.0
    learning_rate: float = 2e-3
    max_pairs: int | None = None
    name: str = "distill-soft"

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Train a fresh ``student``-sized model on kd_loss against ``model``'s logits."""
        check_alpha_temperature(self.alpha, self.temperature)
        student = build_student(model, dataset.num_items, self.student)

        def loss(labels, s_out, t_out):
            return kd_loss(labels, s_out[0], t_out[0], self.alpha, self.temperature)

        curve = train_student(student, model, dataset, loss, epochs=self.epochs,
                              learning_rate=self.learning_rate, max_pairs=self.max_pairs, desc=self.name)
        notes = {"student": vars(self.student) | {"params": int(student.count_params())},
                 "teacher_params": int(model.count_params()), "alpha": self.alpha,
                 "temperature": self.temperature, "epochs": self.epochs, "loss_curve": curve}
        return StepResult(student, [self.name], notes)
