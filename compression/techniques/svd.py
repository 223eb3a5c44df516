"""Truncated-SVD low-rank factorisation of Dense kernels and the item embedding table.

W [m, n] ~= U_r S_r V_r^T is stored as two factors A = U_r S_r [m, r] and B = V_r^T [r, n],
i.e. r (m + n) numbers instead of m n. Each replaced layer becomes two plain layers:
Dense(r, no bias) -> Dense(n, bias, activation), or Embedding(V+1, r) -> Dense(d, no bias) for
the table, which export to FULLY_CONNECTED/GATHER builtins every runtime loads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import tf_keras as keras

from compression.data import Dataset
from compression.techniques.base import StepResult, TechniqueError
from compression.techniques.common import (
    LayerSpec,
    chain_layers,
    copy_specs,
    fine_tune,
    model_window,
    rebuild,
)

_LOGGER = logging.getLogger(__name__)

# Per-layer rank rule: {"energy": 0.9} (retained sum of squared singular values),
# {"ratio": 0.25} (factor size / original size), or {"rank": 16}.
DEFAULT_RULES = {"item_embedding": {"ratio": 0.25}, "hidden": {"ratio": 0.25}, "logits": {"ratio": 0.25}}
# Sequential models: the tied item table ([V+1, d] -> [V+1, r] x [r, d]) and the FPMC map
# last_factors @ next_factors^T (its "ratio" is the fraction of the FPMC width kept).
SEQUENTIAL_RULES = {"item_embedding": {"ratio": 0.5}, "transitions": {"ratio": 0.5}}


def rank_for_energy(singular_values: np.ndarray, energy: float) -> int:
    """Smallest r whose top-r singular values keep ``energy`` of sum(s^2)."""
    if not 0.0 < energy <= 1.0:
        raise TechniqueError(f"energy must be in (0, 1], got {energy}")
    s2 = np.square(np.asarray(singular_values, dtype=np.float64))
    if s2.sum() == 0:
        return 1
    kept = np.cumsum(s2) / s2.sum()
    return int(min(len(s2), np.searchsorted(kept, energy - 1e-12) + 1))


def rank_for_size(shape: tuple[int, int], ratio: float) -> int:
    """Largest r (>= 1) with r (m + n) <= ratio * m * n."""
    if ratio <= 0.0:
        raise TechniqueError(f"size ratio must be > 0, got {ratio}")
    m, n = shape
    return int(max(1, min(min(m, n), np.floor(ratio * m * n / (m + n)))))


def choose_rank(matrix: np.ndarray, singular_values: np.ndarray, rule: Mapping[str, float]) -> int:
    """Apply one rank rule (see ``DEFAULT_RULES``)."""
    if len(rule) != 1:
        raise TechniqueError(f"a rank rule has exactly one of 'energy', 'ratio', 'rank'; got {dict(rule)}")
    (kind, value), = rule.items()
    if kind == "energy":
        return rank_for_energy(singular_values, value)
    if kind == "ratio":
        return rank_for_size(matrix.shape, value)
    if kind == "rank":
        if not 1 <= int(value) <= min(matrix.shape):
            raise TechniqueError(f"rank must be in [1, {min(matrix.shape)}] for shape {matrix.shape}, "
                                 f"got {value}")
        return int(value)
    raise TechniqueError(f"unknown rank rule {kind!r}; use 'energy', 'ratio' or 'rank'")


def truncated_svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A [m, r], B [r, n], all singular values) with A @ B the best rank-r approximation."""
    u, s, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]).astype(np.float32), vt[:rank].astype(np.float32), s


def relative_error(matrix: np.ndarray, approx: np.ndarray) -> float:
    """Frobenius ||W - W_r|| / ||W||."""
    return float(np.linalg.norm(matrix - approx) / max(np.linalg.norm(matrix), 1e-12))


def factorize(model: keras.Model, rules: Mapping[str, Mapping[str, float]]) -> tuple[keras.Model, dict]:
    """Replace each named Dense/Embedding layer by its two SVD factors; returns (model, per-layer notes)."""
    specs = copy_specs(model)
    names = [layer.name for layer in chain_layers(model)]
    notes = {}
    out: list[LayerSpec] = []
    for spec in specs:
        name = spec.layer.name
        if name not in rules:
            out.append(spec)
            continue
        matrix = spec.weights[0]
        if type(spec.layer) not in (keras.layers.Dense, keras.layers.Embedding):
            raise TechniqueError(f"layer {name!r} is a {type(spec.layer).__name__}; "
                                 "SVD needs Dense or Embedding")
        s_all = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
        rank = choose_rank(matrix, s_all, rules[name])
        a, b, _ = truncated_svd(matrix, rank)
        notes[name] = {"shape": list(matrix.shape), "rank": rank, "params_before": int(matrix.size),
                       "params_after": int(a.size + b.size), "relative_error": relative_error(matrix, a @ b),
                       "energy": float(np.sum(s_all[:rank] ** 2) / np.sum(s_all ** 2))}
        if isinstance(spec.layer, keras.layers.Embedding):
            table = keras.layers.Embedding(matrix.shape[0], rank, name=name)
            up = keras.layers.Dense(matrix.shape[1], use_bias=False, name=f"{name}_up")
            out += [LayerSpec(table, [a]), LayerSpec(up, [b])]
        else:
            down = keras.layers.Dense(rank, use_bias=False, name=f"{name}_down")
            config = spec.layer.get_config()
            config["name"] = name
            up = keras.layers.Dense.from_config(config)
            out += [LayerSpec(down, [a]), LayerSpec(up, [b] + spec.weights[1:])]
    unknown = sorted(set(rules) - set(names))
    if unknown:
        raise TechniqueError(f"SVD rules name layers {unknown} the model does not have; layers: {names}")
    return rebuild(model_window(model), out, model.name), notes


