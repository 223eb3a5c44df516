"""``measure_model``: every device-side figure the gate reads, each pass on its own (design.md Report)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.measure.commands import CommandRunner, run_command
from agent.measure.config import MeasureConfig, config_for_mode
from agent.measure.context import read_context, read_dynamic
from agent.measure.energy import measure_energy
from agent.measure.latency import cold_start, measure_latency
from agent.measure.memory import measure_memory
from agent.measure.power.base import PowerSource
from agent.measure.quality import measure_quality
from agent.measure.recommender import Recommender, runtime_of, validate_histories

_LOGGER = logging.getLogger(__name__)


def measure_model(load: Callable[[], Recommender], histories: np.ndarray, *, mode: str = "quick",
                  threads: int = 1, power_source: PowerSource | None = None,
                  golden_ids: np.ndarray | None = None, golden_scores: np.ndarray | None = None,
                  config: MeasureConfig | None = None, root: str | Path = "/",
                  runner: CommandRunner = run_command, vcgencmd: str = "vcgencmd",
                  no_power_reason: str = "no power source detected on this device") -> dict[str, Any]:
    """Measure one model on this device and return the report's measurement sub-objects.

    Passes, in order: context; cold start (``load()`` + first inference, RSS read around the load);
    warm-up + timed latency with no sampler running; context again (drift); a separate RSS-sampled
    memory pass; the golden-set quality pass; the energy pass (idle then loaded window).
    ``threads`` is recorded only: ``load`` must build the interpreter with it. Errors raised by
    ``load`` propagate so the caller can classify them (op_version / load_error).
    """
    config = config or config_for_mode(mode)
    if config.mode != mode:
        raise ValueError(f"mode {mode!r} disagrees with config.mode {config.mode!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    hs = validate_histories(histories)
    begin = time.monotonic()
    context = read_context(root, threads=threads, runner=runner, vcgencmd=vcgencmd)

    cold = cold_start(load, hs[0])
    recommender = cold.recommender
    runtime = runtime_of(recommender)
    context["runtime"] = runtime

    latency = measure_latency(recommender, hs, config, start_index=1)
    latency["cold_start_ms"] = cold.cold_start_ms
    latency["load_ms"] = cold.load_ms
    latency["first_inference_ms"] = cold.first_inference_ms
    context["after_latency"] = read_dynamic(root, runner=runner, vcgencmd=vcgencmd)

    memory = measure_memory(recommender, hs, config, load_delta_mib=cold.load_delta_mib,
                            rss_after_load_mib=cold.rss_after_load_mib)
    if golden_ids is None:
        quality: dict[str, Any] = {"agreement_at_k": None, "ndcg_vs_reference": None, "golden_n": 0,
                                   "reason": "no golden reference top-K given"}
    else:
        quality = measure_quality(recommender, hs, golden_ids, golden_scores, k=config.quality_k)
    energy = measure_energy(recommender, hs, power_source, config, no_source_reason=no_power_reason)

    return {
        "mode": config.mode,
        "latency_ms": latency,
        "memory": memory,
        "energy": energy,
        "quality": quality,
        "context": context,
        "runtime": runtime,
        "config": config.to_dict(),
        "measure_s": time.monotonic() - begin,
    }
