"""The HIL report: what ran where, what the devices measured, what the gate said, and the verdict.

Written after every run as `reports/hil-report.json` and a Markdown twin next to it, so a run on a
real Pi can be compared with the local rig figure by figure. Figures come from the device's own
reports as the server stored them; nothing here measures anything.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.registry import DeploymentRecord

_LOGGER = logging.getLogger(__name__)

FORMAT = 1
# The behaviours the issue asks the suite to prove, by test function.
COVERAGE = {
    "test_deploy_measure_gate_promote": "deploy -> measure -> gate -> promote",
    "test_gate_failure_rolls_back_and_old_model_keeps_serving": "gate failure rolled back, old model serves",
    "test_unloadable_model_is_refused_by_server_and_by_agent": "op-version refusal by server and agent",
    "test_interrupted_transfer_resumes_after_restart": "interrupted transfer resumes",
    "test_recommendations_never_fail_during_a_swap": "no failed recommendation during a swap",
}
PASS, FAIL, NOT_APPLICABLE = "pass", "fail", "n/a"


def summarize_deployment(dep: DeploymentRecord) -> dict[str, Any]:
    """The figures and verdict of one deployment, flat enough for a table."""
    report = dep.report or {}
    verdict = dep.verdict or {}
    latency = report.get("latency_ms") or {}
    memory = report.get("memory") or {}
    quality = report.get("quality") or {}
    energy = report.get("energy") or {}
    runtime = report.get("runtime") or {}
    paired = report.get("paired") or {}
    context = report.get("context") or {}
    return {
        "deployment_id": dep.deployment_id, "model_id": dep.model_id, "version": dep.version,
        "status": dep.status, "reason": dep.reason[:300], "forced": dep.forced,
        "verdict": verdict.get("verdict"), "verdict_reason": (verdict.get("reason") or "")[:300],
        "failed_checks": [c.get("name") for c in verdict.get("checks") or [] if c.get("outcome") != "pass"
                          and not str(c.get("outcome", "")).endswith("skipped")],
        "load_ok": report.get("load_ok"), "error_kind": report.get("error_kind"),
        "mode": report.get("mode"),
        "runtime": f"{runtime['name']} {runtime['version']}" if runtime.get("name") else None,
        "p50_ms": latency.get("p50"), "p90_ms": latency.get("p90"), "p99_ms": latency.get("p99"),
        "runs": latency.get("n"), "cold_start_ms": latency.get("cold_start_ms"),
        "peak_rss_mib": memory.get("peak_rss_mib"), "load_delta_mib": memory.get("load_delta_mib"),
        "agreement_at_k": quality.get("agreement_at_k"),
        "energy_source": energy.get("source"), "energy_available": energy.get("available"),
        "energy_net_mj": energy.get("net_mj_per_inference"),
        "paired_ratio_p50": paired.get("median_ratio_p50"),
        "machine": context.get("machine"), "os_release": context.get("os_release"),
        "python": context.get("python"), "cpu_model": context.get("cpu_model"),
    }


# What each device's own reports say about where it ran (not the host's view).
PLATFORM_FIELDS = ("machine", "os_release", "python", "runtime", "cpu_model")


@dataclass
class TestEntry:
    """One HIL test's outcome and whatever it recorded."""

    nodeid: str
    name: str
    profile: str | None
    outcome: str = "not run"
    duration_s: float = 0.0
    detail: str = ""
    deployments: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class HilReport:
    """Collects devices and tests during the run; `write` renders JSON and Markdown."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.created = datetime.now(UTC).isoformat(timespec="seconds")
        self.devices: dict[str, dict[str, Any]] = {}
        self.tests: dict[str, TestEntry] = {}

    # -- collection ---------------------------------------------------------------------------
    def device(self, profile: str) -> dict[str, Any]:
        return self.devices.setdefault(profile, {"profile": profile})

    def test(self, nodeid: str, name: str = "", profile: str | None = None) -> TestEntry:
        entry = self.tests.get(nodeid)
        if entry is None:
            entry = self.tests[nodeid] = TestEntry(nodeid, name or nodeid.split("::")[-1].split("[")[0], profile)
        return entry

    def outcome(self, nodeid: str, when: str, outcome: str, duration: float, detail: str = "") -> None:
        """Fold one pytest phase report into the test's outcome (an error in setup/teardown wins)."""
        entry = self.test(nodeid)
        entry.duration_s = round(entry.duration_s + duration, 3)
        if outcome == "skipped":
            if entry.outcome in ("not run", "passed"):
                entry.outcome, entry.detail = "skipped", detail
        elif outcome == "failed":
            entry.outcome = "failed" if when == "call" else "error"
            entry.detail = detail
        elif when == "call" and entry.outcome == "not run":
            entry.outcome = "passed"

    # -- verdict ------------------------------------------------------------------------------
    def acceptance(self) -> dict[str, Any]:
        criteria = [self._all_passed(), self._coverage(), self._runtimes(), self._tensorflow_free()]
        decided = [c for c in criteria if c["status"] != NOT_APPLICABLE]
        return {"passed": bool(decided) and all(c["status"] == PASS for c in decided), "criteria": criteria}

    def _all_passed(self) -> dict[str, Any]:
        bad = [f"{t.nodeid}: {t.outcome}" for t in self.tests.values() if t.outcome in ("failed", "error")]
        ran = [t for t in self.tests.values() if t.outcome == "passed"]
        skipped = [f"{t.nodeid}: {t.detail[:160]}" for t in self.tests.values() if t.outcome == "skipped"]
        ok = not bad and bool(ran)
        detail = f"{len(ran)} passed, {len(bad)} failed/errored, {len(skipped)} skipped"
        return {"name": "every selected HIL test passed", "status": PASS if ok else FAIL, "detail": detail,
                "failed": bad, "skipped": skipped}

    def _coverage(self) -> dict[str, Any]:
        missing = []
        for profile in self.devices:
            for name, behaviour in COVERAGE.items():
                runs = [t for t in self.tests.values() if t.profile == profile and t.name == name]
                if not any(t.outcome == "passed" for t in runs):
                    state = runs[0].outcome if runs else "not selected"
                    missing.append(f"{profile}: {behaviour} ({state})")
        status = PASS if self.devices and not missing else FAIL
        return {"name": "every behaviour of the issue passed on every device", "status": status,
                "detail": "; ".join(missing) or f"{len(COVERAGE)} behaviours x {len(self.devices)} device(s)"}

    def _runtimes(self) -> dict[str, Any]:
        problems, seen = [], []
        for profile, dev in self.devices.items():
            expected = dev.get("expected_runtime") or dev.get("announced_runtime")
            reported = sorted({d["runtime"] for t in self.tests.values() if t.profile == profile
                               for d in t.deployments if d.get("runtime")})
            seen.append(f"{profile}: {', '.join(reported) or 'no report'}")
            if not reported:
                problems.append(f"{profile}: no device report named its runtime")
            elif expected and reported != [expected]:
                problems.append(f"{profile}: reports name {reported}, expected {expected}")
        return {"name": "the device reports name the runtime its profile promises",
                "status": FAIL if problems or not self.devices else PASS, "detail": "; ".join(problems or seen)}

    def _tensorflow_free(self) -> dict[str, Any]:
        observed = {p: d for p, d in self.devices.items() if d.get("tensorflow_evidence") is not None}
        if not observed:
            return {"name": "the agent never imported TensorFlow", "status": NOT_APPLICABLE,
                    "detail": "not observable on a remote device (check `edgeguide-agent --check-config` there)"}
        problems = []
        for profile, dev in observed.items():
            if dev["tensorflow_evidence"]:
                problems.append(f"{profile}: {dev['tensorflow_evidence'][:3]}")
            elif not dev.get("modules_checked"):
                problems.append(f"{profile}: no agent process left its module list")
        detail = "; ".join(problems) or ", ".join(
            f"{p}: 0 TensorFlow modules in {d['modules_checked']} agent process(es), none mapped"
            for p, d in observed.items())
        return {"name": "the agent never imported TensorFlow", "status": FAIL if problems else PASS,
                "detail": detail}

    # -- output -------------------------------------------------------------------------------
    def platform(self, profile: str) -> dict[str, Any]:
        """Per field, what the device's reports said (one value, or all distinct ones), and the
        lowest golden agreement of the deployments that loaded."""
        deps = [d for t in self.tests.values() if t.profile == profile for d in t.deployments]
        out: dict[str, Any] = {}
        for name in PLATFORM_FIELDS:
            values = sorted({str(d[name]) for d in deps if d.get(name) is not None})
            out[name] = values[0] if len(values) == 1 else (values or None)
        agreements = [d["agreement_at_k"] for d in deps if d.get("load_ok") and d.get("agreement_at_k") is not None]
        out["agreement_at_k_min"] = min(agreements) if agreements else None
        out["measured_deployments"] = len(agreements)
        return out

    def to_dict(self) -> dict[str, Any]:
        devices = [{**dev, **self.platform(profile)} for profile, dev in self.devices.items()]
        return {"format": FORMAT, "created": self.created, "host": {"platform": platform.platform(),
                "machine": platform.machine(), "python": platform.python_version()},
                **self.settings, "devices": devices,
                "tests": [asdict(t) for t in self.tests.values()], "acceptance": self.acceptance()}

    def write(self, json_path: Path) -> tuple[Path, Path]:
        """Write the JSON report and its Markdown twin (same name, .md); returns both paths."""
        data = self.to_dict()
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
        md_path = json_path.with_suffix(".md")
        md_path.write_text(render_markdown(data), encoding="utf-8")
        _LOGGER.info("HIL report written to %s and %s", json_path, md_path)
        return json_path, md_path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _limits(dev: dict[str, Any]) -> str:
    applied = dev.get("applied") or {}
    constraints = dev.get("constraints") or {}
    if dev.get("kind") == "remote":
        return "the device's own"
    cap = applied.get("address_space_bytes")
    return (f"CPUs {applied.get('cpus')}, {constraints.get('threads')} thread(s), address space "
            f"{f'{cap // (1024 * 1024)} MiB' if cap else 'unlimited'}")


