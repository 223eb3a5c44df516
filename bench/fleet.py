"""Fleet-scale ingestion benchmark: N simulated agents report to server processes through mosquitto.

    python bench/fleet.py --json OUT [--agents 1000] [--procs 4] [--servers 2] [--artifact DIR]

Starts a loopback mosquitto, a registry with one real artifact (a tiny model is trained and
exported when --artifact is not given) and `--servers` real `edgeguide-server serve` processes
sharing the MQTT 5 `$share` group. Each simulated agent is its own paho client (own client id,
own connection), spread over `--procs` processes; it publishes one Report (QoS 1) for its own
deployment, which the servers decode, gate, answer with a signed verdict and record. Writes
`agents`, `reports_per_s`, `lost_reports`, `server_cpu_s`, `p99_ingest_ms` (publish -> taken by a
server worker and recorded) and the run's context. Never run in CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_LOGGER = logging.getLogger(__name__)


def _tiny_artifact(root: Path) -> Path:
    """Train and export a tiny real model (200 customers, 1 epoch) when no artifact is given."""
    from compression.data import load_dataset
    from compression.export import export_artifact
    from compression.train import TrainConfig, train_reference

    dataset = load_dataset(max_customers=200)
    model, _ = train_reference(dataset, TrainConfig(epochs=1, dim=8, hidden=16, window=10, batch_size=256),
                               progress=False)
    return export_artifact(model, dataset, root / "tiny", model_id="fleet-tiny", k=10, check_compat=False)


def _report_dict(device_id: str, deployment_id: str, model_id: str, version: int, size: int) -> dict[str, Any]:
    """The report a Pi-class device sends for a passing candidate (figures of a quick-mode run)."""
    return {"device_id": device_id, "deployment_id": deployment_id, "model_id": model_id, "version": version,
            "load_ok": True, "mode": "quick", "runtime": {"name": "ai-edge-litert", "version": "2.3.0"},
            "model_bytes": size,
            "latency_ms": {"p50": 0.2, "p90": 0.3, "p99": 0.5, "mean": 0.22, "std": 0.05, "min": 0.15, "max": 0.9,
                           "n": 1024, "duration_s": 60.0, "cold_start_ms": 3.0},
            "memory": {"peak_rss_mib": 45.0, "load_delta_mib": 2.0},
            "energy": {"source": "unavailable", "available": False},
            "quality": {"agreement_at_k": 1.0, "ndcg_vs_reference": 1.0, "golden_n": 64}}


def _agent_proc(broker_url: str, prefix: str, work: list[tuple[str, str]], model: tuple[str, int, int],
                ready: Any, go: Any, out: Any) -> None:
    """One process of simulated agents: one paho client (own identity) per device, one report each."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from protocol.messages import Report
    from protocol.topics import Topics

    host, port = broker_url.removeprefix("mqtt://").rsplit(":", 1)
    topics = Topics(prefix)
    clients = []
    for device_id, _dep in work:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-{device_id}",
                             protocol=paho.MQTTv5)
        client.connect(host, int(port), keepalive=120)
        client.loop_start()
        clients.append(client)
    deadline = time.monotonic() + 120
    while not all(c.is_connected() for c in clients) and time.monotonic() < deadline:
        time.sleep(0.05)
    ready.put(sum(c.is_connected() for c in clients))
    go.wait()
    sent, infos = {}, []
    for client, (device_id, dep_id) in zip(clients, work, strict=True):
        report = Report.from_dict({**_report_dict(device_id, dep_id, *model), "ts": time.time()})
        sent[dep_id] = report.ts
        infos.append(client.publish(topics.up(device_id, "report"), report.to_json(), qos=1))
    acked = 0
    for info in infos:
        try:
            info.wait_for_publish(60)
            acked += info.is_published()
        except (RuntimeError, ValueError):
            pass
    for client in clients:
        client.disconnect()
        client.loop_stop()
    out.put({"sent": sent, "acked": acked})


