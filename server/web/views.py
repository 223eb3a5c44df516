"""What each dashboard page shows, built from the registry's public read methods and report files.

Nothing here writes. The fleet view joins every device with the figures of its newest deployment
that carries a device report; that join is the costly part of a page with 1,000+ devices, so it
is a snapshot refreshed in the background (`FleetCache`), filtered, sorted and paginated in memory.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.gate import finite_number
from server.registry import DeploymentRecord, Registry, RegistryError
from server.reports import LATENCY_BARS, plottable

_LOGGER = logging.getLogger(__name__)

# How many of the newest deployments the fleet view scans for each device's last figures.
FLEET_DEPLOYMENT_SCAN = 20_000
PAGE_SIZES = (25, 50, 100, 200)
DEFAULT_PAGE_SIZE = 50
SORT_KEYS = ("device_id", "status", "runtime", "cpu_model", "active", "last_seen", "p90_ms", "rss_mib",
             "agreement")


@dataclass(frozen=True)
class FleetRow:
    """One device as the fleet table shows it."""

    device_id: str
    online: bool
    status: str
    runtime: str
    agent_version: str
    cpu_model: str
    active: str
    last_seen: float
    p90_ms: float | None
    rss_mib: float | None
    agreement: float | None
    last_error: str
    last_deployment: str | None

    def search_text(self) -> str:
        return " ".join((self.device_id, self.status, self.runtime, self.cpu_model, self.active)).lower()


@dataclass(frozen=True)
class FleetQuery:
    """Filter, sort and page of the fleet table (from the URL, so a page can be linked and polled)."""

    q: str = ""
    status: str = "all"
    sort: str = "device_id"
    desc: bool = False
    page: int = 1
    per_page: int = DEFAULT_PAGE_SIZE

    @classmethod
    def from_params(cls, params: Any) -> FleetQuery:
        """Clamp every value to something valid: a bad URL shows the first page, never an error."""
        def number(name: str, default: int) -> int:
            try:
                return int(params.get(name, default))
            except (TypeError, ValueError):
                return default

        status = params.get("status", "all")
        sort = params.get("sort", "device_id")
        per_page = number("per_page", DEFAULT_PAGE_SIZE)
        return cls(q=str(params.get("q", ""))[:100].strip(),
                   status=status if status in ("all", "online", "offline") else "all",
                   sort=sort if sort in SORT_KEYS else "device_id",
                   desc=params.get("desc") in ("1", "true"),
                   page=max(1, number("page", 1)),
                   per_page=per_page if per_page in PAGE_SIZES else DEFAULT_PAGE_SIZE)

    def params(self, **changes: Any) -> dict[str, str]:
        """URL parameters of this query with `changes` applied (for sort links and page links)."""
        values = {"q": self.q, "status": self.status, "sort": self.sort, "desc": "1" if self.desc else "0",
                  "page": str(self.page), "per_page": str(self.per_page)}
        values.update({k: str(v) for k, v in changes.items()})
        return values


@dataclass(frozen=True)
class FleetPage:
    """The rows of one page plus the counts the header shows."""

    rows: list[FleetRow]
    total: int
    matching: int
    online: int
    page: int
    pages: int
    query: FleetQuery



def _sub(parent: dict[str, Any], key: str) -> dict[str, Any]:
    """`parent[key]` when it is a JSON object, else {} (device reports are untrusted input)."""
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def _figures(report: dict[str, Any] | None) -> dict[str, Any]:
    report = report or {}
    latency = _sub(report, "latency_ms")
    memory = _sub(report, "memory")
    quality = _sub(report, "quality")
    context = _sub(report, "context")
    cpu = context.get("cpu_model")
    return {"p90_ms": finite_number(latency.get("p90")), "rss_mib": finite_number(memory.get("peak_rss_mib")),
            "agreement": finite_number(quality.get("agreement_at_k")), "cpu_model": cpu if isinstance(cpu, str) else ""}


def fleet_rows(registry: Registry) -> list[FleetRow]:
    """Every device with its newest report's figures (one devices() and one deployments() read)."""
    last: dict[str, DeploymentRecord] = {}
    for dep in registry.deployments(limit=FLEET_DEPLOYMENT_SCAN):  # newest first
        if dep.report is not None and dep.device_id not in last:
            last[dep.device_id] = dep
    rows = []
    for d in registry.devices():
        newest = last.get(d.device_id)
        figures = _figures(newest.report if newest else None)
        runtime = d.runtime or {}
        rows.append(FleetRow(
            device_id=d.device_id, online=d.status == "online", status=d.status,
            runtime=" ".join(str(runtime[k]) for k in ("name", "version") if runtime.get(k)) or "-",
            agent_version=d.agent_version or "-", cpu_model=figures["cpu_model"] or "-",
            active=f"{d.active_model_id}@{d.active_version}" if d.active_model_id else "-",
            last_seen=d.last_seen, p90_ms=figures["p90_ms"], rss_mib=figures["rss_mib"],
            agreement=figures["agreement"], last_error=d.last_error or "",
            last_deployment=newest.deployment_id if newest else None))
    return rows


