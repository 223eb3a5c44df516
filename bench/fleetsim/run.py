"""Drive a simulated fleet against a Stack: connect, an ingest burst, a staged rollout, with faults.

`Fleet` spawns the simulator processes (devices spread round-robin over the edge brokers and over
the processes); `ingest()` measures one report per device through the bridges into the server
processes; `rollout()` runs a canary + waves rollout to every device, calling `on_stage(stage)`
as each stage starts, so callers inject faults mid-wave.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.fleetsim import simproc
from bench.fleetsim.stack import Stack

_LOGGER = logging.getLogger(__name__)


class Fleet:
    """`agents` simulated devices in `procs` processes, spread over the stack's edge brokers."""

    def __init__(self, stack: Stack, agents: int, procs: int, id_prefix: str = "sim", heartbeat_s: float = 0.0) -> None:
        self.stack = stack
        self.device_ids = [f"{id_prefix}-{i:05d}" for i in range(agents)]
        edges = stack.edge_endpoints()
        ctx = mp.get_context("spawn")
        self.commands = [ctx.Queue() for _ in range(procs)]
        self.answers = [ctx.Queue() for _ in range(procs)]
        key_pem = Path(stack.server_key).read_bytes()
        self.assignment: list[list[str]] = [[] for _ in range(procs)]
        self.procs = []
        for p in range(procs):
            mine = [(d, *edges[i % len(edges)]) for i, d in enumerate(self.device_ids) if i % procs == p]
            self.assignment[p] = [d for d, _h, _p in mine]
            self.procs.append(ctx.Process(target=simproc.main, args=(mine, stack.prefix, key_pem, self.commands[p],
                                                                     self.answers[p], heartbeat_s), daemon=True))
        self.stats: list[dict[str, Any]] = []

    def start(self, timeout: float = 600) -> int:
        """Connected devices once every process is ready."""
        for p in self.procs:
            p.start()
        return sum(self._answer(p, "ready", timeout) for p in range(len(self.procs)))

    def _answer(self, p: int, kind: str, timeout: float) -> Any:
        got, value = self.answers[p].get(timeout=timeout)
        if got != kind:
            raise RuntimeError(f"simulator {p} answered {got!r}, expected {kind!r}")
        return value

    def send_reports(self, specs: dict[str, tuple[str, str, int, int]], timeout: float = 600) -> dict[str, float]:
        """Every device named publishes one report now; deployment id -> publish time."""
        for p, mine in enumerate(self.assignment):
            self.commands[p].put(("report", {d: specs[d] for d in mine if d in specs}))
        sent: dict[str, float] = {}
        for p in range(len(self.procs)):
            sent.update(self._answer(p, "reported", timeout))
        return sent

    def counters(self, kind: str = "stats", timeout: float = 120) -> dict[str, Any]:
        for q in self.commands:
            q.put((kind, None))
        per = [self._answer(p, "stopped" if kind == "stop" else "stats", timeout) for p in range(len(self.procs))]
        total: dict[str, Any] = {"per_process_peak_rss_mib": [round(s["peak_rss_mib"], 1) for s in per]}
        for s in per:
            for k, v in s.items():
                if isinstance(v, int | float) and k != "peak_rss_mib":
                    total[k] = total.get(k, 0) + v
            for version, n in s["active_versions"].items():
                total.setdefault("active_versions", {})[version] = total.get("active_versions", {}).get(version, 0) + n
        return total

    def stop(self) -> dict[str, Any]:
        try:
            totals = self.counters("stop")
        finally:
            for p in self.procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
        return totals


def wait_known(registry: Any, device_ids: list[str], timeout: float) -> None:
    """Until the servers recorded every device's retained state."""
    deadline = time.monotonic() + timeout
    want = set(device_ids)
    while True:
        rows = registry.db.query("SELECT device_id FROM devices")
        missing = want - {r["device_id"] for r in rows}
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(missing)} devices never reached the registry, e.g. {sorted(missing)[:3]}")
        time.sleep(0.5)


