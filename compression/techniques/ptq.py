"""TFLite post-training quantization: dynamic-range, full-integer int8 and float16.

These change no Keras weights; they choose how ``compression.export.export_artifact`` converts
the model (int8 calibrates on real histories of the dataset). Known runtime limit:
TF 2.21's dynamic-range models use FULLY_CONNECTED version 12, which tflite-runtime 2.14
rejects; the export's runtime check records it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tf_keras as keras

from compression.data import Dataset
from compression.techniques.base import StepResult, TechniqueError

_LOGGER = logging.getLogger(__name__)

PTQ_MODES = {"ptq-dynamic": "dynamic", "ptq-int8": "int8", "ptq-float16": "float16"}
# the same technique as ptq-dynamic with one weight scale per tensor, and with the per-item
# tables (and for "-all" every large weight) in int4 (see compression.export, compression.int4)
_ALSO = {"dynamic-tensor": "ptq-dynamic", "dynamic-int4": "ptq-dynamic", "dynamic-int4-all": "ptq-dynamic"}


@dataclass
class PostTrainingQuantization:
    """Techniques ``ptq-dynamic`` / ``ptq-int8`` / ``ptq-float16`` (pick by ``mode``)."""

    mode: str = "int8"

    def __post_init__(self) -> None:
        modes = sorted(set(PTQ_MODES.values()) | set(_ALSO))
        if self.mode not in modes:
            raise TechniqueError(f"PTQ mode must be one of {modes}, got {self.mode!r}")

    @property
    def name(self) -> str:
        """The technique name, e.g. ``ptq-int8``."""
        return _ALSO.get(self.mode, f"ptq-{self.mode}")

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Pass the model through and request the export quantization mode."""
        del dataset  # calibration happens at export time
        return StepResult(model, [self.name], {"mode": self.mode}, quantization=self.mode)