class FleetCache:
    """The latest `fleet_rows` snapshot, refreshed in the background once it is `ttl_s` old.

    A request never waits for the registry read except the very first one: a stale snapshot is
    served while one refresh runs (stale-while-revalidate), so a page with 1,000+ devices costs
    only the filter, sort and render, and any number of polling browsers cause at most one read
    per `ttl_s`. `last_build_s` is how long the latest read took (the benchmark reports it)."""

    def __init__(self, registry: Registry, ttl_s: float = 1.0) -> None:
        self.registry = registry
        self.ttl_s = ttl_s
        self.last_build_s = 0.0
        self._lock = threading.Lock()
        self._rows: list[FleetRow] | None = None
        self._at = -math.inf
        self._refreshing = False

    def _build(self) -> None:
        started = time.monotonic()
        try:
            rows = fleet_rows(self.registry)
        except Exception:  # a failed read keeps the previous snapshot; the next request retries
            _LOGGER.exception("fleet snapshot refresh failed")
            with self._lock:
                self._refreshing = False
            return
        with self._lock:
            self._rows, self._at, self._refreshing = rows, started, False
            self.last_build_s = time.monotonic() - started

    def rows(self) -> list[FleetRow]:
        with self._lock:
            rows, fresh = self._rows, time.monotonic() - self._at < self.ttl_s
            start_refresh = rows is not None and not fresh and not self._refreshing
            if start_refresh:
                self._refreshing = True
        if rows is None:
            self._build()
            with self._lock:
                return self._rows or []
        if start_refresh:
            threading.Thread(target=self._build, name="edgeguide-fleet-snapshot", daemon=True).start()
        return rows


def _sort_value(row: FleetRow, key: str) -> tuple[int, Any]:
    value = getattr(row, key)
    # Missing figures sort last in either direction's natural reading (kept as a separate group).
    return (1, 0) if value is None or value == "-" else (0, value)


def fleet_page(rows: list[FleetRow], query: FleetQuery) -> FleetPage:
    """Filter by text and status, sort, and cut one page."""
    needle = query.q.lower()
    matching = [r for r in rows if (query.status == "all" or r.status == query.status)
                and (not needle or needle in r.search_text())]
    present = [r for r in matching if _sort_value(r, query.sort)[0] == 0]
    missing = [r for r in matching if _sort_value(r, query.sort)[0] == 1]
    present.sort(key=lambda r: (getattr(r, query.sort), r.device_id), reverse=query.desc)
    ordered = present + sorted(missing, key=lambda r: r.device_id)
    pages = max(1, math.ceil(len(ordered) / query.per_page))
    page = min(query.page, pages)
    start = (page - 1) * query.per_page
    return FleetPage(ordered[start:start + query.per_page], len(rows), len(matching),
                     sum(1 for r in rows if r.online), page, pages, query)


# ---- deployments and rollouts ---------------------------------------------------------------
@dataclass(frozen=True)
class DeploymentView:
    """One deployment with what its page shows next to the record itself."""

    record: DeploymentRecord
    timeline: list[dict[str, Any]]
    checks: list[dict[str, Any]]
    histogram: dict[str, Any] | None
    energy: str
    quality: dict[str, Any]
    paired: dict[str, Any] | None
    report_files: list[str]
    figures: dict[str, Any] = field(default_factory=dict)


