"""Sequential next-item recommenders: SASRec-style self-attention, GRU4Rec-style GRU and a
factorised Markov chain (FPMC), each with explicit last-item transition terms.

Why the transition terms: within an invoice, lines follow catalogue (stock-code) order and the
held-out item is the last line, so "what follows the last item" carries most of the signal
(/work/shared/notes/quality.md). ``TransitionHeads`` adds three cheap, learned scores to
the sequence model's logits, all in the same TFLite graph:

- FPMC (Rendle et al. 2010): ``<M[last], T[j]> + b[j]``, a low-rank last-item -> next-item map;
- catalogue offset: a learned bias per (position, clip(j - item at that position)) for the last
  few positions. Model indices follow sorted stock codes (``compression.data``), so ``j - i`` is
  the catalogue-rank offset and needs no extra table;
- repeat: a learned weight per window position added to the items already in the history.

Every model maps int32 ``history`` [B, L] (left-padded with 0, newest last) to logits
[B, V+1] like the MLP reference, so export, the agent and the search treat them alike.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import tensorflow as tf
import tf_keras as keras

from compression.model import INPUT_NAME, build_reference

_LOGGER = logging.getLogger(__name__)

ARCHITECTURES = ("mlp", "sasrec", "gru", "fpmc")
MASK_PENALTY = 30.0
_PACKAGE = "edgeguide"


@dataclass(frozen=True)
class Architecture:
    """The shape of a recommender; ``kind`` is one of ``ARCHITECTURES``.

    ``hidden`` is the MLP's hidden width (unused by the others); ``fpmc_dim`` 0 drops the FPMC
    term, ``offset_window`` 0 the catalogue offsets, ``repeat`` False the repeat weights.
    ``item_rank`` > 0 stores the tied item table as two factors [V+1, r] x [r, dim] (truncated
    SVD); ``item_cp`` > 0 as a rank-R CP tensor (``ItemTable``); both 0 = a dense table.
    """

    kind: str = "sasrec"
    dim: int = 64
    hidden: int = 256
    blocks: int = 2
    heads: int = 2
    fpmc_dim: int = 32
    offset_window: int = 8
    offset_positions: int = 3
    repeat: bool = True
    dropout: float = 0.2
    item_rank: int = 0
    item_cp: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.kind!r}")
        for name in ("dim", "hidden", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"Architecture.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("blocks", "fpmc_dim", "offset_window", "offset_positions", "item_rank", "item_cp"):
            if getattr(self, name) < 0:
                raise ValueError(f"Architecture.{name} must be >= 0, got {getattr(self, name)}")
        if self.kind == "sasrec" and self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be a multiple of heads {self.heads}")
        if self.kind == "fpmc" and not self.fpmc_dim:
            raise ValueError("the fpmc architecture needs fpmc_dim >= 1")
        if self.item_rank and self.item_cp:
            raise ValueError("item_rank and item_cp are two ways to factorise the table: set one")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> Architecture:
        """A copy with some fields changed (e.g. a smaller student)."""
        return dataclasses.replace(self, **changes)


def cp_grid(rows: int) -> tuple[int, int]:
    """(a, b) with a * b >= rows, both near sqrt(rows): item i sits at (i // b, i % b) of the CP tensor."""
    a = math.isqrt(max(rows - 1, 0)) + 1
    return a, -(-rows // a)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ItemTable(keras.layers.Layer):
    """One item table used twice (tied): ``mode="embed"`` looks ids up, ``"logits"`` scores all items.

    Three storages of the same [rows, dim] table: dense; ``rank`` r > 0: ``embeddings`` [rows, r]
    times ``projection`` [r, dim] (r (rows + dim) numbers); ``cp`` R > 0: the table reshaped to
    [a, b, dim] as a rank-R CP tensor with factors [a, R], [b, R], [dim, R] ((a + b + dim) R
    numbers). The CP scores of all items are computed from the factors at inference
    ([B, a, R] x [R, b]), so the converter cannot fold the full table back into the graph.
    """

    def __init__(self, rows: int, dim: int, rank: int = 0, cp: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rows, self.dim, self.rank, self.cp = rows, dim, rank, cp

    def build(self, input_shape) -> None:
        normal = keras.initializers.RandomNormal(stddev=0.05)
        if self.cp:
            a, b = cp_grid(self.rows)
            self.factor_a = self.add_weight(name="factor_a", shape=(a, self.cp), initializer=normal)
            self.factor_b = self.add_weight(name="factor_b", shape=(b, self.cp), initializer=normal)
            self.factor_c = self.add_weight(name="factor_c", shape=(self.dim, self.cp), initializer=normal)
        else:
            width = self.rank or self.dim
            self.embeddings = self.add_weight(name="embeddings", shape=(self.rows, width), initializer=normal)
            if self.rank:
                self.projection = self.add_weight(name="projection", shape=(self.rank, self.dim),
                                                  initializer=normal)
        super().build(input_shape)

    def call(self, inputs: tf.Tensor, mode: str = "embed") -> tf.Tensor:
        if self.cp:
            return self._cp_embed(inputs) if mode == "embed" else self._cp_logits(inputs)
        if mode == "embed":
            rows = tf.gather(self.embeddings, inputs)
            return tf.matmul(rows, self.projection) if self.rank else rows
        if self.rank:
            inputs = tf.matmul(inputs, self.projection, transpose_b=True)
        # TFLite turns this into a FULLY_CONNECTED over the same constant the GATHER reads; an
        # int8 export stores it twice (the two ops quantize it differently), float exports once.
        return tf.matmul(inputs, self.embeddings, transpose_b=True)

    def _cp_embed(self, ids: tf.Tensor) -> tf.Tensor:
        cols = cp_grid(self.rows)[1]
        mixed = tf.gather(self.factor_a, ids // cols) * tf.gather(self.factor_b, ids % cols)
        return tf.matmul(mixed, self.factor_c, transpose_b=True)

    def _cp_logits(self, user: tf.Tensor) -> tf.Tensor:
        a, b = cp_grid(self.rows)
        weighted = tf.matmul(user, self.factor_c)[:, None, :] * self.factor_a[None]       # [B, a, R]
        scores = tf.matmul(weighted, tf.broadcast_to(self.factor_b[None], (tf.shape(user)[0], b, self.cp)),
                           transpose_b=True)                                                # [B, a, b]
        return tf.reshape(scores, (-1, a * b))[:, :self.rows]

    def table(self) -> tf.Tensor:
        """The [rows, dim] table this storage represents (for checks and for refactoring)."""
        if self.cp:
            return self._cp_embed(tf.range(self.rows))
        return tf.matmul(self.embeddings, self.projection) if self.rank else tf.convert_to_tensor(self.embeddings)

    def get_config(self) -> dict:
        return super().get_config() | {"rows": self.rows, "dim": self.dim, "rank": self.rank, "cp": self.cp}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PositionEncoding(keras.layers.Layer):
    """Scaled item embeddings plus a learned embedding per window position; padding rows zeroed."""

    def __init__(self, window: int, dim: int, dropout: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.window, self.dim, self.dropout = window, dim, dropout
        self._drop = keras.layers.Dropout(dropout)

    def build(self, input_shape) -> None:
        self.positions = self.add_weight(name="positions", shape=(self.window, self.dim),
                                         initializer=keras.initializers.RandomNormal(stddev=0.05))
        super().build(input_shape)

    def call(self, inputs: list[tf.Tensor], training: bool | None = None) -> tf.Tensor:
        items, history = inputs
        mask = tf.cast(history > 0, items.dtype)[..., None]
        x = items * (self.dim ** 0.5) + self.positions[None]
        return self._drop(x, training=training) * mask

    def get_config(self) -> dict:
        return super().get_config() | {"window": self.window, "dim": self.dim, "dropout": self.dropout}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AttentionBlock(keras.layers.Layer):
    """Pre-norm self-attention + feed-forward block over the window (SASRec, Kang & McAuley 2018).

    Padded keys get ``MASK_PENALTY`` subtracted from their scores: e^-30 is nil next to any
    real key, yet the constant stays small enough for int8 calibration ranges (-inf/-1e9 would
    wreck them). No division: an int8 DIV by a zero sum (all-padding history) aborts the
    interpreter. Padded query rows are zeroed, so an empty history yields zeros.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-6, name="norm1")
        self.query = keras.layers.Dense(dim, name="query")
        self.key = keras.layers.Dense(dim, name="key")
        self.value = keras.layers.Dense(dim, name="value")
        self.out = keras.layers.Dense(dim, name="attention_out")
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-6, name="norm2")
        self.ffn_in = keras.layers.Dense(dim, activation="relu", name="ffn_in")
        self.ffn_out = keras.layers.Dense(dim, name="ffn_out")
        self._drop = keras.layers.Dropout(dropout)

    def _split(self, x: tf.Tensor, window: int) -> tf.Tensor:
        head = self.dim // self.heads
        return tf.transpose(tf.reshape(x, (-1, window, self.heads, head)), (0, 2, 1, 3))

    def _attend(self, x: tf.Tensor, history: tf.Tensor, training: bool | None) -> tf.Tensor:
        window = int(x.shape[1])
        valid = tf.cast(history > 0, x.dtype)
        y = self.norm1(x)
        q, k, v = (self._split(layer(y), window) for layer in (self.query, self.key, self.value))
        scores = tf.matmul(q, k, transpose_b=True) * ((self.dim // self.heads) ** -0.5)
        weights = tf.nn.softmax(scores - MASK_PENALTY * (1.0 - valid[:, None, None, :]), axis=-1)
        attended = tf.reshape(tf.transpose(tf.matmul(weights, v), (0, 2, 1, 3)), (-1, window, self.dim))
        return x + self._drop(self.out(attended), training=training)

    def call(self, inputs: list[tf.Tensor], training: bool | None = None) -> tf.Tensor:
        x, history = inputs
        x = self._attend(x, history, training)
        y = self.ffn_out(self.ffn_in(self.norm2(x)))
        return (x + self._drop(y, training=training)) * tf.cast(history > 0, x.dtype)[..., None]

    def ffn_hidden(self, x: tf.Tensor, history: tf.Tensor) -> tf.Tensor:
        """The feed-forward units' (ReLU) activations for block input ``x``: what activation pruning ranks."""
        return self.ffn_in(self.norm2(self._attend(x, history, training=False)))

    def get_config(self) -> dict:
        return super().get_config() | {"dim": self.dim, "heads": self.heads, "dropout": self.dropout}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LastStep(keras.layers.Layer):
    """The newest position's vector: [B, L, d] -> [B, d]."""

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return inputs[:, -1, :]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TransitionHeads(keras.layers.Layer):
    """FPMC + catalogue-offset + repeat scores of every item given the history, [B, V+1]."""

    def __init__(self, rows: int, window: int, fpmc_dim: int, offset_window: int, offset_positions: int,
                 repeat: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rows, self.window, self.fpmc_dim = rows, window, fpmc_dim
        self.offset_window, self.offset_positions, self.repeat = offset_window, offset_positions, repeat

    def build(self, input_shape) -> None:
        normal = keras.initializers.RandomNormal(stddev=0.05)
        if self.fpmc_dim:
            self.last_factors = self.add_weight(name="last_factors", shape=(self.rows, self.fpmc_dim),
                                                initializer=normal)
            self.next_factors = self.add_weight(name="next_factors", shape=(self.rows, self.fpmc_dim),
                                                initializer=normal)
        self.item_bias = self.add_weight(name="item_bias", shape=(self.rows,), initializer="zeros")
        if self.offset_window and self.offset_positions:
            self.offsets = self.add_weight(
                name="offsets", shape=(min(self.offset_positions, self.window), 2 * self.offset_window + 3),
                initializer="zeros")
        if self.repeat:
            self.repeats = self.add_weight(name="repeats", shape=(self.window,), initializer="zeros")
        super().build(input_shape)

    def catalogue(self, history: tf.Tensor) -> tf.Tensor:
        """Every item index, int32 [rows], made by a RANGE op at run time.

        Its start is 0 for any valid history (ids >= 0) but depends on the input, so the converter cannot fold
        the range into a [rows] int32 constant (4 bytes per item in the .tflite).
        """
        start = tf.minimum(tf.reduce_min(history), 0)
        return tf.range(start, start + self.rows, dtype=history.dtype)

    def call(self, history: tf.Tensor) -> tf.Tensor:
        items = self.catalogue(history)
        # A GATHER over the run-time range, not the bias itself: the converter stores GATHER params
        # in int8 under dynamic-range quantization, an FC/ADD bias stays float32 (4 bytes per item).
        bias = tf.gather(self.item_bias, items)
        scores = tf.broadcast_to(bias[None, :], (tf.shape(history)[0], self.rows))
        if self.fpmc_dim:
            # indicator x table rather than a GATHER: the .tflite then reads the "last" factors only
            # through a FULLY_CONNECTED, which runs int4 weights (export mode dynamic-int4). Built
            # from the run-time range, not tf.one_hot, which the converter turns back into a lookup.
            newest = tf.cast(tf.equal(items[None, :], history[:, -1:]), self.last_factors.dtype)
            last = tf.matmul(newest, self.last_factors)
            scores = scores + tf.matmul(last, self.next_factors, transpose_b=True)
        if self.offset_window and self.offset_positions:
            # offsets -w-1 and w+1 collect everything farther away than w in either direction
            w = self.offset_window
            for k in range(min(self.offset_positions, self.window)):
                at = history[:, self.window - 1 - k:self.window - k]
                index = tf.clip_by_value(items[None, :] - at, -w - 1, w + 1) + (w + 1)
                scores = scores + tf.gather(self.offsets[k], index) * tf.cast(at > 0, scores.dtype)
        if self.repeat:
            seen = tf.one_hot(history, self.rows, dtype=scores.dtype)  # padding column is sliced off later
            scores = scores + tf.reduce_sum(seen * self.repeats[None, :, None], axis=1)
        return scores

    def get_config(self) -> dict:
        return super().get_config() | {
            "rows": self.rows, "window": self.window, "fpmc_dim": self.fpmc_dim,
            "offset_window": self.offset_window, "offset_positions": self.offset_positions,
            "repeat": self.repeat}


def build_model(num_items: int, arch: Architecture, window: int = 20) -> keras.Model:
    """Build a recommender of architecture ``arch``: int32 history [B, window] -> logits [B, V+1]."""
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if arch.kind == "mlp":
        return build_reference(num_items, window, arch.dim, arch.hidden)
    rows = num_items + 1
    history = keras.Input(shape=(window,), dtype="int32", name=INPUT_NAME)
    heads = TransitionHeads(rows, window, arch.fpmc_dim, arch.offset_window, arch.offset_positions,
                            arch.repeat, name="transitions")(history)
    if arch.kind == "fpmc":
        logits = heads
    else:
        table = ItemTable(rows, arch.dim, arch.item_rank, arch.item_cp, name="item_embedding")
        items = table(history)
        if arch.kind == "sasrec":
            x = PositionEncoding(window, arch.dim, arch.dropout, name="positions")([items, history])
            for b in range(arch.blocks):
                x = AttentionBlock(arch.dim, arch.heads, arch.dropout, name=f"block{b}")([x, history])
            user = LastStep(name="last_step")(keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x))
        else:
            x = keras.layers.Dropout(arch.dropout, name="input_dropout")(items)
            # unrolled: a static chain of ops every TFLite runtime runs (no WHILE / TensorList ops)
            user = keras.layers.GRU(arch.dim, unroll=True, name="gru")(x)
        logits = keras.layers.Add(name="logits")([table(user, mode="logits"), heads])
    model = keras.Model(history, logits, name=f"edgeguide_{arch.kind}")
    _LOGGER.debug("built %s: V=%d L=%d params=%d", arch, num_items, window, model.count_params())
    return model


def architecture_of(model: keras.Model) -> Architecture:
    """Read an ``Architecture`` back from a built model's layers (students keep their teacher's kind)."""
    kind = model.name.removeprefix("edgeguide_")
    if kind in ("reference",):
        kind = "mlp"
    names = {layer.name: layer for layer in model.layers}
    if kind == "mlp" or "hidden" in names and "transitions" not in names:
        emb = names.get("item_embedding")
        return Architecture(kind="mlp", dim=int(emb.output_dim) if emb is not None else 64,
                            hidden=int(names["hidden"].units) if "hidden" in names else 256)
    if "transitions" not in names:
        raise ValueError(f"model {model.name!r} is not an EdgeGuide recommender")
    heads = names["transitions"]
    fields = {"fpmc_dim": heads.fpmc_dim, "offset_window": heads.offset_window,
              "offset_positions": heads.offset_positions, "repeat": heads.repeat}
    if "item_embedding" in names:
        table = names["item_embedding"]
        fields |= {"dim": table.dim, "item_rank": table.rank, "item_cp": table.cp}
    blocks = [layer for layer in model.layers if isinstance(layer, AttentionBlock)]
    if blocks:
        fields |= {"kind": "sasrec", "blocks": len(blocks), "heads": blocks[0].heads,
                   "dropout": blocks[0].dropout}
    elif "gru" in names:
        fields["kind"] = "gru"
    else:
        fields["kind"] = "fpmc"
    return Architecture(**fields)
