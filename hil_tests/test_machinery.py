"""The suite's own parts, without a device: profile selection, the legacy pins, the targets' checks,
the acceptance verdict of the HIL report. Fast; they guard the rig against passing vacuously."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hil_tests.legacy_env import agent_requirements
from hil_tests.plugin import _masked
from hil_tests.profiles import ALL_PROFILES, PROFILES, select_profiles
from hil_tests.report import COVERAGE, HilReport, render_markdown, summarize_deployment
from hil_tests.targets import AgentSpec, LocalTarget, RemoteTarget, TargetError
from server.registry import DeploymentRecord


def test_profile_selection_accepts_all_lists_and_names_unknown_ones() -> None:
    assert [p.name for p in select_profiles("all")] == list(ALL_PROFILES) == ["litert", "pi4-like", "legacy"]
    assert [p.name for p in select_profiles("legacy, litert,legacy")] == ["legacy", "litert"]
    with pytest.raises(ValueError, match=r"unknown device profile\(s\) \['pi5'\]"):
        select_profiles("litert,pi5")
    assert PROFILES["pi4-like"].threads == 1 and PROFILES["pi4-like"].pin_one_core
    assert PROFILES["legacy"].expected_version == "2.14.0"


def test_legacy_env_takes_the_agent_pins_but_not_litert_or_numpy() -> None:
    reqs = agent_requirements()
    names = [r.split("=")[0].split(">")[0] for r in reqs]
    assert "paho-mqtt==2.2.0" in reqs and "psutil" in names and "cryptography" in names
    assert "ai-edge-litert" not in names and "numpy" not in names


def test_broker_passwords_are_masked_in_the_report() -> None:
    assert _masked("mqtts://srv:s3cr:et@broker:8883") == "mqtts://srv:***@broker:8883"
    assert _masked("--broker=mqtt://u:p@h:1") == "--broker=mqtt://u:***@h:1"
    assert _masked("mqtt://broker:1883") == "mqtt://broker:1883"


def _spec(tmp_path: Path) -> AgentSpec:
    return AgentSpec(device_id="hil-unit", broker_url="mqtt://127.0.0.1:1", topic_prefix="p",
                     server_key=tmp_path / "k.pem", workdir=tmp_path)


def test_pi4_like_command_pins_one_core_caps_memory_and_uses_one_thread(tmp_path: Path) -> None:
    target = LocalTarget(PROFILES["pi4-like"], _spec(tmp_path))
    cmd = target.command()
    assert cmd[0].endswith("taskset") and cmd[1:3] == ["--cpu-list", str(max(os.sched_getaffinity(0)))]
    assert cmd[3].endswith("prlimit") and cmd[4] == f"--as={384 * 1024 * 1024}"
    assert cmd[cmd.index("--threads") + 1] == "1" and "--debug-modules-file" in cmd


def test_a_profile_whose_limits_did_not_apply_is_refused(tmp_path: Path) -> None:
    target = LocalTarget(PROFILES["pi4-like"], _spec(tmp_path))
    if len(os.sched_getaffinity(0)) > 1:  # this process is not pinned: exactly what the check must catch
        with pytest.raises(TargetError, match=r"runs on CPUs .* pins it to"):
            target._check_limits(os.getpid())
    else:  # a 1-CPU machine is trivially pinned; the address-space cap is still missing here
        with pytest.raises(TargetError, match=r"RLIMIT_AS .* caps it at"):
            target._check_limits(os.getpid())


def test_legacy_profile_needs_its_environment(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="needs the legacy venv"):
        LocalTarget(PROFILES["legacy"], _spec(tmp_path))


def test_remote_restart_runs_the_hook_and_reports_its_failure(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match=r"no restart hook; pass --hil-restart-cmd"):
        RemoteTarget("pi-01").restart()
    flag = tmp_path / "restarted"
    RemoteTarget("pi-01", restart_cmd=f"touch {flag}").restart()
    assert flag.exists()
    with pytest.raises(TargetError, match=r"exited with code 3: .*no such unit"):
        RemoteTarget("pi-01", restart_cmd="echo no such unit >&2; exit 3").restart()


def _deployment(runtime: str) -> DeploymentRecord:
    name, version = runtime.split()
    report = {"load_ok": True, "mode": "quick", "runtime": {"name": name, "version": version},
              "latency_ms": {"p50": 0.01, "p90": 0.02, "p99": 0.05, "n": 200}, "memory": {"peak_rss_mib": 66.0},
              "quality": {"agreement_at_k": 1.0}, "energy": {"source": "unavailable", "available": False}}
    verdict = {"verdict": "PASS", "reason": "all checks passed",
               "checks": [{"name": "p90_ms", "outcome": "pass"}, {"name": "energy", "outcome": "unavailable-skipped"}]}
    return DeploymentRecord("d-0123456789ab", "dev", "hil-float@1", "hil-float", 1, "promoted", "", None, 8192,
                            report, verdict)


def _report(runtime: str = "tflite-runtime 2.14.0", evidence: list[str] | None = None,
            skip: str | None = None) -> HilReport:
    report = HilReport({"target": "local"})
    report.device("legacy").update(expected_runtime="tflite-runtime 2.14.0", tensorflow_evidence=evidence or [],
                                   modules_checked=2)
    for name in COVERAGE:
        nodeid = f"hil_tests/x.py::{name}[legacy]"
        entry = report.test(nodeid, name, "legacy")
        entry.deployments.append(summarize_deployment(_deployment(runtime)))
        if name == skip:
            report.outcome(nodeid, "setup", "skipped", 0.0, "no restart hook")
        else:
            report.outcome(nodeid, "setup", "passed", 0.1)
            report.outcome(nodeid, "call", "passed", 1.0)
            report.outcome(nodeid, "teardown", "passed", 0.0)
    return report


def test_acceptance_passes_only_when_every_criterion_holds() -> None:
    assert _report().acceptance()["passed"] is True

    wrong_runtime = _report(runtime="ai-edge-litert 2.3.0").acceptance()
    assert not wrong_runtime["passed"]
    assert "expected tflite-runtime 2.14.0" in wrong_runtime["criteria"][2]["detail"]

    tf_loaded = _report(evidence=["pid 7 maps /x/site-packages/tensorflow/libtf.so"]).acceptance()
    assert not tf_loaded["passed"] and tf_loaded["criteria"][3]["status"] == "fail"

    skipped = _report(skip="test_interrupted_transfer_resumes_after_restart").acceptance()
    assert not skipped["passed"]
    assert "interrupted transfer resumes (skipped)" in skipped["criteria"][1]["detail"]


def test_a_failure_in_teardown_fails_the_test_in_the_report() -> None:
    report = _report()
    nodeid = next(iter(report.tests))
    report.outcome(nodeid, "teardown", "failed", 0.0, "agent exited with code 1 | see log")
    assert report.tests[nodeid].outcome == "error"
    assert report.acceptance()["passed"] is False


def test_report_files_are_written_with_a_readable_markdown_twin(tmp_path: Path) -> None:
    json_path, md_path = _report().write(tmp_path / "out" / "hil-report.json")
    data = json.loads(json_path.read_text())
    assert data["acceptance"]["passed"] is True and len(data["tests"]) == len(COVERAGE)
    assert data["tests"][0]["deployments"][0]["failed_checks"] == []  # a skipped optional check is no failure
    text = md_path.read_text()
    assert text.startswith("# EdgeGuide HIL report: PASSED") and "| legacy |" in text
    assert "| promoted / PASS | tflite-runtime 2.14.0 | quick | 0.01 / 0.02 / 0.05 | 66 | 1 | unavailable |" in text
    assert "\\|" in render_markdown({**data, "devices": [{"profile": "p", "tensorflow_evidence": ["a|b"]}]})
