"""measure_model end to end on a real (numpy) recommender: passes, minimums and report keys."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from agent.measure import QUICK, MeasureConfig, detect_power_source, measure_model, probe_power_sources
from agent.measure.memory import SAMPLER_THREAD_NAME
from agent.measure.recommender import validate_histories
from agent.measure.toy import MatrixRecommender, make_histories

# Short but complete: every pass runs, with the quick thresholds scaled down where not under test.
TINY = MeasureConfig(mode="quick", warmup_min_runs=10, warmup_min_s=0.02, timed_min_runs=50,
                     timed_min_s=0.05, memory_min_runs=20, memory_min_s=0.1, idle_s=0.1, energy_s=0.2)


class RecordingRecommender(MatrixRecommender):
    """The real matrix recommender, noting each input and whether the RSS sampler thread was alive."""

    def __init__(self, load_delay_s: float = 0.0, **kwargs: object) -> None:
        time.sleep(load_delay_s)
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.inputs: list[np.ndarray] = []
        self.sampler_alive: list[bool] = []

    def recommend(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.inputs.append(history.copy())
        self.sampler_alive.append(any(t.name == SAMPLER_THREAD_NAME for t in threading.enumerate()))
        return super().recommend(history)


@pytest.fixture(scope="module")
def golden() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    histories = make_histories(16, num_items=200, seed=5)
    ids, scores = MatrixRecommender(num_items=200).golden(histories)
    return histories, ids, scores


def test_quick_mode_meets_its_minimums(golden: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    histories, ids, scores = golden
    report = measure_model(lambda: MatrixRecommender(num_items=200), histories, mode="quick", threads=1,
                           golden_ids=ids, golden_scores=scores)
    latency = report["latency_ms"]
    assert report["mode"] == "quick" and report["config"]["mode"] == "quick"
    assert latency["n"] >= QUICK.timed_min_runs and latency["duration_s"] >= QUICK.timed_min_s
    assert latency["warmup_n"] >= QUICK.warmup_min_runs and latency["warmup_s"] >= QUICK.warmup_min_s
    assert latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert report["memory"]["runs"] >= QUICK.memory_min_runs
    assert report["memory"]["duration_s"] >= QUICK.memory_min_s
    assert report["quality"]["agreement_at_k"] == 1.0 and report["quality"]["golden_n"] == 16


def test_report_has_every_key_the_gate_reads(golden: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    histories, ids, scores = golden
    report = measure_model(lambda: MatrixRecommender(num_items=200), histories, mode="quick", threads=2,
                           golden_ids=ids, golden_scores=scores, config=TINY)
    assert {"p50", "p90", "p99", "mean", "std", "min", "max", "n", "duration_s", "cold_start_ms",
            "warmup_n", "warmup_s"} <= set(report["latency_ms"])
    assert {"peak_rss_mib", "load_delta_mib"} <= set(report["memory"])
    assert {"source", "available", "gross_mj_per_inference", "net_mj_per_inference", "idle_w", "samples",
            "reason"} <= set(report["energy"])
    assert {"agreement_at_k", "ndcg_vs_reference", "golden_n"} <= set(report["quality"])
    assert {"cpu_model", "governor", "freq_mhz", "temperature_c", "throttled", "threads",
            "runtime"} <= set(report["context"])
    assert report["context"]["threads"] == 2
    assert report["runtime"] == {"name": "numpy", "version": np.__version__}
    assert report["memory"]["peak_rss_mib"] >= report["memory"]["rss_after_load_mib"] > 0


def test_cold_start_is_measured_on_its_own(golden: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    histories, ids, _ = golden
    report = measure_model(lambda: RecordingRecommender(load_delay_s=0.3, num_items=200), histories,
                           mode="quick", golden_ids=ids, config=TINY)
    latency = report["latency_ms"]
    assert latency["load_ms"] >= 300.0
    assert latency["cold_start_ms"] == pytest.approx(latency["load_ms"] + latency["first_inference_ms"])
    # The 300 ms load stays out of the warm figures.
    assert latency["max"] < 300.0


def test_memory_pass_is_separate_and_inputs_cycle_the_golden_set(
        golden: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    histories, ids, _ = golden
    made: list[RecordingRecommender] = []

    def load() -> RecordingRecommender:
        made.append(RecordingRecommender(num_items=200))
        return made[-1]

    report = measure_model(load, histories, mode="quick", golden_ids=ids, config=TINY)
    rec = made[0]
    assert len(made) == 1
    alive = np.asarray(rec.sampler_alive)
    # Calls with the sampler alive are exactly the memory pass, and they form one contiguous block
    # after the first inference, warm-up and timed pass.
    assert alive.sum() == report["memory"]["runs"]
    first, last = np.flatnonzero(alive)[[0, -1]]
    assert last - first + 1 == alive.sum()
    assert first == 1 + report["latency_ms"]["warmup_n"] + report["latency_ms"]["n"]
    assert report["memory"]["samples"] >= 2
    seen = {tuple(x) for x in rec.inputs}
    assert seen == {tuple(h) for h in histories}
    assert all(x.any() for x in rec.inputs)


def test_rejects_zero_inputs_and_mismatched_mode(golden: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    histories, ids, _ = golden
    bad = histories.copy()
    bad[3] = 0
    with pytest.raises(ValueError, match=r"rows \[3\] are all padding"):
        validate_histories(bad)
    with pytest.raises(ValueError, match="disagrees"):
        measure_model(lambda: MatrixRecommender(num_items=200), histories, mode="full", golden_ids=ids,
                      config=TINY)
    with pytest.raises(ValueError, match="2-D"):
        validate_histories(histories[0])


def test_load_errors_propagate(golden: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    histories, ids, _ = golden

    def load() -> MatrixRecommender:
        raise RuntimeError("Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'")

    with pytest.raises(RuntimeError, match="FULLY_CONNECTED"):
        measure_model(load, histories, mode="quick", golden_ids=ids, config=TINY)


def test_on_this_machine_energy_is_unavailable_and_says_so(
        golden: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    probes = probe_power_sources("/")
    # This development machine has no INA sensor, no vcgencmd, no readable RAPL and no Termux.
    assert [p.kind for p in probes] == ["hwmon", "vcgencmd", "rapl", "termux"]
    assert all(p.source is None for p in probes), [(p.kind, p.reason) for p in probes]
    assert detect_power_source("/") is None
    histories, ids, _ = golden
    report = measure_model(lambda: MatrixRecommender(num_items=200), histories, mode="quick",
                           power_source=detect_power_source("/"), golden_ids=ids, config=TINY)
    energy = report["energy"]
    assert energy["source"] == "unavailable" and energy["available"] is False
    assert energy["gross_mj_per_inference"] is None and energy["net_mj_per_inference"] is None
    assert energy["idle_w"] is None and "no power source" in energy["reason"]