def ingest(fleet: Fleet, registry: Any, artifact: Any, timeout: float = 600) -> dict[str, Any]:
    """One report per device for a deployment already measuring; figures of their ingestion."""
    deps: dict[str, str] = {}
    with registry.db.transaction():
        for device_id in fleet.device_ids:
            deps[device_id] = registry.create_deployment(artifact, device_id, chunk_size=65536, policy=None,
                                                         deadline_s=3600, status="measuring").deployment_id
    specs = {d: (dep, artifact.model_id, artifact.version, artifact.size) for d, dep in deps.items()}
    t0 = time.time()
    sent = fleet.send_reports(specs)
    deadline = time.monotonic() + timeout
    wanted = set(deps.values())
    ingested: dict[str, float] = {}
    while time.monotonic() < deadline:
        rows = registry.db.query("SELECT deployment_id, MIN(ts) AS ts FROM events WHERE kind = 'ingest:report' "
                                 "AND deployment_id IS NOT NULL GROUP BY deployment_id")
        ingested = {r["deployment_id"]: float(r["ts"]) for r in rows if r["deployment_id"] in wanted}
        if len(ingested) >= len(wanted):
            break
        time.sleep(0.5)
    per_server = {r["detail"]: int(r["n"]) for r in registry.db.query(
        "SELECT detail, COUNT(*) AS n FROM events WHERE kind = 'ingest:report' GROUP BY detail")}
    repeated = int(registry.db.query(
        "SELECT COUNT(*) - COUNT(DISTINCT deployment_id) AS d FROM events WHERE kind = 'ingest:report'")[0]["d"])
    latencies = sorted((ingested[d] - sent[d]) * 1000.0 for d in sent if d in ingested)
    last = max(ingested.values()) if ingested else t0
    return {"reports_sent": len(sent), "reports_ingested": len(ingested),
            "lost_reports": len(wanted - set(ingested)), "repeated_ingestions": repeated,
            "per_server": per_server, "reports_per_s": round(len(ingested) / max(1e-9, last - t0), 1),
            "p50_ingest_ms": round(latencies[len(latencies) // 2], 1) if latencies else None,
            "p99_ingest_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)
            if latencies else None}


def rollout(registry: Any, device_ids: list[str], artifact: Any, *, canary: int, waves: int,
            on_stage: Callable[[int], None] | None = None, timeout: float = 1800,
            poll_s: float = 0.5) -> dict[str, Any]:
    """A canary + waves rollout of `artifact` to every device, run by the server processes to its end."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from server.deployer import Deployer
    from server.policy import Policy
    from server.rollout import FINISHED, RolloutManager, make_plan

    # Records the rollout only; the server processes' ticks run it (this deployer never publishes).
    def no_publish(_topic: str, _payload: bytes) -> None:
        raise RuntimeError("the benchmark process never publishes")

    manager = RolloutManager(registry, Deployer(registry, Ed25519PrivateKey.generate(), no_publish,
                                                policy=Policy.from_dict({"name": "fleet", "limits": []})))
    plan = make_plan([("canary", device_ids[:canary])], device_ids, waves, max_failure_pct=1.0)
    t0 = time.time()
    record = manager.create(artifact.model_id, plan, version=artifact.version)
    seen_stage = -1
    stage_started: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = query_retrying(registry, "SELECT status, stage FROM rollouts WHERE rollout_id = ?",
                             (record.rollout_id,))[0]
        if int(row["stage"]) != seen_stage:
            seen_stage = int(row["stage"])
            stage_started[seen_stage] = round(time.time() - t0, 2)
            if on_stage is not None and row["status"] not in FINISHED:
                on_stage(seen_stage)
        if row["status"] in FINISHED:
            break
        time.sleep(poll_s)
    seconds = time.time() - t0
    final = registry.db.query("SELECT status, stage, reason FROM rollouts WHERE rollout_id = ?",
                              (record.rollout_id,))[0]
    outcomes = {r["outcome"] or "none": int(r["n"]) for r in registry.db.query(
        "SELECT outcome, COUNT(*) AS n FROM rollout_devices WHERE rollout_id = ? GROUP BY outcome",
        (record.rollout_id,))}
    duplicates = int(registry.db.query(
        "SELECT COUNT(*) AS n FROM (SELECT device_id FROM deployments WHERE model_id = ? AND version = ? "
        "GROUP BY device_id HAVING COUNT(*) > 1) AS d", (artifact.model_id, artifact.version))[0]["n"])
    return {"rollout_id": record.rollout_id, "status": final["status"], "reason": final["reason"],
            "finished": final["status"] == "completed", "rollout_seconds": round(seconds, 1),
            "stages": [{"name": s.name, "devices": len(s.devices), "started_s": stage_started.get(i)}
                       for i, s in enumerate(plan.stages)],
            "outcomes": outcomes, "duplicate_deployments": duplicates}


def query_retrying(registry: Any, sql: str, params: tuple = (), timeout: float = 120) -> list[dict[str, Any]]:
    """registry.db.query, retried while the database restarts (a fault the benchmark injects)."""
    from server.db import DatabaseUnavailable

    deadline = time.monotonic() + timeout
    while True:
        try:
            return registry.db.query(sql, params)
        except DatabaseUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def new_prefix() -> str:
    return f"fleet-{secrets.token_hex(4)}"
