"""Transfer benchmark: how close a real deployment gets to the broker's raw throughput, and a fleet.

`python bench/transfer.py --json OUT` on a loopback mosquitto, in one run:
- raw: the artifact's chunk frames published QoS 1 by one MqttLink to one subscribing MqttLink
  (plain publish/subscribe of the same bytes in the same 64 KiB pieces), median of --repeats, one
  run right before each single-agent deployment (same processes up, same machine load);
- deploy: the real server (registry, deployer, gate) deploying the artifact to one real agent
  process (`python -m agent`), timed from `deploy()` to the agent's `download_complete` as the
  server received it (manifest, admission, chunk requests, verified and persisted chunks), median
  of --repeats consecutive versions, each started once the previous one's report files are written;
- fleet: the same artifact deployed at once to --fleet in-process `agent.daemon.Agent` instances
  (real agent code, one process, short measurement), timed to the last `download_complete` and to
  the last promotion; `all_verified` means every agent reported the model loaded, was promoted and
  names the new version in its retained state;
- links (--links, root only): for each emulated device link profile (wifi, lte, poor; see
  hil_tests/netlink and bench/transfer_links.py) raw QoS 1 and a real deployment to an agent in its
  own network namespace: links.<profile>.{raw_mib_s, deploy_mib_s, ratio, seconds, resent_chunks,
  resumed}.

Without --artifact a real model of about --target-mib is trained (1 epoch, widths chosen for the
size) and exported in a subprocess (this process never imports TensorFlow), cached in --workdir.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from bench.transfer_links import run_links  # noqa: E402 - after the sys.path line above

_LOGGER = logging.getLogger("bench.transfer")
LINK_KEYS = ("raw_mib_s", "deploy_mib_s", "ratio", "seconds", "resent_chunks", "resumed", "window_chunks")

MIB = 1024 * 1024
TARGET_RATIO = 0.5
PREFIX = "eg-bench"
# The fleet shares one process, so the default policy's process-RSS limit would measure all 50
# agents at once; this bench gates only what a transfer can break.
BENCH_POLICY = """
name = "bench-transfer"
[limits.agreement_at_k]
min = 0.9
required = true
[limits.model_bytes]
max = 67108864
required = true
"""
# Fleet agents measure briefly: the fleet figure is about delivery, not about latency.
FLEET_MEASURE = {"mode": "quick", "warmup_min_runs": 3, "warmup_min_s": 0.0, "timed_min_runs": 20,
                 "timed_min_s": 0.0, "memory_min_runs": 5, "memory_min_s": 0.0, "idle_s": 0.0, "energy_s": 0.0}


# ----------------------------------------------------------------------------- artifact
_BUILD_SNIPPET = """
import json, sys
from pathlib import Path
from compression.data import load_dataset
from compression.export import export_artifact
from compression.train import TrainConfig, train_reference
out, target, customers = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
ds = load_dataset(max_customers=customers)
dim, window = 64, 20
# float32 parameters ~= target bytes / 4: embedding + logits (2 x (V+1) x dim) + hidden layers
fixed = 2 * (ds.num_items + 1) * dim
hidden = max(64, int((target / 4 - fixed) / (window * dim + dim)))
model, _ = train_reference(ds, TrainConfig(epochs=1, dim=dim, hidden=hidden, window=window, batch_size=512),
                           progress=False)
