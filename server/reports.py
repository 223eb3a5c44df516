"""Per-deployment report files: the raw JSON, a Markdown summary and a latency plot.

Written under `<data_dir>/reports/<deployment_id>/` so an operator can see why a model was
promoted or rolled back without querying the database. The plot is a histogram when the device
sent one (`latency_ms.histogram`), else a bar chart of the percentiles.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from protocol.files import atomic_write_text, temp_name
from server.gate import format_figure
from server.registry import DeploymentRecord, Registry

_LOGGER = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LATENCY_PNG = "latency.png"
# The latency summary figures drawn as bars when a report carries no histogram (also the dashboard's).
LATENCY_BARS = ("min", "p50", "p90", "p99", "max")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _histogram_parts(latency: dict[str, Any]) -> tuple[list[Any], list[Any]] | None:
    hist = latency.get("histogram") if isinstance(latency.get("histogram"), dict) else None
    edges = (hist or {}).get("edges_ms", (hist or {}).get("edges"))
    counts = (hist or {}).get("counts")
    if isinstance(edges, list) and isinstance(counts, list) and len(edges) == len(counts) + 1 and counts:
        return edges, counts
    return None


def plottable(latency: Any) -> bool:
    """Whether `latency_ms` of a report has something to draw (a histogram or percentiles)."""
    if not isinstance(latency, dict):
        return False
    return _histogram_parts(latency) is not None or bool(_bar_keys(latency))


def _bar_keys(latency: dict[str, Any]) -> list[str]:
    return [k for k in LATENCY_BARS if isinstance(latency.get(k), int | float)]


def plot_latency(latency: dict[str, Any], out: Path, title: str) -> Path | None:
    """Save a latency histogram (or percentile bars) as PNG; None if there is nothing to plot.

    Drawn on a `Figure` of its own (no pyplot state: the report writer and the dashboard's threads
    may draw at once) and written whole, so a reader never gets half a file.
    """
    from matplotlib.figure import Figure

    parts = _histogram_parts(latency)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    if parts is not None:
        edges, counts = parts
        widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
        ax.bar(edges[:-1], counts, width=widths, align="edge", color="#4477aa", edgecolor="white")
        for key, style in (("p50", "--"), ("p90", "-"), ("p99", ":")):
            if isinstance(latency.get(key), int | float):
                ax.axvline(latency[key], color="#cc3311", linestyle=style, label=f"{key} {latency[key]:.3g} ms")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("inferences")
        overflow = latency["histogram"].get("overflow")
        ax.set_title(f"{title} ({overflow} above p99 not shown)" if overflow else title, fontsize=9)
        ax.legend(fontsize=8)
    else:
        keys = _bar_keys(latency)
        if not keys:
            return None
        ax.bar(keys, [latency[k] for k in keys], color="#4477aa")
        ax.set_ylabel("latency (ms)")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = temp_name(out)
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


_DRAW_ON_DEMAND = threading.Lock()


def draw_missing_plot(registry: Registry, deployment_id: str) -> Path | None:
    """The latency PNG the report writer skipped (see ReportQueue), drawn now for a viewer.

    One drawing at a time and never twice: a burst of requests for the same or different pages
    costs at most one PNG each, and a report with nothing to plot is never drawn at all.
    """
    path = registry.reports_dir / deployment_id / LATENCY_PNG
    with _DRAW_ON_DEMAND:
        if path.is_file():
            return path
        dep = registry.deployment(deployment_id)
        if dep.report is None or not plottable(dep.report.get("latency_ms")):
            return None
        write_record_report(registry.reports_dir, dep, plot=True)
        return path if path.is_file() else None


def _markdown(deployment: dict[str, Any], report: dict[str, Any] | None, verdict: dict[str, Any] | None,
              plot: Path | None, plot_note: str = "") -> str:
    lines = [f"# Deployment {deployment['deployment_id']}", "",
             f"- device: `{deployment['device_id']}`",
             f"- model: `{deployment['model_id']}` version {deployment['version']}",
             f"- status: **{deployment['status']}** {deployment.get('reason') or ''}".rstrip(), ""]
    if verdict:
        lines += [f"## Verdict: {verdict.get('verdict')}", "", verdict.get("reason", ""), "",
                  "| check | figure | limit | outcome |", "| --- | --- | --- | --- |"]
        for c in verdict.get("checks", []):
            unit = c.get("unit") or ""
            outcome = c.get("outcome", "")
            if c.get("note"):
                outcome += f" ({c['note']})"
            lines.append(f"| {c.get('name')} | {format_figure(c.get('figure'), unit)} | {c.get('op', '')} "
                         f"{format_figure(c.get('limit'), unit)} | {outcome} |")
        lines.append("")
    if report:
        lat = report.get("latency_ms") or {}
        mem = report.get("memory") or {}
        energy = report.get("energy") or {}
        quality = report.get("quality") or {}
        ctx = report.get("context") or {}
        runtime = report.get("runtime") or {}
        lines += ["## Device measurements", "",
                  f"- mode: {_fmt(report.get('mode'))}, runtime: {_fmt(runtime.get('name'))} "
                  f"{_fmt(runtime.get('version'))}, load ok: {_fmt(report.get('load_ok'))}",
                  f"- latency ms: p50 {_fmt(lat.get('p50'))}, p90 {_fmt(lat.get('p90'))}, p99 {_fmt(lat.get('p99'))}, "
                  f"mean {_fmt(lat.get('mean'))} (n={_fmt(lat.get('n'))}), cold start {_fmt(lat.get('cold_start_ms'))}",
                  f"- memory MiB: peak RSS {_fmt(mem.get('peak_rss_mib'))}, "
                  f"load delta {_fmt(mem.get('load_delta_mib'))}",
                  f"- energy: source {_fmt(energy.get('source'))}, available {_fmt(energy.get('available'))}, "
                  f"net mJ/inference {_fmt(energy.get('net_mj_per_inference'))}",
                  f"- quality: agreement@k {_fmt(quality.get('agreement_at_k'))}, "
                  f"NDCG vs reference {_fmt(quality.get('ndcg_vs_reference'))} "
                  f"(golden n={_fmt(quality.get('golden_n'))})",
                  "- context: " + (", ".join(f"{k}={_fmt(v)}" for k, v in sorted(ctx.items())
                                             if not isinstance(v, dict | list)) or "n/a")]
        if report.get("error"):
            lines.append(f"- error ({_fmt(report.get('error_kind'))}): {report['error']}")
        if isinstance(lat, dict):
            lines += ["", *text_histogram(lat)]
        if plot is not None:
            lines += ["", f"![latency]({plot.name})"]
        elif plot_note:
            lines += ["", plot_note]
        lines.append("")
    return "\n".join(lines)


def text_histogram(latency: dict[str, Any], width: int = 40) -> list[str]:
    """The latency histogram as Markdown text bars: readable anywhere and cheap at fleet scale."""
    hist = latency.get("histogram") if isinstance(latency.get("histogram"), dict) else None
    edges = (hist or {}).get("edges_ms", (hist or {}).get("edges"))
    counts = (hist or {}).get("counts")
    if not (isinstance(edges, list) and isinstance(counts, list) and len(edges) == len(counts) + 1 and counts):
        return []
    top = max(max(counts), 1)
    lines = ["```", "latency (ms)        inferences"]
    for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True):
        bar = "#" * round(width * n / top)
        lines.append(f"{_fmt(lo, 3):>8}-{_fmt(hi, 3):<8} {bar} {n}")
    lines.append("```")
    return lines


def write_report(reports_dir: Path, deployment: dict[str, Any], report: dict[str, Any] | None,
                 verdict: dict[str, Any] | None, plot: bool = True, plot_note: str = "") -> Path:
    """Write report.json and report.md (with a text histogram) and, if `plot`, latency.png; returns the folder.

    The PNG costs ~0.15 s of CPU (matplotlib), so the server draws it once per deployment, off the
    ingestion path; the Markdown text histogram is always there. `plot_note` says in the Markdown
    why a PNG was not drawn.
    """
    folder = Path(reports_dir) / deployment["deployment_id"]
    folder.mkdir(parents=True, exist_ok=True)
    png = None
    latency = (report or {}).get("latency_ms")
    if plot and isinstance(latency, dict):
        title = f"{deployment['model_id']} v{deployment['version']} on {deployment['device_id']}"
        try:
            png = plot_latency(latency, folder / LATENCY_PNG, title)
        except (ValueError, TypeError) as exc:  # a malformed histogram must not lose the rest of the report
            _LOGGER.warning("latency plot for %s failed: %s", deployment["deployment_id"], exc)
    elif (folder / LATENCY_PNG).exists():
        png = folder / LATENCY_PNG
    # Replaced whole (a reader never sees half a file); not fsynced: they are redrawn from the registry.
    atomic_write_text(folder / REPORT_MD, _markdown(deployment, report, verdict, png, plot_note), durable=False)
    # JSON last: a report.json showing a status means the plot and Markdown of that status exist too.
    atomic_write_text(folder / REPORT_JSON, json.dumps({"deployment": deployment, "report": report,
                                                        "verdict": verdict}, indent=2, sort_keys=True), durable=False)
    _LOGGER.info("wrote report for %s in %s", deployment["deployment_id"], folder)
    return folder


def summary(dep: DeploymentRecord) -> dict[str, Any]:
    """The deployment fields a report shows."""
    return {"deployment_id": dep.deployment_id, "device_id": dep.device_id, "model_id": dep.model_id,
            "version": dep.version, "status": dep.status, "reason": dep.reason, "created": dep.created}


class ReportQueue:
    """Report files written in order on their own thread, so a finished deployment never holds up the
    messages of the next ones.

    A matplotlib PNG costs ~45 ms of CPU on the development VM, ~20 times a deployment's whole
    handling: a wave of thousands of devices finishing together would keep the server drawing
    instead of ingesting. So PNGs draw from a budget of CPU seconds: it holds up to
    `plot_burst_s` (a handful of deployments ending together all get their PNG) and refills at
    `plot_cpu_share` of the time that passes. Skipped PNGs say so in their Markdown, and the
    dashboard draws a missing PNG when someone opens it.
    """

    def __init__(self, registry: Registry, plot_cpu_share: float = 0.05, plot_burst_s: float = 0.5) -> None:
        if not 0 < plot_cpu_share <= 1:
            raise ValueError(f"plot_cpu_share must be in (0, 1], got {plot_cpu_share}")
        if plot_burst_s < 0:
            raise ValueError(f"plot_burst_s must be >= 0, got {plot_burst_s}")
        self.registry = registry
        self.plot_cpu_share = plot_cpu_share
        self.plot_burst_s = plot_burst_s
        self.plots_drawn = 0
        self.plots_skipped = 0
        self._budget_s = plot_burst_s
        self._budget_at = time.monotonic()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeguide-reports")

    def plot_budget_s(self) -> float:
        """CPU seconds left for PNGs now (a PNG is drawn while this is >= 0, which it may take below zero)."""
        now = time.monotonic()
        self._budget_s = min(self.plot_burst_s, self._budget_s + (now - self._budget_at) * self.plot_cpu_share)
        self._budget_at = now
        return self._budget_s

    def submit(self, record: DeploymentRecord, plot: bool = True) -> None:
        """Queue the report files of `record` (the row as just written: the writer thread never reads
        the database, so it never waits for the worker's transactions); the PNG only once, at the end."""
        try:
            self._executor.submit(self._write_now, record, plot)
        except RuntimeError:  # closed: write it here rather than lose it
            self._write_now(record, plot)

    def wait(self, timeout: float = 30.0) -> None:
        """Block until the report files queued so far are written (TimeoutError after `timeout`)."""
        with contextlib.suppress(RuntimeError):  # closed: close() already waited for them
            self._executor.submit(lambda: None).result(timeout)

    def close(self) -> None:
        """Write the report files still queued."""
        self._executor.shutdown(wait=True)

    def _write_now(self, record: DeploymentRecord, plot: bool) -> None:
        note = ""
        if plot and self.plot_budget_s() < 0:
            plot = False
            self.plots_skipped += 1
            note = (f"(latency.png not drawn: the server spends at most {self.plot_cpu_share:.0%} of its time on "
                    f"plots while many deployments end together; the dashboard draws it when opened)")
        started = time.monotonic()
        write_record_report(self.registry.reports_dir, record, plot, plot_note=note)
        if plot:
            self.plots_drawn += 1
            self._budget_s = self.plot_budget_s() - (time.monotonic() - started)


def write_record_report(reports_dir: Path, dep: DeploymentRecord, plot: bool = True, plot_note: str = "") -> None:
    """Files of one deployment record (see write_report), if it has a report; errors are logged."""
    if dep.report is None:
        return
    try:
        write_report(reports_dir, summary(dep), dep.report, dep.verdict, plot=plot, plot_note=plot_note)
    except OSError as exc:  # the verdict stands even if the disk is full
        _LOGGER.error("could not write the report files of %s: %s", dep.deployment_id, exc)
    except Exception:  # a report bug must not silently stop the writer thread's later reports
        _LOGGER.exception("report files of %s failed", dep.deployment_id)
