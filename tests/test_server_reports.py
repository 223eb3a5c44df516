"""Per-deployment report files: JSON, Markdown and the latency plot."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np

from agent.measure.stats import histogram, summarize
from server.gate import evaluate
from server.policy import load_policy
from server.registry import DeploymentRecord, Registry
from server.reports import LATENCY_PNG, REPORT_JSON, REPORT_MD, ReportQueue, write_report

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


def _measured_deployments(registry: Registry, artifact_dir: Path, n: int) -> list[DeploymentRecord]:
    """`n` deployments of one registered artifact, each with a report holding a latency histogram."""
    artifact = registry.register(artifact_dir)
    records = []
    for i in range(n):
        dep = registry.create_deployment(artifact, f"pi-{i}", chunk_size=4096, policy=None, deadline_s=600,
                                         status="measuring")
        records.append(registry.update_deployment(dep.deployment_id, report=_report(with_histogram=True)))
    return records


def _submit_together(queue: ReportQueue, records: list[DeploymentRecord]) -> None:
    """Queue every record behind a held writer thread, as when a wave's deployments end at once."""
    import threading

    gate = threading.Event()
    queue._executor.submit(gate.wait, 30)
    for record in records:
        queue.submit(record)
    gate.set()
    queue.wait()


def test_report_queue_spends_a_bounded_share_on_plots_and_says_when_it_skipped_one(
        tmp_path: Path, tiny_artifact: Path) -> None:
    """A wave finishing at once must not keep the server drawing PNGs (~45 ms each): after a PNG
    the next waits for its share of time; skipped ones say so in their Markdown; a lone
    deployment later gets its PNG again."""
    import time


    registry = Registry(tmp_path / "reg")
    queue = ReportQueue(registry, plot_cpu_share=0.05, plot_burst_s=0.0)
    try:
        deps = _measured_deployments(registry, tiny_artifact, 7)
        _submit_together(queue, deps[:6])  # six queued behind a held writer, as in a wave
        drawn = [(registry.reports_dir / d.deployment_id / LATENCY_PNG).is_file() for d in deps[:6]]
        assert drawn == [True, False, False, False, False, False]  # the first PNG buys 19x its time of rest
        assert (queue.plots_drawn, queue.plots_skipped) == (1, 5)
        assert queue.plot_budget_s() < 0
        md = (registry.reports_dir / deps[1].deployment_id / REPORT_MD).read_text()
        assert "latency.png not drawn: the server spends at most 5% of its time on plots" in md
        assert "![latency]" not in md
        stored = json.loads((registry.reports_dir / deps[1].deployment_id / REPORT_JSON).read_text())
        assert stored["report"]["latency_ms"]["p90"] == deps[1].report["latency_ms"]["p90"]
        # Once the share is respected again, the next deployment gets its PNG.
        time.sleep(-queue.plot_budget_s() / queue.plot_cpu_share + 0.05)
        queue.submit(deps[6])
        queue.wait()
        assert (registry.reports_dir / deps[6].deployment_id / LATENCY_PNG).is_file()
    finally:
        queue.close()
        registry.close()


def test_report_queue_draws_every_png_of_a_few_deployments_ending_together(
        tmp_path: Path, tiny_artifact: Path) -> None:

    registry = Registry(tmp_path / "reg")
    queue = ReportQueue(registry, plot_cpu_share=0.05, plot_burst_s=30.0)
    try:
        records = _measured_deployments(registry, tiny_artifact, 4)
        _submit_together(queue, records)
        assert all((registry.reports_dir / r.deployment_id / LATENCY_PNG).is_file() for r in records)
        assert (queue.plots_drawn, queue.plots_skipped) == (4, 0)
    finally:
        queue.close()
        registry.close()


def test_report_queue_refuses_a_share_outside_0_to_1(tmp_path: Path) -> None:
    import pytest


    registry = Registry(tmp_path / "reg")
    try:
        with pytest.raises(ValueError, match="plot_cpu_share must be in"):
            ReportQueue(registry, plot_cpu_share=0.0)
    finally:
        registry.close()


def test_a_skipped_png_is_drawn_once_on_demand_and_never_for_a_report_without_figures(
        tmp_path: Path, tiny_artifact: Path) -> None:
    from server.reports import draw_missing_plot, plottable, write_record_report
    from server.web.views import report_files

    registry = Registry(tmp_path / "reg")
    try:
        artifact = registry.register(tiny_artifact)
        made = {}
        for name, report in (("figures", _report(with_histogram=True)),
                             ("none", {"load_ok": False, "error_kind": "load_error", "error": "no kernel",
                                       "latency_ms": {"n": 0}})):
            dep = registry.create_deployment(artifact, f"pi-{name}", chunk_size=4096, policy=None, deadline_s=600,
                                             status="measuring")
            made[name] = registry.update_deployment(dep.deployment_id, report=report)
            write_record_report(registry.reports_dir, made[name], plot=False, plot_note="(skipped)")
        assert plottable(made["figures"].report["latency_ms"]) and not plottable(made["none"].report["latency_ms"])
        ok, empty = made["figures"].deployment_id, made["none"].deployment_id
        assert report_files(registry, ok, made["figures"].report) == ["report.md", "report.json", LATENCY_PNG]
        assert LATENCY_PNG not in report_files(registry, empty, made["none"].report)
        png = draw_missing_plot(registry, ok)
        assert png is not None and png.read_bytes().startswith(b"\x89PNG")
        assert f"![latency]({LATENCY_PNG})" in (registry.reports_dir / ok / REPORT_MD).read_text()
        stamp = png.stat().st_mtime_ns
        assert draw_missing_plot(registry, ok) == png and png.stat().st_mtime_ns == stamp  # not drawn twice
        assert draw_missing_plot(registry, empty) is None
        assert not (registry.reports_dir / empty / LATENCY_PNG).exists()
        assert not list((registry.reports_dir / ok).glob(".*.tmp"))  # written whole, no temp file left
    finally:
        registry.close()