export_artifact(model, ds, out, model_id="bench-transfer", k=20, check_compat=False)
print(json.dumps({"num_items": ds.num_items, "hidden": hidden}))
"""


def build_artifact(workdir: Path, target_mib: float, customers: int) -> Path:
    """Train and export a real model of about `target_mib` in a subprocess; cached by its parameters."""
    out = workdir / f"model-{target_mib:g}mib-{customers}c"
    if (out / "model.tflite").is_file() and (out / "golden.json").is_file():
        _LOGGER.info("reusing cached artifact %s", out)
        return out
    _LOGGER.info("training and exporting a ~%.1f MiB model into %s (1 epoch, %d customers)", target_mib, out,
                 customers)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", _BUILD_SNIPPET, str(out), str(target_mib * MIB), str(customers)],
                            cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"building the benchmark artifact failed (exit {result.returncode}):\n"
                           f"{result.stderr[-3000:]}")
    _LOGGER.info("built %s: %s", out, result.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- raw pub/sub
def raw_summary(runs: list[float], total: int) -> dict[str, Any]:
    seconds = statistics.median(runs)
    return {"seconds": seconds, "runs_s": runs, "mib_s": total / MIB / seconds, "bytes": total}


def raw_run(url: str, frames: list[bytes]) -> float:
    """Seconds for one publisher to get `frames` to one subscriber, fresh links, subscription live."""
    from protocol.mqtt import MqttLink

    topic = f"{PREFIX}/raw/{uuid.uuid4().hex[:8]}"
    done = threading.Event()
    got = {"n": 0}

    def on_frame(_topic: str, _payload: bytes) -> None:
        got["n"] += 1
        if got["n"] == len(frames):
            done.set()

    sub = MqttLink(url, f"raw-sub-{uuid.uuid4().hex[:6]}", clean_start=True)
    pub = MqttLink(url, f"raw-pub-{uuid.uuid4().hex[:6]}", clean_start=True)
    sub.start()
    pub.start()
    try:
        sub.subscribe(topic, on_frame, qos=1)
        _wait_subscribed(pub, sub, topic)
        got["n"] = 0
        start = time.perf_counter()
        for frame in frames:
            pub.publish(topic, frame, qos=1)
        if not done.wait(120):
            raise RuntimeError(f"raw run: only {got['n']} of {len(frames)} frames arrived")
        return time.perf_counter() - start
    finally:
        pub.stop()
        sub.stop()


def _wait_subscribed(pub: Any, sub: Any, topic: str) -> None:
    """The SUBSCRIBE is asynchronous: probe until a message goes through (probes are not timed)."""
    probe = threading.Event()
    sub.subscribe(topic + "/probe", lambda _t, _p: probe.set(), qos=1)
    for _ in range(100):
        pub.publish(topic + "/probe", b"probe", qos=1)
        if probe.wait(0.1):
            return
    raise RuntimeError(f"subscription to {topic} never became live")


# ----------------------------------------------------------------------------- server side
class Bench:
    """A loopback broker and the real server with its registry, in a scratch directory."""

    def __init__(self, root: Path, chunk_bytes: int) -> None:
        from server import keys
        from server.deployer import DeployerConfig
        from server.mosquitto import MosquittoBroker
        from server.policy import parse_policy
        from server.registry import Registry
        from server.service import EdgeGuideServer, ServerConfig

        self.root = root
        self.chunk_bytes = chunk_bytes
        self.broker = MosquittoBroker(workdir=root / "broker").start()
        self.registry = Registry(root / "server")
        self.server = EdgeGuideServer(
            self.registry, ServerConfig(broker_url=self.broker.url, client_id="bench-server", topic_prefix=PREFIX,
                                        tick_s=0.2),
            policy=parse_policy(BENCH_POLICY, "bench-transfer"),
            deployer_config=DeployerConfig(chunk_size=chunk_bytes, deadline_s=900))
        self.server.start()
        self.pub_key = keys.export_public_key(self.registry.data_dir, root / "server_pub.pem")

    def close(self) -> None:
        self.server.stop()
        self.registry.close()
        self.broker.stop()

    def wait_seen(self, device_ids: list[str], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        missing = list(device_ids)
        while missing:
            missing = [d for d in missing if self.registry.find_device(d) is None]
            if missing and time.monotonic() > deadline:
                raise RuntimeError(f"{len(missing)} agents never announced themselves, e.g. {missing[:3]}")
            time.sleep(0.1)

    def event_ts(self, deployment_id: str, kind: str) -> float | None:
        rows = [e for e in self.registry.events(deployment_id=deployment_id) if e["kind"] == kind]
        return float(rows[0]["ts"]) if rows else None


def deploy_single(bench: Bench, artifact_dir: Path, repeats: int,
                  before_each: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Deploy `repeats` consecutive versions to one agent process; transfer time per version.

    `before_each` runs before every deployment, with the agent up and the server idle (the raw
    runs, so both figures see the same processes and the same machine load).
    """
    from server.local_agent import LocalAgent

    agent = LocalAgent("bench-single", bench.broker.url, bench.root / "single" / "state", bench.pub_key,
                       topic_prefix=PREFIX, log_path=bench.root / "single.log")
    agent.start()
    runs: list[dict[str, Any]] = []
    try:
        bench.wait_seen([agent.device_id])
        for _ in range(repeats):
            before_each()
            record = bench.registry.register(artifact_dir)
            start = time.time()
            dep = bench.server.deploy(record.model_id, agent.device_id, version=record.version)
            final = bench.server.wait(dep.deployment_id, timeout=600)
            complete = bench.event_ts(dep.deployment_id, "device:download_complete")
            accepted = bench.event_ts(dep.deployment_id, "device:manifest_accepted")
            if complete is None:
                raise RuntimeError(f"deployment {dep.deployment_id} ended {final.status} without a download: "
                                   f"{final.reason}\n{agent.log_tail()}")
            context = (final.report or {}).get("context") or {}
            runs.append({"version": record.version, "status": final.status, "bytes": record.size,
                         "seconds": complete - start, "handshake_s": (accepted or start) - start,
                         "chunks_s": complete - (accepted or start),
                         "verify_install_ms": context.get("verify_install_ms"),
                         "measure_s": context.get("measure_s"),
                         "end_to_end_s": time.time() - start,
                         "served_version": agent.model().get("version")})
            bench.server.deployer.wait_reports()  # its latency plot is drawn before the next run starts
    finally:
        agent.stop()
    seconds = statistics.median(r["seconds"] for r in runs)
    size = runs[0]["bytes"]
    chunks_s = statistics.median(r["chunks_s"] for r in runs)
    installs = [r["verify_install_ms"] for r in runs if r["verify_install_ms"] is not None]
    return {"seconds": seconds, "mib_s": size / MIB / seconds, "runs": runs,
            "handshake_s": statistics.median(r["handshake_s"] for r in runs),
            "chunk_phase_mib_s": size / MIB / chunks_s,
            "phases_ms": {"handshake": round(1000 * statistics.median(r["handshake_s"] for r in runs), 1),
                          "chunk_transfer": round(1000 * chunks_s, 1),
                          "verify_install": round(statistics.median(installs), 1) if installs else None},
            "all_promoted": all(r["status"] == "promoted" and r["served_version"] == r["version"] for r in runs)}


