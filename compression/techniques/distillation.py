"""Shared machinery of the two distillation techniques: the student and its training loop.

The student is the teacher's architecture with smaller sizes (the MLP via ``build_reference``,
the sequential family via ``compression.seqmodel.build_model``), so every later technique
finds the same layer names. The loop computes the teacher's logits (and,
for feature distillation, its hidden representation) on the fly for each batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tqdm.auto import tqdm

from compression.data import Dataset
from compression.model import build_reference
from compression.seqmodel import architecture_of, build_model
from compression.techniques.base import TechniqueError
from compression.techniques.common import model_window, training_arrays

_LOGGER = logging.getLogger(__name__)


def kd_loss(labels: tf.Tensor, student_logits: tf.Tensor, teacher_logits: tf.Tensor,
            alpha: float, temperature: float) -> tf.Tensor:
    """alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T)), batch mean.

    The T^2 factor keeps the soft term's gradient scale independent of T (Hinton et al. 2015).
    """
    hard = tf.reduce_mean(
        keras.losses.sparse_categorical_crossentropy(labels, student_logits, from_logits=True))
    t_log = tf.nn.log_softmax(teacher_logits / temperature, axis=-1)
    s_log = tf.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = tf.reduce_mean(tf.reduce_sum(tf.exp(t_log) * (t_log - s_log), axis=-1))
    return alpha * hard + (1.0 - alpha) * temperature ** 2 * kl


@dataclass(frozen=True)
class StudentShape:
    """Sizes of the student recommender (the MLP reference is dim 64, hidden 256).

    ``fpmc_dim``/``blocks``/``heads`` shrink a sequential teacher's FPMC term and attention
    (None keeps the teacher's); the MLP ignores them.
    """

    dim: int = 32
    hidden: int = 128
    fpmc_dim: int | None = None
    blocks: int | None = None
    heads: int | None = None


def build_student(teacher: keras.Model, num_items: int, shape: StudentShape, seed: int = 0) -> keras.Model:
    """A fresh reference-architecture model with the teacher's window and smaller sizes."""
    n_out = int(teacher.outputs[0].shape[-1])
    if n_out != num_items + 1:
        raise TechniqueError(f"teacher outputs {n_out} logits but the dataset has {num_items} items "
                             "(+1 for padding)")
    keras.utils.set_random_seed(seed)
    arch = architecture_of(teacher)
    if arch.kind == "mlp":
        return build_reference(num_items, window=model_window(teacher), dim=shape.dim, hidden=shape.hidden)
    changes = {"dim": shape.dim} | {key: getattr(shape, key) for key in ("fpmc_dim", "blocks", "heads")
                                    if getattr(shape, key) is not None}
    if arch.kind == "fpmc":
        changes = {"fpmc_dim": shape.fpmc_dim or shape.dim}
    return build_model(num_items, arch.replace(**changes), window=model_window(teacher))


def check_alpha_temperature(alpha: float, temperature: float) -> None:
    """alpha weighs the hard loss and must be in [0, 1]; T must be positive."""
    if not 0.0 <= alpha <= 1.0:
        raise TechniqueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise TechniqueError(f"temperature must be > 0, got {temperature}")


# loss(labels, student outputs, teacher outputs) -> scalar; outputs are lists of tensors.
LossFn = Callable[[tf.Tensor, list, list], tf.Tensor]


def train_student(student: keras.Model, teacher: keras.Model, dataset: Dataset, loss_fn: LossFn, *,
                  epochs: float, batch_size: int = 256, learning_rate: float = 2e-3,
                  extra_variables: list[tf.Variable] | None = None, max_pairs: int | None = None,
                  seed: int = 0, desc: str = "distill") -> list[float]:
    """Minimise ``loss_fn`` over the training pairs; ``student``/``teacher`` may have several outputs.

    Returns the mean loss of each tenth of training (a short learning curve for the notes).
    """
    x, y = training_arrays(dataset, model_window(student), max_pairs=max_pairs, seed=seed)
    steps = max(1, int(round(epochs * len(x) / batch_size)))
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(x)) for _ in range(int(np.ceil(epochs)) + 1)])
    # Cosine decay to 5% lets the last epochs refine instead of bouncing around (as the reference).
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps, alpha=0.05)
    optimizer = keras.optimizers.Adam(schedule)
    variables = list(student.trainable_variables) + list(extra_variables or [])

    @tf.function(reduce_retracing=True)
    def step(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
        t_out = teacher(xb, training=False)
        t_out = t_out if isinstance(t_out, (list, tuple)) else [t_out]
        with tf.GradientTape() as tape:
            s_out = student(xb, training=True)
            s_out = s_out if isinstance(s_out, (list, tuple)) else [s_out]
            loss = loss_fn(yb, list(s_out), [tf.stop_gradient(t) for t in t_out])
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    losses = []
    for i in tqdm(range(steps), desc=desc, leave=False, mininterval=2.0, disable=None):
        idx = order[i * batch_size:(i + 1) * batch_size]
        losses.append(float(step(tf.constant(x[idx]), tf.constant(y[idx]))))
    curve = [float(np.mean(chunk)) for chunk in np.array_split(np.array(losses), min(10, len(losses)))]
    _LOGGER.info("%s: %d steps, loss %.4f -> %.4f", desc, steps, curve[0], curve[-1])
    return curve
