"""The common interface every compression technique implements, and recipes that chain them.

A technique takes a trained tf_keras recommender plus the dataset it was trained on and
returns a NEW model (the input is never mutated) with notes describing what it did. The
export step needs one more fact a technique may decide: the TFLite quantization mode
("none" | "dynamic" | "dynamic-tensor" | "dynamic-int4" | "dynamic-int4-all" | "int8" | "float16"), carried in
``StepResult.quantization``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import tf_keras as keras

from compression.data import Dataset
from compression.quantizations import QUANTIZATIONS

_LOGGER = logging.getLogger(__name__)

TECHNIQUE_NAMES = (
    "prune-magnitude", "prune-activation", "prune-gradient", "prune-blocks",
    "quant-linear", "ptq-dynamic", "ptq-int8", "ptq-float16", "qat", "cluster", "quant-log",
    "distill-soft", "distill-feature", "svd", "cp",
)
QUANTIZATION_MODES = QUANTIZATIONS  # the export's modes (compression.quantizations)


class TechniqueError(Exception):
    """Raised when a technique cannot be applied to the model or its parameters are invalid."""


@dataclass
class StepResult:
    """What a technique (or a whole recipe) produced.

    ``terminal`` is set by steps after which the model can no longer be rebuilt layer by layer
    (QAT wraps the layers in fake-quant wrappers); only export may follow them.
    """

    model: keras.Model
    techniques: list[str]
    notes: dict[str, Any] = field(default_factory=dict)
    quantization: str = "none"
    terminal: bool = False


@runtime_checkable
class Technique(Protocol):
    """One compression step. ``name`` is one of ``TECHNIQUE_NAMES``."""

    name: str

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Return a new, compressed model; never mutate ``model``."""
        ...


def check_quantization(mode: str) -> str:
    """Validate a TFLite quantization mode name."""
    if mode not in QUANTIZATION_MODES:
        raise TechniqueError(f"quantization must be one of {QUANTIZATION_MODES}, got {mode!r}")
    return mode


@dataclass
class Recipe:
    """An ordered chain of techniques, e.g. distill -> prune -> low-rank -> int8."""

    steps: Sequence[Technique]
    name: str = ""

    def __post_init__(self) -> None:
        if not self.steps:
            raise TechniqueError("a recipe needs at least one step")
        for step in self.steps:
            if getattr(step, "name", None) not in TECHNIQUE_NAMES:
                raise TechniqueError(f"unknown technique {getattr(step, 'name', step)!r}; "
                                     f"known: {TECHNIQUE_NAMES}")
        if not self.name:
            self.name = "+".join(step.name for step in self.steps)

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Run the steps in order; the last explicit quantization mode wins."""
        current = StepResult(model=model, techniques=[])
        for index, step in enumerate(self.steps):
            if current.terminal:
                raise TechniqueError(f"recipe {self.name!r}: step {index} ({step.name}) follows "
                                     f"{current.techniques[-1]!r}, after which only export may run")
            _LOGGER.info("recipe %s: step %d/%d %s", self.name, index + 1, len(self.steps), step.name)
            result = step.apply(current.model, dataset)
            quantization = result.quantization if result.quantization != "none" else current.quantization
            notes = dict(current.notes)
            notes[step.name] = result.notes
            current = StepResult(model=result.model, techniques=current.techniques + result.techniques,
                                 notes=notes, quantization=quantization, terminal=result.terminal)
        return current
