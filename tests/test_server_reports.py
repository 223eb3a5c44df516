"""Per-deployment report files: JSON, Markdown and the latency plot."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np

from agent.measure.stats import histogram, summarize
from server.gate import evaluate
from server.policy import load_policy
from server.reports import LATENCY_PNG, REPORT_JSON, REPORT_MD, write_report

DEPLOYMENT = {"deployment_id": "d-00000000beef", "device_id": "pi-1", "model_id": "tiny", "version": 3,
              "status": "passed", "reason": "all checks passed"}


def _report(with_histogram: bool) -> dict:
    samples = np.random.default_rng(0).gamma(4.0, 0.5, size=2000) + 1.0  # a skewed latency distribution
    latency = {**summarize(samples), "cold_start_ms": 12.0}
    if with_histogram:
        latency["histogram"] = histogram(samples)  # the agent's own format
    return {"device_id": "pi-1", "deployment_id": DEPLOYMENT["deployment_id"], "model_id": "tiny", "version": 3,
            "load_ok": True, "mode": "quick", "runtime": {"name": "ai-edge-litert", "version": "2.3.0"},
            "model_bytes": 171_476, "latency_ms": latency, "memory": {"peak_rss_mib": 61.0, "load_delta_mib": 4.0},
            "energy": {"source": "unavailable", "available": False, "reason": "no sensor"},
            "quality": {"agreement_at_k": 0.98, "ndcg_vs_reference": 0.99, "golden_n": 64},
            "context": {"cpu_model": "test cpu", "threads": 1, "after_latency": {"freq_mhz": 1.0}}}


def test_report_with_histogram_writes_json_markdown_and_png(tmp_path: Path) -> None:
    report = _report(with_histogram=True)
    verdict = evaluate(report, load_policy())
    folder = write_report(tmp_path, DEPLOYMENT, report, {"verdict": verdict.verdict, "checks": verdict.checks,
                                                        "reason": verdict.reason})
    assert folder == tmp_path / DEPLOYMENT["deployment_id"]
    stored = json.loads((folder / REPORT_JSON).read_text())
    assert stored["report"]["latency_ms"]["p90"] == report["latency_ms"]["p90"]
    image = matplotlib.image.imread(folder / LATENCY_PNG)
    assert image.shape[0] > 100 and image.shape[1] > 100
    md = (folder / REPORT_MD).read_text()
    assert "## Verdict: PASS" in md and "| p90_ms |" in md and "171,476 B" in md
    assert "unavailable-skipped (energy not measured: no sensor)" in md
    assert "cpu_model=test cpu" in md and "after_latency" not in md  # nested context is left to the JSON
    assert f"![latency]({LATENCY_PNG})" in md


def test_report_without_histogram_plots_percentiles_and_failed_load_has_no_plot(tmp_path: Path) -> None:
    folder = write_report(tmp_path, DEPLOYMENT, _report(with_histogram=False), None)
    assert (folder / LATENCY_PNG).read_bytes().startswith(b"\x89PNG")
    failed = {"load_ok": False, "error_kind": "op_version", "error": "Didn't find op for builtin opcode"}
    other = dict(DEPLOYMENT, deployment_id="d-00000000f00d", status="failed")
    folder = write_report(tmp_path, other, failed, None)
    assert not (folder / LATENCY_PNG).exists()
    assert "error (op_version): Didn't find op" in (folder / REPORT_MD).read_text()


def test_malformed_histogram_falls_back_without_losing_the_report(tmp_path: Path) -> None:
    report = _report(with_histogram=False)
    report["latency_ms"]["histogram"] = {"edges_ms": [0, 1], "counts": [1, 2, 3]}  # inconsistent
    folder = write_report(tmp_path, DEPLOYMENT, report, None)
    assert (folder / LATENCY_PNG).exists() and (folder / REPORT_MD).exists()