REPORT_FILES = ("report.md", "report.json", "latency.png")


def report_files(registry: Registry, deployment_id: str, report: dict[str, Any] | None = None) -> list[str]:
    """Which of the deployment's report files exist on disk (names only, never a path from the URL),
    plus a latency.png the report writer skipped but that can be drawn from `report` (the route draws it)."""
    folder = registry.reports_dir / deployment_id
    present = [name for name in REPORT_FILES if (folder / name).is_file()]
    if "report.json" in present and "latency.png" not in present and report and plottable(report.get("latency_ms")):
        present.append("latency.png")
    return present


def _histogram(report: dict[str, Any]) -> dict[str, Any] | None:
    latency = _sub(report, "latency_ms")
    hist = _sub(latency, "histogram")
    edges = hist.get("edges_ms", hist.get("edges"))
    counts = hist.get("counts")
    marks = {k: finite_number(latency.get(k)) for k in ("p50", "p90", "p99")}
    if isinstance(edges, list) and isinstance(counts, list) and len(edges) == len(counts) + 1 and counts \
            and all(finite_number(e) is not None for e in edges) and all(finite_number(c) is not None for c in counts):
        return {"edges": edges, "counts": counts, "marks": marks, "overflow": hist.get("overflow")}
    bars = {k: finite_number(latency.get(k)) for k in LATENCY_BARS}
    bars = {k: v for k, v in bars.items() if v is not None}
    return {"percentiles": bars, "marks": marks} if bars else None


def _energy(report: dict[str, Any]) -> str:
    energy = _sub(report, "energy")
    net = finite_number(energy.get("net_mj_per_inference"))
    if energy.get("available") and net is not None:
        return f"{net:.4g} mJ per inference (net), source {energy.get('source')}"
    why = energy.get("reason") or energy.get("source")
    return f"unavailable ({why})" if why else "unavailable"


def deployment_view(registry: Registry, deployment_id: str) -> DeploymentView:
    """RegistryError if there is no such deployment."""
    dep = registry.deployment(deployment_id)
    report = dep.report or {}
    timeline = [e for e in registry.events(deployment_id=deployment_id, limit=500)]
    quality = _sub(report, "quality")
    paired = report.get("paired") if isinstance(report.get("paired"), dict) else None
    return DeploymentView(dep, timeline, list((dep.verdict or {}).get("checks") or []),
                          _histogram(report) if report else None, _energy(report) if report else "no report yet",
                          quality, paired, report_files(registry, deployment_id, report), _figures(report))


@dataclass(frozen=True)
class StageView:
    """One stage (canary group or wave) of a rollout with its outcome counts."""

    index: int
    name: str
    members: list[dict[str, Any]]
    failed: int
    failure_pct: float
    state: str  # done, current, waiting


def rollout_stages(rollout: Any) -> list[StageView]:
    """Stages of a `RolloutRecord` with per-stage failure share (the figure the abort threshold applies to)."""
    stages = []
    for index, stage in enumerate(rollout.plan.stages):
        members = [rollout.devices[d] for d in stage.devices if d in rollout.devices]
        failed = sum(1 for m in members if m.get("outcome") == "failed")
        pct = 100.0 * failed / len(members) if members else 0.0
        if index < rollout.stage or (index == rollout.stage and rollout.finished):
            state = "done"
        elif index == rollout.stage:
            state = "current"
        else:
            state = "not started" if rollout.finished else "waiting"
        stages.append(StageView(index, stage.name, members, failed, pct, state))
    return stages


