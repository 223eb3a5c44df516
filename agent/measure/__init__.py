"""On-device measurement of a model: latency, memory, energy, quality and the context explaining them.

Follows shared/notes/measurement.md (TFLite benchmark_model + MLPerf rules). Uses only numpy,
psutil and the stdlib; never TensorFlow. ``measure_model`` produces the Report sub-objects of
docs/design.md; ``paired_compare`` runs the interleaved A/B used by relative gates.
"""

from agent.measure.config import FULL, QUICK, MeasureConfig, config_for_mode
from agent.measure.context import read_context
from agent.measure.paired import paired_compare
from agent.measure.power import PowerSource, PowerUnavailable, detect_power_source, probe_power_sources
from agent.measure.quality import measure_quality
from agent.measure.recommender import Recommender
from agent.measure.report import measure_model
from agent.measure.stats import summarize

__all__ = [
    "FULL",
    "QUICK",
    "MeasureConfig",
    "PowerSource",
    "PowerUnavailable",
    "Recommender",
    "config_for_mode",
    "detect_power_source",
    "measure_model",
    "measure_quality",
    "paired_compare",
    "probe_power_sources",
    "read_context",
    "summarize",
]
