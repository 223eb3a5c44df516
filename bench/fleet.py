"""Fleet-scale benchmark: N simulated devices, bridged edge brokers, PostgreSQL, server processes.

    python bench/fleet.py --json OUT [--agents 10000] [--procs 4] [--edges 2] [--servers 2] [--faults]
                              [--heartbeat-s 30]

Each simulated device is its own MQTT 5 session (`agent-<id>`, persistent, with a Last Will) on
one of `--edges` mosquitto brokers bridged (mosquitto's bridge) to a core mosquitto; `--servers`
real `edgeguide-server serve` processes share the device traffic through the core's `$share`
group and keep the registry in PostgreSQL. Devices are multiplexed on one asyncio loop per
simulator process (bench/fleetsim): paho's loop thread per device used select(), and a paho
client whose socket descriptor is 1,024 or more never connects (select() raises, paho calls
it a lost connection and retries forever) - why 2,000 agents on 4 processes never finished.

Two phases: ingest (one report per device for a deployment already measuring: reports_per_s,
lost_reports, p99) and a staged rollout of a new version to every device (canary, then waves)
run by the server processes to its end (rollout_seconds, duplicate deployments, outcomes).
--faults drops edge 0's bridge and SIGKILLs server 1 (restarted after 5 s) as wave 1 starts and
restarts PostgreSQL as wave 2 starts. Never run in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fleetsim import run as fleetrun  # noqa: E402 - after the sys.path line
from bench.fleetsim.stack import Stack  # noqa: E402

_LOGGER = logging.getLogger("bench.fleet")
TARGET_REPORTS_PER_S = 767.0  # 1,000 paho agents on this machine before this design (issue 17)


def _tiny_artifact(root: Path) -> Path:
    """Train and export a tiny real model (200 customers, 1 epoch) when no artifact is given."""
    from compression.data import load_dataset
    from compression.export import export_artifact
    from compression.train import TrainConfig, train_reference

    dataset = load_dataset(max_customers=200)
    model, _ = train_reference(dataset, TrainConfig(epochs=1, dim=8, hidden=16, window=10, batch_size=256),
                               progress=False)
    return export_artifact(model, dataset, root / "tiny", model_id="fleet-tiny", k=10, check_compat=False)


class PeakSampler:
    """Peak RSS of processes by pid, sampled every `every_s` on a thread (servers restart: new pids)."""

    def __init__(self, pids: Any, every_s: float = 1.0) -> None:
        self.pids = pids  # callable -> {name: pid}
        self.every_s = every_s
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every_s):
            for name, pid in self.pids().items():
                try:
                    rss = psutil.Process(pid).memory_info().rss / 2**20
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak.get(name, 0.0), rss)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def wait_servers(registry: Any, names: list[str], since: float, timeout: float = 120) -> None:
    """Until every server process stamped its row (it is connected and subscribed by then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = registry.db.query("SELECT client_id, last_seen FROM servers")
        if {r["client_id"] for r in rows if float(r["last_seen"]) >= since} >= set(names):
            return
        time.sleep(0.5)
    raise RuntimeError(f"server processes {names} did not all come up within {timeout} s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the brokers inherit it: 10,000+ sockets
    work = Path(tempfile.mkdtemp(prefix="edgeguide-fleet-"))
    started = time.time()
    stack = Stack(work, fleetrun.new_prefix(), edges=args.edges, servers=args.servers, relay_bridges=args.faults,
                  bridge_cut_s=5.0).start()
    server_names = [f"fleet-server-{n}" for n in range(args.servers)]
    faults: list[dict[str, Any]] = []
    try:
        registry = stack.registry()
        artifact_dir = Path(args.artifact) if args.artifact else _tiny_artifact(work)
        v1 = registry.register(artifact_dir)
        wait_servers(registry, server_names, started)
        brokers_before = {f"edge-{n}": _rss_mib(b.proc.pid) for n, b in enumerate(stack.edge_brokers)}
        brokers_before["core"] = _rss_mib(stack.core.proc.pid)

        def pids() -> dict[str, int]:
            out = {f"fleet-server-{n}": p.pid for n, p in stack.server_procs.items()}
            out.update({f"edge-{n}": b.proc.pid for n, b in enumerate(stack.edge_brokers)})
            out["core"] = stack.core.proc.pid
            for n, proc in enumerate(fleet.procs if fleet is not None else []):
                if proc.pid is not None:
                    out[f"sim-{n}"] = proc.pid
            return out

        fleet: fleetrun.Fleet | None = None

        with PeakSampler(pids) as sampler:
            fleet = fleetrun.Fleet(stack, args.agents, args.procs, heartbeat_s=args.heartbeat_s)
            t_connect = time.time()
            connected = fleet.start(timeout=900)
            connect_s = time.time() - t_connect
            fleetrun.wait_known(registry, fleet.device_ids, 900)
            known_s = time.time() - t_connect
            brokers_after = {f"edge-{n}": _rss_mib(b.proc.pid) for n, b in enumerate(stack.edge_brokers)}
            _LOGGER.info("%d devices connected in %.1f s, all known to the registry after %.1f s", connected,
                         connect_s, known_s)
            cpu0 = cpu_by_component(stack, fleet)
            ingest = fleetrun.ingest(fleet, registry, v1, timeout=args.drain_timeout)
            cpu1 = cpu_by_component(stack, fleet)
            ingest_cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0}
            _LOGGER.info("ingest: %s", {k: ingest[k] for k in ("reports_per_s", "lost_reports", "p99_ingest_ms")})
            v2 = registry.register(artifact_dir)
            db0 = stack.db.stats()

            def on_stage(stage: int) -> None:
                if not args.faults:
                    return
                if stage == 1:
                    faults.append({"at_s": round(time.time() - t_rollout, 1), "fault": "bridge edge-0 dropped for 5 s"})
                    stack.cut_bridge(0)
                    faults.append({"at_s": round(time.time() - t_rollout, 1), "fault": "server 1 SIGKILLed"})
                    stack.kill_server(1)
                    threading.Timer(5.0, lambda: (stack.start_server(1), faults.append(
                        {"at_s": round(time.time() - t_rollout, 1), "fault": "server 1 restarted"}))).start()
                elif stage == 2:
                    faults.append({"at_s": round(time.time() - t_rollout, 1), "fault": "PostgreSQL restarted"})
                    stack.db.restart()

            t_rollout = time.time()
            canary = max(1, args.agents * args.canary_pct // 100)
            rollout = fleetrun.rollout(registry, fleet.device_ids, v2, canary=canary, waves=args.waves,
                                       on_stage=on_stage, timeout=args.rollout_timeout)
            db1 = stack.db.stats()
            _LOGGER.info("rollout: %s", {k: rollout[k] for k in ("status", "rollout_seconds", "outcomes")})
            time.sleep(2.0)  # the last promoted states reach the devices' counters
            sims = fleet.stop()
        deployments = max(1, rollout["outcomes"].get("promoted", 0) + rollout["outcomes"].get("failed", 0))
        writes = {k: db1[k] - db0[k] for k in db1}
        handler_errors = int(registry.db.query("SELECT COUNT(*) AS n FROM events WHERE kind = 'handler_error'")
                             [0]["n"])
        registry.close()
    finally:
        stack_stats = stack.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    per_conn = {k: round((brokers_after[k] - brokers_before[k]) * 1024 / max(1, connected / args.edges), 1)
                for k in brokers_after}
    return {
        "agents": connected, "agents_requested": args.agents, "simulator_processes": args.procs,
        "heartbeat_s": args.heartbeat_s,
        "brokers": {"edges": args.edges, "core": 1, "kind": "mosquitto 2.0 (edges bridged to the core, QoS 1, "
                                                            "persistent bridge sessions)"},
        "database": "postgresql 15 (local cluster)", "server_processes": args.servers,
        "connect_seconds": round(connect_s, 1), "all_known_seconds": round(known_s, 1),
        **{k: ingest[k] for k in ("reports_sent", "reports_ingested", "lost_reports", "repeated_ingestions",
                                  "per_server", "reports_per_s", "p50_ingest_ms", "p99_ingest_ms")},
        "server_cpu_s_ingest": ingest_cpu["servers"],
        "cpu_s_ingest": ingest_cpu,
        "cpu_ms_per_report": {k: round(1000.0 * v / max(1, ingest["reports_ingested"]), 2)
                              for k, v in ingest_cpu.items()},
        "rollout": rollout, "rollout_seconds": rollout["rollout_seconds"], "rollout_finished": rollout["finished"],
        "duplicate_deployments": rollout["duplicate_deployments"],
        "devices_on_new_version": sims.get("active_versions", {}).get(str(v2.version), 0),
        "faults": faults, "handler_errors": handler_errors,
        "db_writes": {**writes, "per_deployment": {k: round(v / deployments, 1) for k, v in writes.items()}},
        # Sampled from outside: a spawned simulator's own ru_maxrss starts at its parent's high-water mark
        # (the benchmark process, TensorFlow loaded to train the tiny model), which says nothing of it.
        "peak_rss_mib": {"simulators": [round(v, 1) for k, v in sorted(sampler.peak.items()) if k.startswith("sim-")],
                         "servers": {k: round(v, 1) for k, v in sampler.peak.items() if k.startswith("fleet-server")},
                         "brokers": {k: round(v, 1) for k, v in sampler.peak.items()
                                     if k.startswith(("edge-", "core"))}},
        "broker_kib_per_connection": per_conn,
        "simulators": {k: v for k, v in sims.items() if k != "per_process_peak_rss_mib"},
        "bridges": stack_stats.get("bridge_relays"),
        "targets": {"lost_reports": 0, "duplicate_deployments": 0, "rollout_finished": True,
                    "reports_per_s_min": TARGET_REPORTS_PER_S},
        "meets_targets": bool(ingest["lost_reports"] == 0 and rollout["duplicate_deployments"] == 0
                              and rollout["finished"] and ingest["reports_per_s"] >= TARGET_REPORTS_PER_S),
        "context": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_1m_end": round(os.getloadavg()[0], 2)},
        "definitions": {
            "reports_per_s": "reports ingested / seconds from the simulators' go to the last first ingestion",
            "ingest": "publish on an edge broker -> bridge -> core -> a server worker decoded and recorded it",
            "db_writes": "pg_stat_database deltas over the rollout (commits, rows inserted/updated/deleted)",
            "broker_kib_per_connection": "edge broker RSS growth from no devices to all connected / devices on it",
        },
        "work_dir": str(work),
    }


def _cpu_s(pids: list[int], with_children: bool = False) -> float:
    """User + system CPU seconds used so far by `pids` (and, if asked, their live children)."""
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)] if with_children else [proc]
            for one in procs:
                with contextlib.suppress(psutil.Error):
                    total += sum(one.cpu_times()[:2])
    return total


