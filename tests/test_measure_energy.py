"""Energy per inference: trapezoid integration on known traces and real sampling passes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from agent.measure.config import MeasureConfig
from agent.measure.energy import energy_per_inference, measure_energy, window_energy_j
from agent.measure.power import (
    HwmonInaPower,
    PowerTrace,
    PowerUnavailable,
    ProcessPowerSampler,
    TermuxBatteryPower,
    ThreadPowerSampler,
    make_sampler,
)
from agent.measure.toy import MatrixRecommender, make_histories

FIXTURES = Path(__file__).parent / "fixtures" / "power"
FAST = MeasureConfig(mode="quick", warmup_min_runs=1, warmup_min_s=0.0, timed_min_runs=1, timed_min_s=0.0,
                     memory_min_runs=1, memory_min_s=0.0, idle_s=0.4, energy_s=0.6, power_hz=50.0)


def test_window_energy_of_a_linear_trace_is_exact() -> None:
    times = np.arange(0.0, 10.0001, 0.05)
    watts = 2.0 + times
    # integral of 2 + t from a to b = 2(b - a) + (b^2 - a^2) / 2, exact for the trapezoid rule.
    a, b = 1.03, 7.51
    assert window_energy_j(times, watts, a, b) == pytest.approx(2 * (b - a) + (b * b - a * a) / 2)


def test_window_must_be_covered_by_samples() -> None:
    with pytest.raises(ValueError, match="sample before and after"):
        window_energy_j([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], 0.5, 2.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        window_energy_j([1.0, 1.0, 3.0], [1.0, 1.0, 1.0], 1.0, 2.0)


def test_gross_and_net_energy_per_inference_known_answer() -> None:
    # 1.5 W idle until t = 1.95 s, then 4.0 W from t = 2.0 s to 12.0 s, sampled at 20 Hz.
    times = np.round(np.arange(0.0, 12.0001, 0.05), 6)
    watts = np.where(times < 2.0, 1.5, 4.0)
    trace = PowerTrace(times=times.tolist(), watts=watts.tolist())
    result = energy_per_inference(trace, idle=(0.0, 1.95), load=(2.0, 12.0), inferences=1000)
    assert result["idle_w"] == pytest.approx(1.5)
    assert result["load_w"] == pytest.approx(4.0)
    assert result["gross_mj_per_inference"] == pytest.approx(40.0)  # 40 J / 1000
    assert result["net_mj_per_inference"] == pytest.approx(25.0)  # (40 - 1.5 * 10) J / 1000
    assert result["sample_hz"] == pytest.approx(20.0)
    assert result["load_samples"] == 201


def test_no_source_is_unavailable_without_numbers() -> None:
    result = measure_energy(MatrixRecommender(num_items=50), make_histories(4, num_items=50), None, FAST)
    assert result["source"] == "unavailable" and result["available"] is False
    assert result["gross_mj_per_inference"] is None and result["net_mj_per_inference"] is None
    assert result["reason"]


class BusyPower:
    """In-process power: 2 W until the recommender's first call, 5 W from then on.

    A step rather than per-call activity, so the known answer does not depend on how the OS
    schedules the two threads on a busy machine.
    """

    source = "test:busy-dependent"
    min_interval_s = 0.0
    out_of_process = False

    def __init__(self) -> None:
        self.calls = 0

    def read(self) -> float:
        return 5.0 if self.calls else 2.0


class NotifyingRecommender(MatrixRecommender):
    def __init__(self, power: BusyPower) -> None:
        super().__init__(num_items=200)
        self.power = power

    def recommend(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.power.calls += 1
        return super().recommend(history)


def test_energy_pass_subtracts_the_idle_baseline() -> None:
    power = BusyPower()
    result = measure_energy(NotifyingRecommender(power), make_histories(8, num_items=200), power, FAST)
    assert result["available"] is True and result["reason"] is None
    assert result["idle_w"] == pytest.approx(2.0, abs=0.15)
    assert result["load_w"] == pytest.approx(5.0, abs=0.4)
    assert result["sample_hz"] >= 10.0
    n, window = result["inferences"], result["window_s"]
    assert window >= FAST.energy_s
    assert result["gross_mj_per_inference"] == pytest.approx(5.0 * window / n * 1e3, rel=0.1)
    assert result["net_mj_per_inference"] == pytest.approx(3.0 * window / n * 1e3, rel=0.15)


def test_energy_pass_on_an_ina226_fixture() -> None:
    source = HwmonInaPower(FIXTURES / "hwmon_ina226/sys/class/hwmon/hwmon1")
    result = measure_energy(MatrixRecommender(num_items=50), make_histories(4, num_items=50), source, FAST)
    assert result["source"] == source.source and result["available"] is True
    assert result["idle_w"] == pytest.approx(3.125)
    per_inference_s = result["window_s"] / result["inferences"]
    assert result["gross_mj_per_inference"] == pytest.approx(3.125 * per_inference_s * 1e3)
    assert result["net_mj_per_inference"] == pytest.approx(0.0, abs=1e-9)
    assert result["idle_samples"] >= 3 and result["load_samples"] >= 3


def test_energy_pass_refuses_a_charging_phone() -> None:
    argv = (str(FIXTURES / "bin/print-file"), str(FIXTURES / "termux/charging_usb.json"))
    source = TermuxBatteryPower(argv, min_interval_s=0.05)
    result = measure_energy(MatrixRecommender(num_items=50), make_histories(4, num_items=50), source, FAST)
    assert result["available"] is False and result["source"] == source.source
    assert "discharging" in result["reason"] and result["net_mj_per_inference"] is None


class PidPower:
    """Reports the id of the process that calls read(), to prove where sampling happens."""

    source = "test:pid"
    min_interval_s = 0.02
    out_of_process = True

    def read(self) -> float:
        return float(os.getpid())


def test_process_sampler_reads_in_another_process() -> None:
    sampler = make_sampler(PidPower(), hz=50.0)
    assert isinstance(sampler, ProcessPowerSampler)
    with sampler:
        assert sampler.wait_for_sample_after(float("-inf"), timeout_s=60.0)
        assert sampler.wait_for_sample_after(sampler.trace.times[0] + 0.1, timeout_s=10.0)
    pids = set(sampler.trace.watts)
    assert len(pids) == 1 and pids != {float(os.getpid())}
    assert len(sampler.trace.times) >= 2
    assert all(b > a for a, b in zip(sampler.trace.times, sampler.trace.times[1:], strict=False))


def test_termux_samples_stream_from_a_separate_process() -> None:
    source = TermuxBatteryPower((str(FIXTURES / "bin/print-file"),
                                 str(FIXTURES / "termux/discharging_ma_positive.json")), min_interval_s=0.05)
    with ProcessPowerSampler(source, interval_s=0.05) as sampler:
        assert sampler.wait_for_sample_after(float("-inf"), timeout_s=60.0)
        assert sampler.wait_for_sample_after(sampler.trace.times[0] + 0.1, timeout_s=10.0)
    assert not sampler.trace.errors and len(sampler.trace.watts) >= 2
    assert sampler.trace.watts == pytest.approx([4.120 * 0.523] * len(sampler.trace.watts))


def test_thread_sampler_records_unavailable_reads() -> None:
    class Failing:
        source, min_interval_s, out_of_process = "test:failing", 0.0, False

        def read(self) -> float:
            raise PowerUnavailable(self.source, "sensor unplugged")

    with ThreadPowerSampler(Failing(), 0.01) as sampler:
        assert sampler.wait_for_sample_after(time.monotonic(), timeout_s=5.0)
    assert sampler.trace.watts == [] and sampler.trace.errors[0][1] == "sensor unplugged"