def deploy_fleet(bench: Bench, artifact_dir: Path, n: int) -> dict[str, Any]:
    """Deploy one version to `n` in-process agents at once."""
    from agent.config import AgentConfig
    from agent.daemon import Agent
    from agent.measure import MeasureConfig

    agents = []
    for i in range(n):
        config = AgentConfig(device_id=f"fleet-{i:03d}", broker_url=bench.broker.url,
                             state_dir=bench.root / "fleet" / f"{i:03d}", server_key=bench.pub_key,
                             topic_prefix=PREFIX, http_port=None, heartbeat_s=60.0, chunk_stall_s=10.0,
                             measure_mode="quick").validate()  # matches FLEET_MEASURE's mode
        agents.append(Agent(config, measure_config=MeasureConfig(**FLEET_MEASURE), power_source=None))
    try:
        for agent in agents:
            agent.start()
        bench.wait_seen([a.device_id for a in agents])
        record = bench.registry.register(artifact_dir)
        start = time.time()
        deps = {a.device_id: bench.server.deploy(record.model_id, a.device_id, version=record.version)
                for a in agents}
        finals = {d: bench.server.wait(dep.deployment_id, timeout=900) for d, dep in deps.items()}
        promoted_at = time.time()
        completes = [bench.event_ts(dep.deployment_id, "device:download_complete") for dep in deps.values()]
        verified = {a.device_id: _verified(bench, a, finals[a.device_id], record.version) for a in agents}
    finally:
        for agent in agents:
            agent.stop(timeout=5)
    transfer_s = (max(c for c in completes if c is not None) - start) if any(completes) else None
    return {
        "agents": n,
        "seconds": promoted_at - start,
        "transfer_seconds": transfer_s,
        "aggregate_mib_s": (n * record.size / MIB / transfer_s) if transfer_s else None,
        "statuses": _count(f.status for f in finals.values()),
        "all_verified": all(verified.values()),
        "not_verified": sorted(d for d, ok in verified.items() if not ok)[:10],
    }