def cpu_by_component(stack: Stack, fleet: fleetrun.Fleet) -> dict[str, float]:
    """CPU seconds so far per component: where a report's cost goes (docs/scaling.md)."""
    return {"servers": _cpu_s([p.pid for p in stack.server_procs.values()]),
            "simulators": _cpu_s([p.pid for p in fleet.procs if p.pid is not None]),
            "brokers": _cpu_s([b.proc.pid for b in stack.edge_brokers] + [stack.core.proc.pid]),
            "postgresql": _cpu_s([stack.db.pid()], with_children=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="write the figures here")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4, help="simulator processes (one event loop each)")
    parser.add_argument("--edges", type=int, default=2, help="edge brokers bridged to the core broker")
    parser.add_argument("--servers", type=int, default=2, help="server processes in the $share group")
    parser.add_argument("--artifact", help="artifact folder to register (default: train a tiny one)")
    parser.add_argument("--canary-pct", type=int, default=1, help="share of devices in the canary stage")
    parser.add_argument("--waves", type=int, default=3, help="waves after the canary")
    parser.add_argument("--faults", action="store_true", help="drop a bridge, kill a server, restart the database")
    parser.add_argument("--heartbeat-s", type=float, default=0.0,
                        help="each device sends a heartbeat this often, as agents do (agent default 30; 0: none)")
    parser.add_argument("--drain-timeout", type=float, default=900.0, help="seconds to wait for every report")
    parser.add_argument("--rollout-timeout", type=float, default=3600.0, help="seconds the rollout may take")
    args = parser.parse_args(argv)
    # SIGTERM (a `timeout`, a CI cancel) unwinds like Ctrl-C: the brokers, PostgreSQL and servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("server", "protocol", "bench.fleetsim"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("context", "definitions", "rollout")}, indent=1))
    return 0 if result["lost_reports"] == 0 and result["rollout_finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
