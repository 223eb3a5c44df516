"""The search's variants: which technique chains run on which trained model.

Since the weight-editing techniques apply to the sequential reference itself
(``compression.techniques.sequential``), every technique runs on the reference; the MLP stays a
candidate architecture, not a second base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from compression.techniques import (
    ActivationPruning,
    BlockPruning,
    CPDecomposition,
    FeatureDistillation,
    GradientPruning,
    LinearQuantization,
    LogQuantization,
    MagnitudePruning,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    Recipe,
    SoftDistillation,
    StepResult,
    StudentShape,
    Technique,
    TruncatedSVD,
    WeightClustering,
)

PROFILES = ("quick", "full")


class SearchError(Exception):
    """Raised when a search cannot run or resume as asked."""


@dataclass(frozen=True)
class Variant:
    """One candidate: a named chain of technique steps (a technique alone is a one-step chain).

    ``base`` names the model the steps start from: ``"reference"`` (the chosen float32
    reference) or another trained architecture (e.g. ``"mlp"``, given to ``run_search`` in
    ``bases``); figures are always compared with the reference.
    """

    name: str
    steps: tuple[Technique, ...]
    base: str = "reference"

    def recipe(self) -> Recipe:
        """The steps as a ``Recipe``."""
        return Recipe(list(self.steps), name=self.name)

    def config_key(self, base_key: str) -> str:
        """Digest of everything that decides the result: base model (by its key) and every step."""
        text = repr((self.base, base_key, [repr(step) for step in self.steps]))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_variants(profile: str = "full") -> list[Variant]:
    """Every technique alone on the reference, plus the size recipes (factorise/distil, then int8 weights).

    The size budget is set by the item tables ([V, d] tied embeddings and the FPMC factors), so
    the recipes shrink those: a low-rank tied table and FPMC map (svd), a CP table (cp), or a
    warm-started student; they end in dynamic-range int8 (int8 weights, float activations, so
    the scores do not tie as full-int8 outputs do) or float16.
    """
    if profile not in PROFILES:
        raise SearchError(f"profile must be one of {PROFILES}, got {profile!r}")
    quick = profile == "quick"
    tune = 0.5                              # fine-tuning epochs after a structural edit
    student_epochs = 0.5 if quick else 1.0
    int8, fp16 = PostTrainingQuantization("int8"), PostTrainingQuantization("float16")
    dynamic = PostTrainingQuantization("dynamic-tensor")
    # students start from the teacher (warm_start): from a random init, 1-2 epochs of distillation
    # left 1000-customer students at 0.52-0.58 x the reference's NDCG@10 (bench --quick, 2026-12-01)
    student_shape = StudentShape(16, 128, fpmc_dim=8, blocks=1, heads=1, warm_start=True)
    student = SoftDistillation(student=student_shape, epochs=student_epochs)
    markov = SoftDistillation(student=StudentShape(8, 128, fpmc_dim=8, warm_start=True, kind="fpmc"),
                              epochs=student_epochs)
    # measured on full data (docs/compression.md): table r32 + FPMC 16 keeps 0.997 x the reference
    # (326 KB dynamic-tensor); table r24 + FPMC 8 at 0.964-0.972 x; table r36 + FPMC 16 with int4
    # FPMC tables: 283 KB, under the top-20 neighbour table (293 KB), at 0.997 x
    mid_rank = TruncatedSVD(rules={"item_embedding": {"rank": 32}, "transitions": {"rank": 16}}, epochs=1.0)
    low_rank = TruncatedSVD(rules={"item_embedding": {"rank": 24}, "transitions": {"rank": 8}}, epochs=1.0)
    int4_rank = TruncatedSVD(rules={"item_embedding": {"rank": 36}, "transitions": {"rank": 16}}, epochs=1.0)
    # every table int4 (the tied one too: ai-edge-litert only), probes on full data: the full-width
    # table with FPMC 16 at 239 KB kept test NDCG; table r32 + FPMC 8 with one attention block
    # left (the second cost least), 135 KB: the nearest point to 16 x measured
    int4_all = PostTrainingQuantization("dynamic-int4-all")
    fpmc16 = TruncatedSVD(rules={"transitions": {"rank": 16}}, epochs=1.0)
    r32_f8 = TruncatedSVD(rules={"item_embedding": {"rank": 32}, "transitions": {"rank": 8}}, epochs=1.0)
    alone = {
        "prune-magnitude": MagnitudePruning(target=0.8, method="tfmot", epochs=tune),
        "prune-magnitude-oneshot": MagnitudePruning(target=0.5, method="oneshot"),
        "prune-activation": ActivationPruning(epochs=tune),
        "prune-gradient": GradientPruning(epochs=tune),
        "prune-blocks": BlockPruning(keep=1, epochs=tune),
        "quant-linear-4bit": LinearQuantization(bits=4, granularity="row"),
        "quant-log-4bit": LogQuantization(bits=4),
        "qat": QuantizationAwareTraining(epochs=tune, export_mode="int8"),
        "cluster-16": WeightClustering(clusters=16, epochs=tune),
        "distill-feature": FeatureDistillation(student=student_shape, epochs=student_epochs),
        "svd": TruncatedSVD(epochs=tune),
        "cp": CPDecomposition(rank=32, epochs=tune),
    }
    return [
        Variant("ptq-dynamic", (PostTrainingQuantization("dynamic"),)),
        Variant("ptq-dynamic-tensor", (dynamic,)),
        Variant("ptq-int8", (int8,)),
        Variant("ptq-float16", (fp16,)),
        Variant("distill-soft", (student,)),
        *(Variant(name, (technique,)) for name, technique in alone.items()),
        Variant("svd+dynamic", (alone["svd"], dynamic)),
        Variant("svd-r32-f16+dynamic", (mid_rank, dynamic)),
        Variant("svd-r24-f8+dynamic", (low_rank, dynamic)),
        Variant("svd-r36-f16+int4", (int4_rank, PostTrainingQuantization("dynamic-int4"))),
        Variant("svd-f16+int4-all", (fpmc16, int4_all)),
        # the quick preset's reference has one attention block: nothing to drop (prune-blocks alone says so)
        *([] if quick else [Variant("svd-r32-f8+prune-blocks+int4-all",
                                    (r32_f8, BlockPruning(keep=1, epochs=2.0), int4_all))]),
        Variant("cp+dynamic", (alone["cp"], dynamic)),
        Variant("distill-soft+dynamic", (student, dynamic)),
        Variant("distill-soft+float16", (student, fp16)),
        Variant("distill-soft-fpmc8+dynamic", (markov, dynamic)),
    ]


def select_variants(all_variants: Sequence[Variant], wanted: str | None) -> list[Variant]:
    """Filter by a comma-separated list of names, naming unknown ones in the error."""
    if not wanted:
        return list(all_variants)
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    known = {v.name: v for v in all_variants}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SearchError(f"unknown variants {unknown}; known: {sorted(known)}")
    return [known[n] for n in names]


def size_note(result: StepResult, metrics: dict) -> str | None:
    """What the raw .tflite size hides: simulated low-bit tables, zeros that only gzip sees."""
    parts = []
    for name, notes in result.notes.items():
        if isinstance(notes, dict) and notes.get("simulated"):
            packed = sum(layer.get("packed_bytes", 0) for layer in notes.get("layers", {}).values())
            parts.append(f"{name} is simulated: the .tflite holds float weights; the {notes['bits']}-bit "
                         f"tables would pack into {packed / 1024:.1f} KiB")
        if isinstance(notes, dict) and "sparsity" in notes:
            parts.append(f"{name}: sparsity {notes['sparsity']:.2f}; zeros do not shrink the .tflite, "
                         f"gzip {metrics['gzip_bytes'] / 1024:.1f} KiB")
        if isinstance(notes, dict) and "distinct" in notes:
            parts.append(f"{name}: {notes['clusters']} values per kernel; "
                         f"gzip {metrics['gzip_bytes'] / 1024:.1f} KiB")
    return "; ".join(parts) or None


