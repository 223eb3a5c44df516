"""Weight-level editing of the sequential recommenders (SASRec/GRU/FPMC of ``compression.seqmodel``).

Their graph is not a single layer chain (history feeds the item table, the attention blocks and
the transition terms; the tied table is used twice), and their Dense layers live inside custom
layers where tfmot's per-layer wrappers cannot reach. So the techniques edit them through
their variables instead: a copy of the model is rebuilt from its ``Architecture``; pruning,
clustering and quantization-aware training keep a per-variable constraint (a mask, a codebook,
an int8 grid) that a training callback re-applies after every optimiser step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import tf_keras as keras

from compression.data import Dataset
from compression.seqmodel import Architecture, architecture_of, build_model
from compression.techniques.base import TechniqueError
from compression.techniques.common import fine_tune, model_window

_LOGGER = logging.getLogger(__name__)

# Matrices of a sequential model worth compressing: the (tied) item table factors, the FPMC
# factors and every Dense kernel of the attention blocks/GRU. Biases, norms, positions,
# catalogue offsets and repeat weights are tiny and sensitive.
_SKIP = ("positions", "offsets", "repeats", "item_bias", "bias", "gamma", "beta")


def is_sequential(model: keras.Model) -> bool:
    """True for the models of ``compression.seqmodel`` (they carry the ``transitions`` layer)."""
    return any(layer.name == "transitions" for layer in model.layers)


def num_items_of(model: keras.Model) -> int:
    """V, read from the transition terms (rows = V + 1 with the padding id 0)."""
    return int(model.get_layer("transitions").rows) - 1


def rebuild(model: keras.Model, arch: Architecture | None = None) -> keras.Model:
    """A new model of ``arch`` (default: the model's own) with every layer whose weights fit copied over."""
    arch = arch or architecture_of(model)
    out = build_model(num_items_of(model), arch, model_window(model))
    source = {layer.name: layer for layer in model.layers}
    for layer in out.layers:
        old = source.get(layer.name)
        if old is None or not layer.weights:
            continue
        weights = old.get_weights()
        if [w.shape for w in weights] == [tuple(w.shape) for w in layer.weights]:
            layer.set_weights(weights)
    return out


def matrices(model: keras.Model) -> dict[str, object]:
    """Variable name -> variable for the 2-D weight matrices worth compressing (see ``_SKIP``)."""
    out = {}
    for variable in model.weights:
        short = variable.name.split("/")[-1].split(":")[0]
        if len(variable.shape) == 2 and short not in _SKIP and "positions" not in variable.name:
            out[variable.name] = variable
    if not out:
        raise TechniqueError(f"model {model.name!r} has no weight matrix to compress")
    return out


def attention_kernels(model: keras.Model) -> dict[str, object]:
    """The Dense kernels inside the attention blocks (query/key/value/out, FFN)."""
    return {name: v for name, v in matrices(model).items() if name.startswith("block")}


class ConstraintCallback(keras.callbacks.Callback):
    """Re-applies ``project(step)`` after every optimiser step (masks, codebooks, grids)."""

    def __init__(self, project: Callable[[int], None]) -> None:
        super().__init__()
        self._project = project
        self._step = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._step += 1
        self._project(self._step)


def apply_masks(variables: dict[str, object], masks: dict[str, np.ndarray]) -> None:
    """Zero the masked-out weights in place."""
    for name, mask in masks.items():
        variables[name].assign(variables[name].numpy() * mask)


def global_magnitude_masks(variables: dict[str, object], sparsity: float) -> dict[str, np.ndarray]:
    """One |w| threshold over all the matrices so that ``sparsity`` of their weights fall below it."""
    values = {name: np.abs(v.numpy()) for name, v in variables.items()}
    if sparsity <= 0:
        return {name: np.ones_like(a) for name, a in values.items()}
    threshold = np.quantile(np.concatenate([a.ravel() for a in values.values()]), sparsity)
    return {name: (a > threshold).astype(np.float32) for name, a in values.items()}


def sparsity_of(variables: dict[str, object]) -> float:
    """Fraction of exact zeros over the matrices."""
    arrays = [v.numpy() for v in variables.values()]
    return float(sum(int(np.count_nonzero(a == 0)) for a in arrays) / sum(a.size for a in arrays))


def constrained_fine_tune(model: keras.Model, dataset: Dataset, project: Callable[[int], None], *,
                          epochs: float, learning_rate: float, max_pairs: int | None = None) -> dict:
    """Fine-tune with ``project`` applied after every step and once more at the end."""
    project(0)
    history = fine_tune(model, dataset, epochs=epochs, learning_rate=learning_rate,
                        callbacks=[ConstraintCallback(project)], max_pairs=max_pairs)
    project(-1)
    return history


def ffn_units(model: keras.Model) -> dict[str, tuple[object, object, object]]:
    """Per attention block: (ffn_in kernel, ffn_in bias, ffn_out kernel): unit j is column j / row j."""
    blocks = [layer for layer in model.layers if layer.name.startswith("block")]
    if not blocks:
        raise TechniqueError(f"model {model.name!r} has no attention block with feed-forward units "
                             f"(architecture {architecture_of(model).kind}); structured pruning needs one")
    return {b.name: (b.ffn_in.kernel, b.ffn_in.bias, b.ffn_out.kernel) for b in blocks}


def unit_masks(scores: dict[str, np.ndarray], keep: float) -> dict[str, np.ndarray]:
    """Per block, 1 for the ``keep`` fraction of units with the highest scores (at least one)."""
    if not 0.0 < keep <= 1.0:
        raise TechniqueError(f"keep fraction must be in (0, 1], got {keep}")
    out = {}
    for name, score in scores.items():
        n = max(1, int(round(keep * len(score))))
        mask = np.zeros(len(score), dtype=np.float32)
        mask[np.argsort(-score, kind="stable")[:n]] = 1.0
        out[name] = mask
    return out


def structured_mask_tune(model: keras.Model, dataset: Dataset, scores: dict[str, np.ndarray], keep: float,
                         *, epochs: float, learning_rate: float = 5e-4,
                         max_pairs: int | None = None) -> tuple[keras.Model, dict]:
    """Mask the weakest FFN units of every block (column of ffn_in, its bias, row of ffn_out), fine-tune.

    The units are masked, not cut: the FFN is 1-2 % of the model's weights, so a narrower
    graph would not change the size this search is judged on; the notes say so.
    """
    out = rebuild(model)
    units = ffn_units(out)
    masks = unit_masks(scores, keep)

    def project(_: int) -> None:
        for name, (kernel_in, bias_in, kernel_out) in units.items():
            m = masks[name]
            kernel_in.assign(kernel_in.numpy() * m[None, :])
            bias_in.assign(bias_in.numpy() * m)
            kernel_out.assign(kernel_out.numpy() * m[:, None])

    history = constrained_fine_tune(out, dataset, project, epochs=epochs, learning_rate=learning_rate,
                                    max_pairs=max_pairs)
    kept = {name: int(m.sum()) for name, m in masks.items()}
    ffn_params = sum(int(k.shape[0] * k.shape[1]) * 2 for k, _, _ in units.values())
    notes = {"kept_units": kept, "units": {n: len(m) for n, m in masks.items()}, "fine_tune": history,
             "scope": "feed-forward units of each attention block, masked (the FFN holds "
                      f"{ffn_params} of {int(model.count_params())} weights: cutting it would not move the size)"}
    return out, notes