# ---- models and the compression search ----------------------------------------------------
def runtime_support(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """metrics.json `runtimes` as rows: runtime key, loads yes/no, the error if any."""
    runtimes = metrics.get("runtimes")
    if not isinstance(runtimes, dict):
        return []
    return [{"runtime": key, "loads": bool(entry.get("loads")), "error": entry.get("error") or ""}
            for key, entry in sorted(runtimes.items()) if isinstance(entry, dict)]


def recipe_text(metrics: dict[str, Any]) -> str:
    """The recipe (steps in order) or else the techniques of an artifact's metrics.json, for one cell."""
    recipe = metrics.get("recipe")
    if isinstance(recipe, list) and recipe:
        steps = [s.get("name") or s.get("technique") or json.dumps(s, sort_keys=True) if isinstance(s, dict)
                 else str(s) for s in recipe]
        return " → ".join(steps)
    techniques = metrics.get("techniques")
    if isinstance(techniques, list) and techniques:
        return ", ".join(str(t) for t in techniques)
    return "none (as trained)"


def search_files(paths: list[Path]) -> list[Path]:
    """The search.json files named by `paths` (a file, or a folder holding one)."""
    found = []
    for path in paths:
        candidate = path / "search.json" if path.is_dir() else path
        if candidate.is_file():
            found.append(candidate)
    return found


def size_ndcg_frontier(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The 2-D staircase of the best NDCG@10 reachable at each size (as the search's own pareto.png draws)."""
    stair: list[dict[str, Any]] = []
    best = -math.inf
    for point in sorted(points, key=lambda p: (p["kib"], -p["ndcg10"])):
        if point["ndcg10"] > best:
            stair.append({"name": point["name"], "kib": point["kib"], "ndcg10": point["ndcg10"]})
            best = point["ndcg10"]
    return stair


def load_search(path: Path) -> dict[str, Any]:
    """The chart data of one search.json: variants, frontier, reference, best and baselines.

    ValueError (with the file name) for a file that is not a finished search's JSON."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        ref = result["reference"]
        ref_point = {"name": "reference", "kib": ref["tflite_bytes"] / 1024, "ndcg10": ref["ndcg10"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a compression search result ({exc})") from exc
    front = set(result.get("pareto") or [])
    variants = [{"name": r["name"], "kib": r["tflite_bytes"] / 1024, "ndcg10": r["ndcg10"],
                 "front": r["name"] in front, "techniques": ", ".join(r.get("techniques") or []),
                 "quantization": r.get("quantization") or ""}
                for r in result.get("variants", [])
                if not r.get("error") and finite_number(r.get("tflite_bytes"))
                and finite_number(r.get("ndcg10")) is not None]
    baselines = []
    for name, fig in sorted((result.get("baselines") or {}).items()):
        if isinstance(fig, dict) and finite_number(fig.get("ndcg10")) is not None:
            baselines.append({"name": name, "ndcg10": fig["ndcg10"], "kib": None})
    tuned = (result.get("baselines") or {}).get("itemknn_tuned") or {}
    for key, table in sorted((tuned.get("tables") or {}).items()):
        baselines.append({"name": f"item-to-item {key} table", "ndcg10": table["ndcg10"], "kib": table["bytes"] / 1024})
    sknn = (result.get("baselines") or {}).get("sknn") or {}
    if sknn.get("device_bytes"):
        baselines.append({"name": "session-kNN store", "ndcg10": sknn["ndcg10"], "kib": sknn["device_bytes"] / 1024})
    best = result.get("best") or {}
    best_point = {"name": best.get("name"), "kib": best["tflite_bytes"] / 1024, "ndcg10": best["ndcg10"]} \
        if finite_number(best.get("tflite_bytes")) and finite_number(best.get("ndcg10")) is not None else None
    floor = finite_number(result.get("floor"))
    return {"file": str(path), "run": result.get("run") or path.parent.name, "reference": ref_point,
            "variants": variants, "frontier": size_ndcg_frontier(variants), "baselines": baselines, "best": best_point,
            "floor_ndcg": floor * ref["ndcg10"] if floor is not None else None}


def searches(paths: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every readable search's chart data, and one error line per unreadable file."""
    loaded, errors = [], []
    for path in search_files(paths):
        try:
            loaded.append(load_search(path))
        except ValueError as exc:
            _LOGGER.warning("%s", exc)
            errors.append(str(exc))
    return loaded, errors


def find_deployment(registry: Registry, deployment_id: str) -> DeploymentRecord | None:
    try:
        return registry.deployment(deployment_id)
    except RegistryError:
        return None