def _environment(dev: dict[str, Any]) -> str:
    legacy = dev.get("legacy_env")
    if legacy:
        tf = "yes" if legacy.get("tensorflow_importable") else "no"
        return (f"own venv: Python {legacy.get('python')}, tflite-runtime {legacy.get('tflite_runtime')}, numpy "
                f"{legacy.get('numpy')}, tensorflow importable: {tf}")
    if dev.get("kind") == "remote":
        return f"remote, restart hook: {dev.get('restart_cmd') or 'none'}, HTTP: {dev.get('http_url') or 'none'}"
    return "project venv"


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(data: dict[str, Any]) -> str:
    """The report for people: devices, one row per deployment, acceptance."""
    acc = data["acceptance"]
    out = [f"# EdgeGuide HIL report: {'PASSED' if acc['passed'] else 'FAILED'}", "",
           f"- created: {data['created']}", f"- target: {data.get('target')}, broker {data.get('broker')}",
           f"- measurement mode asked: {data.get('mode')}", f"- host: {data['host']['platform']}"]
    emulated = [d for d in data["devices"] if d.get("emulated")]
    if emulated:
        out.append(f"- **emulated devices ({', '.join(d['profile'] for d in emulated)})**: "
                   f"{emulated[0].get('figures_note')}")
    out += ["", "## Devices", "", "| profile | device | machine | OS | Python | runtime announced | expected | "
            "emulated | agreement@K min | limits applied | environment | TensorFlow seen |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for dev in data["devices"]:
        tf = dev.get("tensorflow_evidence")
        tf_text = "not observable" if tf is None else ("none" if not tf else "; ".join(tf[:3]))
        out.append(f"| {dev['profile']} | {dev.get('device_id')} | {_cell(dev.get('machine') or 'n/a')} | "
                   f"{_cell(dev.get('os_release') or 'n/a')} | {_cell(dev.get('python') or 'n/a')} | "
                   f"{dev.get('announced_runtime')} | {dev.get('expected_runtime') or 'as announced'} | "
                   f"{_cell(dev.get('emulated') or 'no')} | {_fmt(dev.get('agreement_at_k_min'))} | "
                   f"{_cell(_limits(dev))} | {_cell(_environment(dev))} | {_cell(tf_text)} |")
    out += ["", "## Tests", "", "| test | profile | outcome | s | deployment | status / verdict | runtime | mode "
            "| p50 / p90 / p99 ms | peak RSS MiB | agreement@K | energy |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in data["tests"]:
        rows = t["deployments"] or [None]
        for i, d in enumerate(rows):
            head = (f"| {t['name']} | {t['profile']} | {t['outcome']} | {t['duration_s']:.1f} |" if i == 0
                    else "| | | | |")
            if d is None:
                out.append(head + " | | | | | | | |")
                continue
            energy = d["energy_source"] or "n/a"
            if d["energy_available"] is False and energy != "unavailable":
                energy += " (unavailable)"
            elif d["energy_net_mj"] is not None:
                energy += f" {_fmt(d['energy_net_mj'])} mJ"
            out.append(f"{head} v{d['version']} {d['model_id']} | {d['status']} / {d['verdict'] or '-'} | "
                       f"{d['runtime'] or 'n/a'} | {d['mode'] or 'n/a'} | {_fmt(d['p50_ms'])} / {_fmt(d['p90_ms'])} / "
                       f"{_fmt(d['p99_ms'])} | {_fmt(d['peak_rss_mib'])} | {_fmt(d['agreement_at_k'])} | {energy} |")
    notes = [(t, n) for t in data["tests"] for n in ([f"{k}: {v}" for k, v in t["figures"].items()] + t["notes"])]
    if notes:
        out += ["", "## Figures and notes", ""]
        out += [f"- `{t['name']}` [{t['profile']}] {n}" for t, n in notes]
    failed = [t for t in data["tests"] if t["outcome"] in ("failed", "error", "skipped")]
    if failed:
        out += ["", "## Not passed", ""]
        out += [f"- `{t['nodeid']}` {t['outcome']}: {_cell(t['detail'][-600:])}" for t in failed]
    out += ["", "## Acceptance", "", "| criterion | status | detail |", "| --- | --- | --- |"]
    out += [f"| {c['name']} | {c['status']} | {_cell(c['detail'])} |" for c in acc["criteria"]]
    return "\n".join(out) + "\n"