def run(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    from server.mosquitto import MosquittoBroker
    from server.registry import Registry

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # mosquitto inherits it: 1,000+ sockets
    work_dir = Path(tempfile.mkdtemp(prefix="edgeguide-fleet-"))
    broker = MosquittoBroker(workdir=work_dir / "broker")
    broker.start()
    registry = Registry(work_dir / "server")
    artifact = registry.register(Path(args.artifact) if args.artifact else _tiny_artifact(work_dir))
    devices = {}
    with registry.db.transaction():
        for i in range(args.agents):
            device_id = f"sim-{i:05d}"
            devices[device_id] = registry.create_deployment(artifact, device_id, chunk_size=65536, policy=None,
                                                            deadline_s=3600, status="measuring").deployment_id
    prefix = "fleet"
    servers = []
    for n in range(args.servers):
        log = open(work_dir / f"server-{n}.log", "ab")  # noqa: SIM115 - closed after the run
        cmd = [sys.executable, "-m", "server", "--data-dir", str(registry.data_dir), "serve", "--broker", broker.url,
               "--topic-prefix", prefix, "--client-id", f"bench-server-{n}", "--protocol", "5"]
        servers.append((subprocess.Popen(cmd, cwd=str(REPO), stdout=log, stderr=log), log))
    time.sleep(3.0)  # let the servers connect and subscribe
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    items = list(devices.items())
    procs = [ctx.Process(target=_agent_proc, args=(broker.url, prefix, items[i::args.procs],
                                                   (artifact.model_id, artifact.version, artifact.size),
                                                   ready, go, out)) for i in range(args.procs)]
    for p in procs:
        p.start()
    connected = sum(ready.get(timeout=180) for _ in procs)
    cpu0 = sum(sum(psutil.Process(s.pid).cpu_times()[:2]) for s, _ in servers)
    t0 = time.time()
    go.set()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
    sent = {dep: ts for r in results for dep, ts in r["sent"].items()}
    acked = sum(r["acked"] for r in results)
    deadline = time.monotonic() + args.drain_timeout
    ingested: dict[str, float] = {}
    while time.monotonic() < deadline:
        rows = registry.db.query("SELECT deployment_id, ts FROM events WHERE kind = 'ingest:report'")
        ingested = {r["deployment_id"]: float(r["ts"]) for r in rows}
        if len(ingested) >= len(sent):
            break
        time.sleep(0.5)
    cpu1 = sum(sum(psutil.Process(s.pid).cpu_times()[:2]) for s, _ in servers)
    per_server = {r["detail"]: int(r["n"]) for r in registry.db.query(
        "SELECT detail, COUNT(*) AS n FROM events WHERE kind = 'ingest:report' GROUP BY detail")}
    duplicates = int(registry.db.query(
        "SELECT COUNT(*) - COUNT(DISTINCT deployment_id) AS d FROM events WHERE kind = 'ingest:report'")[0]["d"])
    gated = int(registry.db.query("SELECT COUNT(*) AS n FROM deployments WHERE status IN ('passed', 'failed')")[0]["n"])
    for server, log in servers:
        server.terminate()
        server.wait(30)
        log.close()
    broker.stop()
    latencies = sorted((ingested[d] - sent[d]) * 1000.0 for d in sent if d in ingested)
    last = max(ingested.values()) if ingested else t0
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {
        "agents": connected, "agents_requested": args.agents, "agent_processes": args.procs,
        "server_processes": args.servers, "reports_sent": len(sent), "reports_acked_by_broker": acked,
        "reports_ingested": len(ingested), "lost_reports": len(sent) - len(set(sent) & set(ingested)),
        "duplicate_ingestions": duplicates, "reports_gated": gated, "per_server": per_server,
        "reports_per_s": round(len(ingested) / max(1e-9, last - t0), 1),
        "server_cpu_s": round(cpu1 - cpu0, 2),
        "p50_ingest_ms": round(latencies[len(latencies) // 2], 1) if latencies else None,
        "p99_ingest_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)
        if latencies else None,
        "ingest": "publish -> a server worker decoded and recorded it (queue wait included); each report is then "
                  "gated and its signed verdict sent by that worker, while its report files (JSON, Markdown with a "
                  "text histogram; the PNG once the deployment ends) are written on the server's report thread",
        "context": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "broker": "mosquitto (loopback)", "registry": "sqlite (shared by the server processes)"},
        "work_dir": str(work_dir),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="write the figures here")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4, help="processes the simulated agents are spread over")
    parser.add_argument("--servers", type=int, default=2, help="server processes in the $share group")
    parser.add_argument("--artifact", help="artifact folder to register (default: train a tiny one)")
    parser.add_argument("--drain-timeout", type=float, default=600.0,
                        help="seconds to wait for the servers to ingest every report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run(args)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "context"}, indent=2))
    return 0 if result["lost_reports"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