def _verified(bench: Bench, agent: Any, final: Any, version: int, wait_s: float = 15.0) -> bool:
    """Promoted after a load_ok report, serving it, and the registry's device record agrees.

    The device record follows the agent's retained state, which arrives just after `promoted`.
    """
    if not (final.status == "promoted" and final.report and final.report.get("load_ok")
            and agent.active_model is not None and agent.active_model.version == version):
        return False
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        device = bench.registry.find_device(agent.device_id)
        if device is not None and device.active_version == version:
            return True
        time.sleep(0.1)
    return False


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the JSON holds; each figure is measured in this run."""
    from protocol import artifact as artifact_mod
    from protocol import chunking

    artifact_dir = args.artifact or build_artifact(args.workdir, args.target_mib, args.customers)
    blob = artifact_mod.pack_artifact(artifact_dir)
    chunk_bytes = args.chunk_kib * 1024
    dep_id = "d-" + hashlib.sha256(blob).hexdigest()[:12]
    pieces = chunking.split(blob, chunk_bytes)
    frames = [chunking.encode_chunk(dep_id, i, len(pieces), p) for i, p in enumerate(pieces)]
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="edgeguide-bench-transfer-", dir=args.scratch))
    bench = Bench(root, chunk_bytes)
    try:
        _LOGGER.info("artifact %s: %d bytes packed, %d chunks of %d KiB", artifact_dir, len(blob), len(pieces),
                     args.chunk_kib)
        raw_runs: list[float] = []
        single = deploy_single(bench, artifact_dir, args.repeats,
                               before_each=lambda: raw_runs.append(raw_run(bench.broker.url, frames)))
        raw = raw_summary(raw_runs, sum(len(f) for f in frames))
        _LOGGER.info("raw pub/sub: %.1f MiB/s", raw["mib_s"])
        _LOGGER.info("deploy to 1 agent: %.1f MiB/s (%.2f s)", single["mib_s"], single["seconds"])
        fleet = deploy_fleet(bench, artifact_dir, args.fleet) if args.fleet > 0 else None
        links = run_links(bench, [n for n in args.links.split(",") if n], artifact_dir, frames, root,
                          args.link_repeats, args.cut_s) if args.links else {}
        if fleet:
            _LOGGER.info("fleet of %d: transfer %.1f s, all promoted after %.1f s, all verified: %s",
                         fleet["agents"], fleet["transfer_seconds"] or -1, fleet["seconds"], fleet["all_verified"])
    finally:
        bench.close()
    ratio = single["mib_s"] / raw["mib_s"]
    return {
        "raw_mib_s": round(raw["mib_s"], 2),
        "deploy_mib_s": round(single["mib_s"], 2),
        "ratio": round(ratio, 3),
        "phases_ms": single["phases_ms"],
        "fleet_agents": fleet["agents"] if fleet else 0,
        "fleet_seconds": round(fleet["seconds"], 2) if fleet else None,
        "all_verified": bool(single["all_promoted"] and (fleet["all_verified"] if fleet else True)),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "artifact": {"path": str(artifact_dir), "packed_bytes": len(blob), "chunk_bytes": chunk_bytes,
                     "chunks": len(pieces)},
        "raw": raw,
        "deploy": single,
        "fleet": fleet,
        "links": links,
        "link_targets": {"ratio_min": {"wifi": 0.9, "lte": 0.9},
                         "poor": "completes after the cut with resent_chunks <= window_chunks (in flight at the cut)"},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "state_dir_fs": _fs_type(root),
                    # fsync-bound figures swing with other processes' I/O: keep the load next to them
                    "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "definitions": {
            "raw_mib_s": "packed bytes / median time for one QoS 1 publisher to get all chunk frames to one "
                         "subscriber through the broker (one run right before each single-agent deployment)",
            "deploy_mib_s": "packed bytes / median time from server deploy() to the agent's download_complete "
                            "(signed manifest, admission, per-chunk verification and fsynced staging)",
            "fleet_seconds": "deploy() to all fleet agents until the last deployment is promoted",
            "phases_ms": "medians over the single-agent runs: handshake = deploy() to the server receiving "
                         "manifest_accepted; chunk_transfer = from there to the server receiving "
                         "download_complete; verify_install = the agent's whole-file check + unpack into "
                         "its slot (report.context.verify_install_ms)",
        },
    }


def _fs_type(path: Path) -> str:
    """The file system holding the agents' state (fsync cost depends on it)."""
    try:
        best = ("", "?")
        for line in Path("/proc/mounts").read_text().splitlines():
            _dev, mount, fstype = line.split()[:3]
            if str(path).startswith(mount) and len(mount) > len(best[0]):
                best = (mount, fstype)
        return best[1]
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--artifact", type=Path, help="an exported artifact folder (default: build one)")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench" / "transfer",
                        help="cache for the built artifact")
    parser.add_argument("--scratch", type=Path, default=None, help="parent dir of the broker/server/agent state")
    parser.add_argument("--target-mib", type=float, default=5.0, help="approximate model size to build")
    parser.add_argument("--customers", type=int, default=1500, help="customers in the training slice")
    parser.add_argument("--chunk-kib", type=int, default=64)
    parser.add_argument("--fleet", type=int, default=50, help="agents deployed to at once (0: skip)")
    parser.add_argument("--repeats", type=int, default=9, help="single-agent deployments and raw runs (medians)")
    parser.add_argument("--links", default="wifi,lte,poor",
                        help="emulated link profiles to measure (comma-separated, '' to skip; needs root)")
    parser.add_argument("--link-repeats", type=int, default=3, help="raw runs and deployments per link (medians)")
    parser.add_argument("--cut-s", type=float, default=None, help="override the cut length of profiles with a cut")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("agent", "server", "protocol"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("raw_mib_s", "deploy_mib_s", "ratio", "phases_ms", "fleet_agents",
                                              "fleet_seconds", "all_verified")}))
    print(json.dumps({name: {k: v for k, v in fig.items() if k in LINK_KEYS} if isinstance(fig, dict) else fig
                      for name, fig in results["links"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
