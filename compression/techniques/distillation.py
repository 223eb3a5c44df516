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
    (None keeps the teacher's); the MLP ignores them. ``kind`` switches a sequential teacher's
    student to another sequential kind (e.g. "fpmc": transition terms only). ``warm_start`` starts a sequential
    student from the teacher (``warm_start_student``) instead of a random init.
    """

    dim: int = 32
    hidden: int = 128
    fpmc_dim: int | None = None
    blocks: int | None = None
    heads: int | None = None
    warm_start: bool = False
    kind: str | None = None


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
    if shape.kind is not None:
        if shape.kind == "mlp":
            raise TechniqueError("a sequential teacher's student cannot be an MLP; use the MLP base")
        changes["kind"] = shape.kind
    if changes.get("kind", arch.kind) == "fpmc":
        changes = {"kind": "fpmc", "fpmc_dim": shape.fpmc_dim or shape.dim}
    student = build_model(num_items, arch.replace(**changes), window=model_window(teacher))
    if shape.warm_start:
        warm_start_student(student, teacher)
    return student


def low_rank_pair(left: np.ndarray, right: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [n, r], B [m, r]) with A @ B.T the best rank-r approximation of left @ right.T (via QR + SVD)."""
    q_l, r_l = np.linalg.qr(left.astype(np.float64))
    q_r, r_r = np.linalg.qr(right.astype(np.float64))
    u, s, vt = np.linalg.svd(r_l @ r_r.T)
    root = np.sqrt(s[:rank])
    return (q_l @ u[:, :rank] * root).astype(np.float32), (q_r @ vt[:rank].T * root).astype(np.float32)


def warm_start_student(student: keras.Model, teacher: keras.Model) -> dict:
    """Copy what fits from a sequential teacher into a smaller student of the same family.

    The transition terms' catalogue offsets, repeat weights and item bias are copied exactly;
    the FPMC factors become the best rank-f approximation of the teacher's last -> next map;
    the tied item table is projected on its top principal directions. The attention/GRU
    weights keep their fresh init (their width changed); distillation trains everything.
    """
    names = {layer.name for layer in student.layers}
    if "transitions" not in names:
        raise TechniqueError(f"warm start needs a sequential student; {student.name!r} has no transition terms")
    t_heads, s_heads = teacher.get_layer("transitions"), student.get_layer("transitions")
    teacher_w = {w.name.split("/")[-1].split(":")[0]: w.numpy() for w in t_heads.weights}
    notes = {}
    for weight in s_heads.weights:
        key = weight.name.split("/")[-1].split(":")[0]
        if key in ("offsets", "repeats", "item_bias") and teacher_w[key].shape == tuple(weight.shape):
            weight.assign(teacher_w[key])
            notes[key] = "copied"
    if s_heads.fpmc_dim and t_heads.fpmc_dim:
        rank = min(s_heads.fpmc_dim, t_heads.fpmc_dim)
        last, nxt = low_rank_pair(teacher_w["last_factors"], teacher_w["next_factors"], rank)
        pad = s_heads.fpmc_dim - rank
        s_heads.last_factors.assign(np.pad(last, ((0, 0), (0, pad))))
        s_heads.next_factors.assign(np.pad(nxt, ((0, 0), (0, pad))))
        notes["fpmc"] = f"rank-{rank} factorisation of the teacher's map"
    if "item_embedding" in names and "item_embedding" in {layer.name for layer in teacher.layers}:
        table = teacher.get_layer("item_embedding").table().numpy()
        if student.get_layer("item_embedding").rank or student.get_layer("item_embedding").cp:
            raise TechniqueError("warm start fills a dense student table; factorise the student afterwards")
        target = student.get_layer("item_embedding").embeddings
        dim = int(target.shape[1])
        _, _, vt = np.linalg.svd(table - table.mean(axis=0), full_matrices=False)
        target.assign((table @ vt[:dim].T).astype(np.float32)[:, :dim] if dim <= vt.shape[0]
                      else np.pad(table, ((0, 0), (0, dim - table.shape[1]))))
        notes["item_embedding"] = f"projected on the top {min(dim, vt.shape[0])} principal directions"
    _LOGGER.info("warm start: %s", notes)
    return notes


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
