"""Compression techniques for the EdgeGuide recommender, one module per technique.

Every technique implements ``base.Technique``: ``apply(model, dataset) -> StepResult`` returns
a NEW tf_keras model plus notes (and, for PTQ/QAT, the TFLite export mode). ``base.Recipe``
chains them (e.g. distill -> prune -> low-rank -> int8); ``compression.search`` tries recipes
and keeps the accuracy-aware Pareto frontier. Names match the benchmark's technique names.
"""

from compression.techniques.base import (
                                         QUANTIZATION_MODES,
                                         TECHNIQUE_NAMES,
                                         Recipe,
                                         StepResult,
                                         Technique,
                                         TechniqueError,
)
from compression.techniques.cluster import WeightClustering
from compression.techniques.cp import CPDecomposition, CPEmbedding
from compression.techniques.distill_feature import FeatureDistillation
from compression.techniques.distill_soft import SoftDistillation
from compression.techniques.distillation import StudentShape
from compression.techniques.prune_activation import ActivationPruning
from compression.techniques.prune_blocks import BlockPruning
from compression.techniques.prune_gradient import GradientPruning
from compression.techniques.prune_magnitude import MagnitudePruning
from compression.techniques.ptq import PostTrainingQuantization
from compression.techniques.qat import QuantizationAwareTraining
from compression.techniques.quant_linear import LinearQuantization
from compression.techniques.quant_log import LogQuantization
from compression.techniques.svd import TruncatedSVD

__all__ = [
    "QUANTIZATION_MODES", "TECHNIQUE_NAMES", "ActivationPruning", "BlockPruning", "CPDecomposition", "CPEmbedding",
    "FeatureDistillation", "GradientPruning", "LinearQuantization", "LogQuantization", "MagnitudePruning",
    "PostTrainingQuantization", "QuantizationAwareTraining", "Recipe", "SoftDistillation", "StepResult",
    "StudentShape", "Technique", "TechniqueError", "TruncatedSVD", "WeightClustering",
]
