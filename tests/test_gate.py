"""The acceptance gate and its TOML policy, on a report measured for real on a tiny exported model."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.messages import Report
from server.gate import FAIL, PASS, SKIPPED, UNAVAILABLE_FAILED, evaluate
from server.policy import CATALOG, DEFAULT_POLICY_FILE, Policy, PolicyError, load_policy, parse_policy

REPO = Path(__file__).resolve().parents[1]


_MEASURE_SCRIPT = """
import json, sys
import numpy as np
from agent.measure import measure_model
from agent.runtime import load_recommender
from protocol.artifact import read_golden
folder = sys.argv[1]
golden = read_golden(folder)
measured = measure_model(lambda: load_recommender(folder + "/model.tflite"),
                         np.asarray(golden["histories"], dtype=np.int32), mode="quick", power_source=None,
                         golden_ids=np.asarray(golden["item_ids"]))
print(json.dumps({k: measured[k] for k in ("mode", "runtime", "latency_ms", "memory", "energy", "quality",
                                           "context")}))
"""


@pytest.fixture(scope="module")
def real_report(tiny_artifact: Path) -> dict:
    """A Report dict measured by the agent's own code on this machine, in a TensorFlow-free process
    like a device's (this test process has TensorFlow loaded, which alone is ~900 MiB of RSS)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE_SCRIPT, str(tiny_artifact)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    body = {"device_id": "gate-dev", "deployment_id": "d-00000000abcd", "model_id": "tiny", "version": 1,
            "load_ok": True, "model_bytes": (tiny_artifact / "model.tflite").stat().st_size, **measured}
    return Report.from_dict(body).to_dict()  # what survives the wire schema is what the gate sees


def _checks(result) -> dict[str, dict]:
    return {c["name"]: c for c in result.checks}


def test_default_policy_passes_a_real_report_and_lists_every_check(real_report: dict) -> None:
    policy = load_policy()
    result = evaluate(real_report, policy)
    assert result.verdict == "PASS", result.reason
    checks = _checks(result)
    assert set(checks) == {lim.name for lim in policy.limits}
    assert checks["p90_ms"]["outcome"] == PASS
    assert checks["p90_ms"]["figure"] == pytest.approx(real_report["latency_ms"]["p90"])
    assert checks["p90_ms"]["limit"] == 50.0 and checks["p90_ms"]["op"] == "<="
    assert checks["agreement_at_k"]["figure"] == pytest.approx(1.0)  # same runtime as the golden set
    # No power sensor and no incumbent here: optional checks are skipped, and say why.
    assert checks["energy_mj_per_inference"]["outcome"] == SKIPPED
    assert "energy not measured" in checks["energy_mj_per_inference"]["note"]
    assert checks["p90_regression_pct"]["outcome"] == SKIPPED
    assert "energy_mj_per_inference" in result.reason


def test_report_object_and_dict_gate_the_same(real_report: dict) -> None:
    policy = load_policy()
    assert evaluate(Report.from_dict(real_report), policy).checks == evaluate(real_report, policy).checks


def test_latency_over_the_limit_fails_naming_figure_and_limit(real_report: dict) -> None:
    report = copy.deepcopy(real_report)
    report["latency_ms"]["p90"] = 62.5
    result = evaluate(report, load_policy())
    assert result.verdict == "FAIL"
    assert _checks(result)["p90_ms"]["outcome"] == FAIL
    assert "p90_ms 62.5 ms > 50 ms" in result.reason


def test_required_figure_missing_fails_but_optional_one_is_skipped(real_report: dict) -> None:
    report = copy.deepcopy(real_report)
    del report["memory"]
    result = evaluate(report, load_policy())
    assert result.verdict == "FAIL"
    assert _checks(result)["peak_rss_mib"]["outcome"] == UNAVAILABLE_FAILED
    assert "peak_rss_mib unavailable but required" in result.reason

    report = copy.deepcopy(real_report)
    report["latency_ms"]["p99"] = None  # p99 is optional in the default policy
    result = evaluate(report, load_policy())
    assert result.verdict == "PASS"
    assert _checks(result)["p99_ms"]["outcome"] == SKIPPED


def test_energy_required_by_policy_fails_when_the_device_cannot_measure_it(real_report: dict) -> None:
    policy = parse_policy("[limits.p90_ms]\nmax = 50\n[limits.energy_mj_per_inference]\nmax = 5\nrequired = true\n")
    result = evaluate(real_report, policy)
    assert result.verdict == "FAIL"
    assert _checks(result)["energy_mj_per_inference"]["outcome"] == UNAVAILABLE_FAILED


def test_measured_energy_is_compared_when_available(real_report: dict) -> None:
    report = copy.deepcopy(real_report)
    report["energy"] = {"source": "ina219", "available": True, "net_mj_per_inference": 7.5,
                        "gross_mj_per_inference": 9.0, "idle_w": 2.1}
    policy = parse_policy("[limits]\nmax_energy_mj_per_inference = 5\n")
    result = evaluate(report, policy)
    assert result.verdict == "FAIL" and _checks(result)["energy_mj_per_inference"]["figure"] == 7.5
    assert evaluate(report, parse_policy("[limits]\nmax_energy_mj_per_inference = 8\n")).verdict == "PASS"