def factorize_sequential(model: keras.Model, rules: Mapping[str, Mapping[str, float]]) -> tuple[keras.Model, dict]:
    """Low-rank tied item table (``Architecture.item_rank``) and FPMC map of a sequential model."""
    from compression.seqmodel import architecture_of
    from compression.techniques import sequential as seq
    from compression.techniques.distillation import low_rank_pair

    unknown = sorted(set(rules) - set(SEQUENTIAL_RULES))
    if unknown:
        raise TechniqueError(f"SVD rules name {unknown}; a sequential model takes {sorted(SEQUENTIAL_RULES)}")
    arch, notes, assign = architecture_of(model), {}, {}
    if "item_embedding" in rules:
        if not any(layer.name == "item_embedding" for layer in model.layers):
            raise TechniqueError(f"model {model.name!r} ({arch.kind}) has no item table to factorise")
        table = model.get_layer("item_embedding").table().numpy()
        s_all = np.linalg.svd(table.astype(np.float64), compute_uv=False)
        rank = choose_rank(table, s_all, rules["item_embedding"])
        a, b, _ = truncated_svd(table, rank)
        arch = arch.replace(item_rank=rank, item_cp=0)
        assign["item_embedding"] = [a, b]
        notes["item_embedding"] = {"shape": list(table.shape), "rank": rank, "params_before": int(table.size),
                                   "params_after": int(a.size + b.size),
                                   "relative_error": relative_error(table, a @ b),
                                   "energy": float(np.sum(s_all[:rank] ** 2) / np.sum(s_all ** 2))}
    if "transitions" in rules and arch.fpmc_dim:
        heads = model.get_layer("transitions")
        last, nxt = heads.last_factors.numpy(), heads.next_factors.numpy()
        q_l, r_l = np.linalg.qr(last.astype(np.float64))
        q_n, r_n = np.linalg.qr(nxt.astype(np.float64))
        s_map = np.linalg.svd(r_l @ r_n.T, compute_uv=False)
        rule = dict(rules["transitions"])
        if "ratio" in rule:
            rule = {"rank": max(1, int(round(rule["ratio"] * arch.fpmc_dim)))}
        rank = choose_rank(np.zeros((arch.fpmc_dim, arch.fpmc_dim)), s_map, rule)
        new_last, new_next = low_rank_pair(last, nxt, rank)
        assign["transitions"] = (new_last, new_next)
        arch = arch.replace(fpmc_dim=rank)
        notes["transitions"] = {"fpmc_dim_before": int(last.shape[1]), "rank": rank,
                                "energy": float(np.sum(s_map[:rank] ** 2) / np.sum(s_map ** 2))}
    out = seq.rebuild(model, arch)
    if "item_embedding" in assign:
        out.get_layer("item_embedding").set_weights(assign["item_embedding"])
    if "transitions" in assign:
        heads = out.get_layer("transitions")
        old = {w.name.split("/")[-1].split(":")[0]: w.numpy() for w in model.get_layer("transitions").weights}
        for weight in heads.weights:
            key = weight.name.split("/")[-1].split(":")[0]
            if key == "last_factors":
                weight.assign(assign["transitions"][0])
            elif key == "next_factors":
                weight.assign(assign["transitions"][1])
            else:
                weight.assign(old[key])
    return out, notes


@dataclass
class TruncatedSVD:
    """Technique ``svd``: factorise the named layers by rank rule, then fine-tune."""

    rules: Mapping[str, Mapping[str, float]] | None = None  # None: DEFAULT_RULES or SEQUENTIAL_RULES
    epochs: float = 1.0
    learning_rate: float = 5e-4
    max_pairs: int | None = None
    distill: bool = False  # fine-tune on the unfactorised model's soft labels (kd_loss) instead of CE
    name: str = "svd"

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Factorise and fine-tune; notes carry each layer's rank and reconstruction error."""
        from compression.techniques.sequential import is_sequential

        if is_sequential(model):
            factored, layers = factorize_sequential(model, self.rules or SEQUENTIAL_RULES)
        else:
            factored, layers = factorize(model, self.rules or DEFAULT_RULES)
        if self.distill:
            from compression.techniques.distillation import kd_loss, train_student

            curve = train_student(factored, model, dataset,
                                  lambda y, s_out, t_out: kd_loss(y, s_out[0], t_out[0], 0.5, 2.0),
                                  epochs=self.epochs, learning_rate=self.learning_rate,
                                  max_pairs=self.max_pairs, desc="svd-distill")
            history = {"epochs": self.epochs, "teacher": "the unfactorised model", "loss_curve": curve}
        else:
            history = fine_tune(factored, dataset, epochs=self.epochs, learning_rate=self.learning_rate,
                                max_pairs=self.max_pairs)
        _LOGGER.info("svd: %s; params %d -> %d", {k: v["rank"] for k, v in layers.items()},
                     model.count_params(), factored.count_params())
        notes = {"layers": layers, "params_before": int(model.count_params()),
                 "params_after": int(factored.count_params()), "fine_tune": history}
        return StepResult(factored, [self.name], notes)
