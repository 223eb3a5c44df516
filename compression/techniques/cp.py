"""CP (CANDECOMP/PARAFAC) decomposition of the item embedding table (technique ``cp``).

The table [N, d] is zero-padded to a*b rows and reshaped into a 3-way tensor [a, b, d]
(row i -> (i // b, i % b)); tensorly's ``parafac`` approximates it by rank-R factors
A [a, R], B [b, R], C [d, R]. ``CPEmbedding`` rebuilds only the looked-up rows at inference:
row(i) = (A[i // b] * B[i % b]) @ C^T, using FLOOR_DIV/FLOOR_MOD, GATHER, MUL and a matmul,
all TFLite builtins. (a + b + d) R numbers replace N d.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorly as tl
import tf_keras as keras
from tensorly.decomposition import parafac

from compression.data import Dataset
from compression.techniques.base import StepResult, TechniqueError
from compression.techniques.common import LayerSpec, copy_specs, fine_tune, model_window, rebuild
from compression.techniques.svd import relative_error

_LOGGER = logging.getLogger(__name__)


def tensor_shape(rows: int) -> tuple[int, int]:
    """(a, b) with a * b >= rows and a, b as close to sqrt(rows) as possible."""
    if rows < 1:
        raise TechniqueError(f"rows must be >= 1, got {rows}")
    a = math.isqrt(rows - 1) + 1 if rows > 1 else 1
    return a, math.ceil(rows / a)


@keras.utils.register_keras_serializable(package="edgeguide")
class CPEmbedding(keras.layers.Layer):
    """An embedding whose table is a rank-R CP tensor; rows are rebuilt at lookup."""

    def __init__(self, input_dim: int, output_dim: int, rank: int, grid: tuple[int, int] | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.rank = int(rank)
        self.grid = tuple(grid) if grid is not None else tensor_shape(self.input_dim)
        if self.grid[0] * self.grid[1] < self.input_dim:
            raise TechniqueError(f"grid {self.grid} holds {self.grid[0] * self.grid[1]} rows, "
                                 f"fewer than input_dim {input_dim}")

    def build(self, input_shape) -> None:
        """Create the three factor matrices."""
        def init(seed: int) -> keras.initializers.Initializer:
            return keras.initializers.RandomUniform(-0.5, 0.5, seed=seed)

        shapes = {"factor_a": self.grid[0], "factor_b": self.grid[1], "factor_c": self.output_dim}
        for seed, (name, rows) in enumerate(shapes.items(), 1):
            setattr(self, name, self.add_weight(name=name, shape=(rows, self.rank), initializer=init(seed)))
        super().build(input_shape)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        """Rows of the CP table for int ids of any shape -> [..., output_dim]."""
        ids = tf.cast(ids, tf.int32)
        cols = self.grid[1]
        mixed = tf.gather(self.factor_a, ids // cols) * tf.gather(self.factor_b, ids % cols)
        flat = tf.reshape(mixed, [-1, self.rank])
        rows = tf.matmul(flat, self.factor_c, transpose_b=True)
        return tf.reshape(rows, tf.concat([tf.shape(ids), [self.output_dim]], axis=0))

    def compute_output_shape(self, input_shape):
        """Input shape plus the embedding width."""
        return tf.TensorShape(input_shape).concatenate([self.output_dim])

    def full_table(self) -> np.ndarray:
        """The reconstructed [input_dim, output_dim] table (for checks and notes)."""
        a, b, c = (w.numpy() for w in (self.factor_a, self.factor_b, self.factor_c))
        return np.einsum("ir,jr,dr->ijd", a, b, c).reshape(-1, self.output_dim)[: self.input_dim]

    def get_config(self) -> dict:
        """Config for clone/rebuild."""
        return super().get_config() | {"input_dim": self.input_dim, "output_dim": self.output_dim,
                                       "rank": self.rank, "grid": list(self.grid)}


def cp_factors(table: np.ndarray, rank: int, n_iter_max: int = 200,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """CP-decompose the tensorized table; returns (A, B, C, grid) with the CP weights folded into A."""
    rows, dim = table.shape
    grid = tensor_shape(rows)
    padded = np.zeros((grid[0] * grid[1], dim), dtype=np.float64)
    padded[:rows] = table
    tl.set_backend("numpy")
    weights, factors = parafac(tl.tensor(padded.reshape(grid[0], grid[1], dim)), rank=rank, init="svd",
                               n_iter_max=n_iter_max, random_state=seed, normalize_factors=False)
    a, b, c = factors
    return (a * weights[None, :]).astype(np.float32), b.astype(np.float32), c.astype(np.float32), grid


def cp_params(rows: int, dim: int, rank: int) -> int:
    """Numbers a rank-R CP embedding stores."""
    a, b = tensor_shape(rows)
    return (a + b + dim) * rank


@dataclass
class CPDecomposition:
    """Technique ``cp``: replace the item embedding by a CP-factored one, then fine-tune."""

    rank: int = 32
    layer: str = "item_embedding"
    epochs: float = 1.0
    learning_rate: float = 1e-3
    max_pairs: int | None = None
    name: str = "cp"

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Decompose the table, swap in ``CPEmbedding``, fine-tune all weights."""
        if self.rank < 1:
            raise TechniqueError(f"CP rank must be >= 1, got {self.rank}")
        from compression.techniques import sequential as seq

        if seq.is_sequential(model):
            return self._apply_sequential(model, dataset)
        specs = copy_specs(model)
        matches = [i for i, spec in enumerate(specs) if spec.layer.name == self.layer]
        if not matches or not isinstance(specs[matches[0]].layer, keras.layers.Embedding):
            raise TechniqueError(f"model {model.name!r} has no Embedding layer {self.layer!r}; "
                                 f"layers: {[s.layer.name for s in specs]}")
        i = matches[0]
        table = specs[i].weights[0]
        a, b, c, grid = cp_factors(table, self.rank)
        layer = CPEmbedding(table.shape[0], table.shape[1], self.rank, grid, name=self.layer)
        specs[i] = LayerSpec(layer, [a, b, c])
        factored = rebuild(model_window(model), specs, model.name)
        error_before = relative_error(table, factored.get_layer(self.layer).full_table())
        history = fine_tune(factored, dataset, epochs=self.epochs, learning_rate=self.learning_rate,
                            max_pairs=self.max_pairs)
        notes = {"rank": self.rank, "grid": list(grid), "table_shape": list(table.shape),
                 "params_before": int(table.size), "params_after": int(a.size + b.size + c.size),
                 "relative_error": error_before, "fine_tune": history}
        _LOGGER.info("cp rank %d on %s %s: %d -> %d numbers, relative error %.3f", self.rank, self.layer,
                     table.shape, table.size, a.size + b.size + c.size, error_before)
        return StepResult(factored, [self.name], notes)

    def _apply_sequential(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """The tied item table of a sequential model as a CP tensor (``Architecture.item_cp``)."""
        from compression.seqmodel import architecture_of
        from compression.techniques import sequential as seq

        if self.layer != "item_embedding" or "item_embedding" not in {la.name for la in model.layers}:
            raise TechniqueError(f"model {model.name!r}: CP applies to its tied item table 'item_embedding', "
                                 f"got layer {self.layer!r}")
        table = model.get_layer("item_embedding").table().numpy()
        a, b, c, grid = cp_factors(table, self.rank)
        factored = seq.rebuild(model, architecture_of(model).replace(item_cp=self.rank, item_rank=0))
        layer = factored.get_layer("item_embedding")
        layer.set_weights([a, b, c])
        error_before = relative_error(table, layer.table().numpy())
        history = fine_tune(factored, dataset, epochs=self.epochs, learning_rate=self.learning_rate,
                            max_pairs=self.max_pairs)
        _LOGGER.info("cp rank %d on the tied item table %s: %d -> %d numbers, relative error %.3f",
                     self.rank, table.shape, table.size, a.size + b.size + c.size, error_before)
        return StepResult(factored, [self.name], {
            "rank": self.rank, "grid": list(grid), "table_shape": list(table.shape), "tied": True,
            "params_before": int(table.size), "params_after": int(a.size + b.size + c.size),
            "relative_error": error_before, "fine_tune": history})