def test_failed_load_is_fail_with_the_error_kind(real_report: dict) -> None:
    report = {k: real_report[k] for k in ("device_id", "deployment_id", "model_id", "version", "runtime")}
    report.update(load_ok=False, error_kind="op_version",
                  error="Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'")
    result = evaluate(Report.from_dict(report), load_policy())
    assert result.verdict == "FAIL"
    assert len(result.checks) == 1
    assert result.checks[0]["name"] == "load" and result.checks[0]["figure"] == "op_version"
    assert "op_version" in result.reason and "FULLY_CONNECTED" in result.reason


def test_relative_regression_against_the_incumbent(real_report: dict) -> None:
    report = copy.deepcopy(real_report)
    report["paired"] = {"incumbent_version": 1, "median_ratio_p50": 1.4, "pairs": 200}
    result = evaluate(report, load_policy())
    check = _checks(result)["p90_regression_pct"]
    assert check["outcome"] == FAIL and check["figure"] == pytest.approx(40.0)
    report["paired"]["median_ratio_p50"] = 0.9  # faster than the incumbent
    assert _checks(evaluate(report, load_policy()))["p90_regression_pct"]["outcome"] == PASS


def test_a_ratio_that_overflows_as_a_percentage_is_unavailable_not_infinite(real_report: dict) -> None:
    """Found by the decoder fuzz test: 1.8e306 is finite, (1.8e306 - 1) * 100 is not, and an infinite
    figure in the verdict's checks cannot be written as JSON."""
    report = copy.deepcopy(real_report)
    report["paired"] = {"incumbent_version": 1, "median_ratio_p50": 1.8e306, "pairs": 200}
    result = evaluate(report, load_policy())
    check = _checks(result)["p90_regression_pct"]
    assert check["figure"] is None and "out of range" in check["note"]
    json.dumps(result.checks, allow_nan=False)


def test_non_numeric_figure_is_unavailable_not_a_crash(real_report: dict) -> None:
    report = copy.deepcopy(real_report)
    report["quality"]["agreement_at_k"] = "high"
    check = _checks(evaluate(report, load_policy()))["agreement_at_k"]
    assert check["outcome"] == UNAVAILABLE_FAILED and "not a finite number" in check["note"]


def test_flat_and_table_policies_are_equivalent() -> None:
    flat = parse_policy("[limits]\nmax_p90_ms = 20\nmin_agreement_at_k = 0.95\n"
                        "[relative]\nmax_p90_regression_pct = 10\n")
    table = parse_policy("[limits.p90_ms]\nmax = 20\n[limits.agreement_at_k]\nmin = 0.95\nrequired = true\n"
                         "[relative.p90_regression_pct]\nmax = 10\nrequired_when_unavailable = false\n")
    assert flat.limits == table.limits
    assert Policy.from_dict(table.to_dict()) == table


@pytest.mark.parametrize(("text", "message"), [
    ("[limits]\nmax_p95_ms = 3\n", "unknown check 'p95_ms'"),
    ("[limits]\nmin_p90_ms = 3\n", "takes a 'max' bound"),
    ("[limits]\nmax_p90_ms = 'fast'\n", "finite number"),
    ("[limits.p90_ms]\nmax = 3\nmin = 1\n", "exactly one of max/min"),
    ("[limits.p90_ms]\nmax = 3\nrequired = 'yes'\n", "required must be true or false"),
    ("[limits]\nmax_p90_regression_pct = 3\n", "belongs in [relative]"),
    ("[limits\nmax_p90_ms = 3\n", "invalid TOML"),
    ("name = 'x'\n", "sets no limits"),
    ("[limit]\nmax_p90_ms = 3\n", "unknown top-level keys ['limit']"),
    # Range checks: a share written as a percentage, negative sizes and times.
    ("[limits.agreement_at_k]\nmin = 90\n", "share within 0..1, got 90; for 90 % write 0.90"),
    ("[limits]\nmin_ndcg_vs_reference = -0.1\n", "share within 0..1, got -0.1"),
    ("[limits]\nmax_p90_ms = -5\n", "a ms limit cannot be negative, got -5"),
    ("[limits]\nmax_model_bytes = -1\n", "a B limit cannot be negative"),
    ("[relative]\nmax_p90_regression_pct = -100\n", "above -100"),
])
def test_bad_policies_are_refused_with_the_offending_key(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_policy(text)


def test_default_policy_file_covers_the_documented_limits(tmp_path: Path) -> None:
    policy = load_policy(DEFAULT_POLICY_FILE)
    names = {lim.name for lim in policy.limits}
    assert {"p90_ms", "peak_rss_mib", "agreement_at_k", "model_bytes", "energy_mj_per_inference",
            "p90_regression_pct"} <= names
    assert not policy.limit("energy_mj_per_inference").required  # most devices have no power sensor
    assert names <= set(CATALOG)
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.toml")
