"""Block pruning: drop whole attention blocks of a SASRec model, keep the ones the loss needs.

Why: below ~150 KB the fixed part of the graph (attention kernels, their ops and tensors) is a
third of the file, and per-unit pruning cannot remove ops. Measured on the full reference
(docs/compression.md): removing the second of two blocks, before any fine-tuning, left
validation NDCG@10 almost where it was. Each block is scored by the training-slice loss of
the model without it (calibration data only, never validation or test); the blocks whose
removal costs least go, the rest keep their weights, and the model is fine-tuned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tf_keras as keras

from compression.data import Dataset
from compression.seqmodel import Architecture, architecture_of
from compression.techniques import sequential as seq
from compression.techniques.base import StepResult, TechniqueError
from compression.techniques.common import fine_tune, model_window, training_arrays

_LOGGER = logging.getLogger(__name__)


def _with_blocks(model: keras.Model) -> Architecture:
    """The architecture of ``model``; a clear error when it has no attention blocks to prune."""
    arch = architecture_of(model)
    if arch.kind != "sasrec" or not arch.blocks:
        raise TechniqueError(f"block pruning needs attention blocks; {model.name!r} is a {arch.kind} model")
    return arch


def without_blocks(model: keras.Model, kept: list[int]) -> keras.Model:
    """A copy of a SASRec ``model`` holding only the attention blocks ``kept`` (in order), weights copied."""
    arch = _with_blocks(model)
    if not kept or any(not 0 <= b < arch.blocks for b in kept) or len(set(kept)) != len(kept):
        raise TechniqueError(f"blocks to keep must be distinct and in 0..{arch.blocks - 1}, got {kept}")
    out = seq.rebuild(model, arch.replace(blocks=len(kept)))  # every non-block layer copied by name
    for position, source in enumerate(sorted(kept)):
        out.get_layer(f"block{position}").set_weights(model.get_layer(f"block{source}").get_weights())
    return out


def mean_loss(model: keras.Model, histories: np.ndarray, targets: np.ndarray, batch_size: int = 512) -> float:
    """Mean next-item cross-entropy of ``model`` on (histories, targets)."""
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    total = 0.0
    for start in range(0, len(histories), batch_size):
        logits = model(histories[start:start + batch_size], training=False)
        total += float(loss(targets[start:start + batch_size], logits))
    return total / max(len(histories), 1)


@dataclass
class BlockPruning:
    """Technique ``prune-blocks``: keep the ``keep`` attention blocks whose removal would cost most.

    Blocks are scored one at a time (the loss without each, all others kept), not as a joint search over
    subsets: exact for keep = blocks - 1, the case the search uses.
    """

    keep: int = 1
    epochs: float = 1.0
    learning_rate: float = 5e-4
    calibration: int = 4096
    max_pairs: int | None = None
    name: str = "prune-blocks"

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Score every block by the loss without it, drop the cheapest, fine-tune the rest."""
        arch = _with_blocks(model)
        if not 1 <= self.keep < arch.blocks:
            raise TechniqueError(f"keep must be in 1..{arch.blocks - 1} for a model of {arch.blocks} blocks, "
                                 f"got {self.keep}")
        histories, targets = training_arrays(dataset, model_window(model), max_pairs=self.calibration, seed=1)
        base = mean_loss(model, histories, targets)
        without = {b: mean_loss(without_blocks(model, [k for k in range(arch.blocks) if k != b]), histories, targets)
                   for b in range(arch.blocks)}
        # keep the blocks whose removal raises the loss most
        kept = sorted(sorted(without, key=lambda b: without[b] - base, reverse=True)[:self.keep])
        pruned = without_blocks(model, kept)
        history = fine_tune(pruned, dataset, epochs=self.epochs, learning_rate=self.learning_rate,
                            max_pairs=self.max_pairs)
        _LOGGER.info("prune-blocks: kept %s of %d (calibration loss %.4f; without each block %s)",
                     kept, arch.blocks, base, {b: round(v, 4) for b, v in without.items()})
        notes = {"kept_blocks": kept, "blocks_before": arch.blocks, "calibration_pairs": int(len(histories)),
                 "loss": base, "loss_without_block": {str(b): v for b, v in without.items()},
                 "params_before": int(model.count_params()),
                 "params_after": int(pruned.count_params()), "fine_tune": history}
        return StepResult(pruned, [self.name], notes)
