"""Serving benchmark: what the agent's API costs on top of the bare interpreter, and what swaps cost.

`python bench/serving.py --json OUT` measures, on one model in one process and one run:
raw `interpreter.invoke()` p50, the in-process API p50 (stock codes in, products out), the HTTP
p50 from a local keep-alive client, the agent's RSS with the model loaded and serving (fresh
subprocess), the RSS of serving the same .tflite through TensorFlow (another subprocess; this
process never imports TensorFlow), and a hot-swap run (HTTP clients under load during N swaps).

Raw invoke and the API are measured in alternating blocks over the same real golden histories,
so machine load from anything else hits both alike; so are the Recommender's serving call
(`top_k`, what the runtime adds) and its measurement call. `details.python_stages_us` times the
service's pure-Python steps alone, right after an invoke (`cold`, as in a real request: the
invoke streams the weights through the caches) and repeated (`hot`), to show where
`api - top_k` goes. Without --artifact, a model with the demo's
shape (full catalogue, default dims, 1 epoch: latency does not depend on accuracy) is trained
and exported in a subprocess and cached under --workdir.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script, sys.path[0] is bench/, whose compression.py would shadow the `compression` package
# (also when PYTHONPATH names the checkout, which only comes after bench/): the checkout goes first.
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

_LOGGER = logging.getLogger("bench.serving")

TARGET_OVERHEAD_RATIO = 1.10
LOCKS_PER_REQUEST = 1  # RecommendService.recommend: the model's lock, held around top_k_locked
TARGET_RSS_FRACTION = 8
HEAVY_MODULES = ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization")


# ----------------------------------------------------------------------------- helpers
def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / (1024 * 1024)


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _golden(artifact_dir: Path) -> tuple[list[list[int]], list[list[str]]]:
    """Golden histories as model indices and as the stock codes an app would send."""
    from protocol import artifact

    golden = artifact.read_golden(artifact_dir)
    items = artifact.read_items(artifact_dir)["items"]
    histories = [[int(i) for i in row] for row in golden["histories"]]
    codes = [[items[i][0] for i in row if i] for row in histories]
    return histories, codes


def _interpreter_class() -> tuple[Any, str]:
    """The device runtime's Interpreter, in the agent's order (never TensorFlow here)."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite-runtime"


def _raw_interpreter(model_file: Path, threads: int, probe: np.ndarray) -> Any:
    """A bare interpreter whose default subgraph must be the `recommend` signature (checked)."""
    interpreter_cls, _ = _interpreter_class()
    raw = interpreter_cls(model_path=str(model_file), num_threads=threads)
    raw.allocate_tensors()
    runner = raw.get_signature_runner("recommend")
    expected = runner(history=probe)["item_ids"].copy()
    del runner  # a live runner holds the interpreter and makes invoke() refuse to run
    inputs = raw.get_input_details()
    if len(inputs) != 1 or list(inputs[0]["shape"]) != list(probe.shape):
        raise SystemExit(f"{model_file}: default subgraph inputs {inputs} are not the recommend signature's")
    raw.set_tensor(inputs[0]["index"], probe)
    raw.invoke()
    got = [raw.get_tensor(o["index"]) for o in raw.get_output_details()]
    if not any(g.shape == expected.shape and np.array_equal(g, expected) for g in got):
        raise SystemExit(f"{model_file}: invoke() does not run the recommend signature; cannot time it raw")
    return raw


# ----------------------------------------------------------------------------- phases
def measure_invoke_and_api(artifact_dir: Path, threads: int, seconds: float, min_runs: int,
                           block: int = 100) -> dict[str, Any]:
    """Interleaved blocks over the same golden histories: raw invoke() vs the agent's layers above it.

    Paths: `invoke` (bare interpreter, input set before the clock starts), `top_k` (the
    Recommender's serving call: pack + SetTensor + Invoke + GetTensor + tolist, lock held),
    `api` (RecommendService.recommend, codes in, products out) and `recommender` (the
    measurement path, Recommender.recommend on an int32 array).
    """
    from agent.model import open_model
    from agent.serving import RecommendService

    histories, codes = _golden(artifact_dir)
    inputs = [np.asarray(h, dtype=np.int32).reshape(1, -1) for h in histories]
    raw = _raw_interpreter(artifact_dir / "model.tflite", threads, inputs[0])
    input_index = raw.get_input_details()[0]["index"]
    model = open_model(artifact_dir, model_id="bench", version=1, threads=threads)
    service = RecommendService()
    service.swap(model)
    rec = model.recommender
    rec_window = [np.asarray(h, dtype=np.int32) for h in histories]
    windows = [list(h) for h in histories]
    n = len(histories)

    def run_block(kind: str, start: int, out: list[float]) -> None:
        clock = time.perf_counter_ns
        for j in range(start, start + block):
            i = j % n
            if kind == "invoke":
                raw.set_tensor(input_index, inputs[i])
                t0 = clock()
                raw.invoke()
                out.append(clock() - t0)
            elif kind == "api":
                t0 = clock()
                service.recommend(codes[i])
                out.append(clock() - t0)
            elif kind == "top_k":
                t0 = clock()
                with rec.lock:
                    rec.top_k_locked(windows[i])
                out.append(clock() - t0)
            else:
                t0 = clock()
                rec.recommend(rec_window[i])
                out.append(clock() - t0)

    kinds = ("invoke", "api", "top_k", "recommender")
    # warm-up: >= 10 calls and >= 2 s, as for device measurements
    warm: list[float] = []
    deadline = time.monotonic() + 2.0
    j = 0
    while time.monotonic() < deadline or j < 10 * block:
        for kind in kinds:
            run_block(kind, j, warm)
        j += block
    timings: dict[str, list[float]] = {kind: [] for kind in kinds}
    started = time.monotonic()
    while time.monotonic() - started < seconds or len(timings["api"]) < min_runs:
        for kind in kinds:
            run_block(kind, j, timings[kind])
        j += block
    duration = time.monotonic() - started
    stages = measure_python_stages(model, codes, windows)
    result = {
        **{f"{kind}_p50_us": _p(timings[kind], 50) / 1e3 for kind in kinds},
        **{f"{kind}_p90_us": _p(timings[kind], 90) / 1e3 for kind in kinds},
        "n_per_path": len(timings["api"]),
        "locks_per_request": LOCKS_PER_REQUEST,
        "python_stages_us": stages,
        "duration_s": duration,
        "runtime": model.runtime.to_dict() if model.runtime else None,
        "window": model.window,
        "k": model.k,
        "num_items": len(model.items) - 1,
    }
    service.close()
    return result


def measure_python_stages(model: Any, codes: list[list[str]], windows: list[list[int]],
                          rounds: int = 20_000) -> dict[str, dict[str, float]]:
    """p50 of the API's pure-Python steps, each timed alone, with the operations the service runs.

    Explains `api - top_k`. `cold`: the step runs right after an invoke, as in a real request
    (the invoke streams the model's weights through the caches and evicts the catalogue
    tables); `hot`: the same step repeated at once. Mirrors agent/serving/service.py.
    """
    index = {code: i for i, (code, _) in enumerate(model.items) if i}
    names = [c for c, _ in model.items]
    descriptions = [d for _, d in model.items]
    size = len(names)
    rec = model.recommender
    lock = rec.lock
    clock = time.perf_counter_ns
    window_len = model.window
    padding = [[0] * (window_len - m) for m in range(window_len + 1)]

    def lookup(history: list[str]) -> list[int]:
        return list(map(index.__getitem__, history))

    def window_of(known: list[int]) -> list[int]:
        m = len(known)
        return known[-window_len:] if m > window_len else padding[m] + known if m < window_len else known

    def lock_step(_: object) -> None:
        with lock:
            pass

    def items_of(out: tuple[list[int], list[float]]) -> list[dict[str, Any]]:
        return [{"stock_code": names[x], "description": descriptions[x], "score": s}
                for x, s in zip(*out, strict=True) if 0 < x < size]

    def response_of(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"items": items, "unknown": [], "truncated": False, "fallback": None,
                "model": {"model_id": "bench", "version": 1}}

    steps = {"lookup": lookup, "window": window_of, "lock": lock_step, "items": items_of, "response": response_of}
    samples: dict[str, dict[str, list[int]]] = {temp: {name: [] for name in steps} for temp in ("cold", "hot")}
    for r in range(rounds):
        i = r % len(codes)
        args = {"lookup": codes[i], "window": lookup(codes[i]), "lock": None,
                "response": [], "items": None}
        for name, step in steps.items():
            with lock:  # a real invoke first, as before every step of a real request
                out = rec.top_k_locked(windows[(i + 1) % len(windows)])
            if name == "items":
                args["items"] = out  # fresh output lists, as the service gets them
            t0 = clock()
            step(args[name])
            t1 = clock()
            step(args[name])
            t2 = clock()
            samples["cold"][name].append(t1 - t0)
            samples["hot"][name].append(t2 - t1)
    # The service runs these steps inline: subtract a clock reading plus a call of an empty function.
    def nothing(_: object) -> None:
        return None

    empty = []
    for _ in range(rounds):
        t0 = clock()
        nothing(None)
        empty.append(clock() - t0)
    floor = _p(empty, 50)
    out_us: dict[str, dict[str, float]] = {
        temp: {name: max(0.0, _p(values, 50) - floor) / 1e3 for name, values in per.items()}
        for temp, per in samples.items()}
    for per in out_us.values():
        per["total"] = sum(per.values())
    return out_us


def measure_http(artifact_dir: Path, threads: int, seconds: float, min_runs: int) -> dict[str, Any]:
    """p50 of POST /recommend from a local keep-alive client (request sent -> body read)."""
    from agent.model import open_model
    from agent.serving import RecommendService
    from agent.serving.http import start_http_server

    _, codes = _golden(artifact_dir)
    bodies = [json.dumps({"history": c}).encode() for c in codes]
    service = RecommendService()
    service.swap(open_model(artifact_dir, model_id="bench", version=1, threads=threads))
    handle = start_http_server(service)
    conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
    headers = {"Content-Type": "application/json"}
    timings: list[float] = []
    try:
        def one(i: int) -> float:
            t0 = time.perf_counter_ns()
            conn.request("POST", "/recommend", body=bodies[i % len(bodies)], headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"POST /recommend answered {response.status}")
            return time.perf_counter_ns() - t0

        deadline = time.monotonic() + 2.0
        i = 0
        while time.monotonic() < deadline or i < 100:
            one(i)
            i += 1
        started = time.monotonic()
        while time.monotonic() - started < seconds or len(timings) < min_runs:
            timings.append(one(i))
            i += 1
    finally:
        conn.close()
        handle.stop()
        service.close()
    return {"http_p50_us": _p(timings, 50) / 1e3, "http_p90_us": _p(timings, 90) / 1e3, "http_n": len(timings)}


def measure_swaps(artifact_a: Path, artifact_b: Path, threads: int, swaps: int, clients: int,
                  interval_s: float) -> dict[str, Any]:
    """HTTP clients hammer /recommend while the model is swapped `swaps` times; count failures."""
    from agent.model import open_model
    from agent.serving import RecommendService
    from agent.serving.http import start_http_server

    _, codes = _golden(artifact_a)
    bodies = [json.dumps({"history": c, "k": 10}).encode() for c in codes]
    service = RecommendService()
    service.swap(open_model(artifact_a, model_id="bench-a", version=1, threads=threads))
    handle = start_http_server(service)
    stop = threading.Event()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    versions: set[int] = set()

    def client(seed: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=30)
        i = seed
        local: list[float] = []
        while not stop.is_set():
            i += 1
            t0 = time.perf_counter_ns()
            try:
                conn.request("POST", "/recommend", body=bodies[i % len(bodies)],
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                elapsed = time.perf_counter_ns() - t0
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}: {payload[:200]!r}")
                version = json.loads(payload)["model"]["version"]
                local.append(elapsed)
                with lock:
                    versions.add(version)
            except Exception as exc:  # noqa: BLE001 - every failure is a lost request to count
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=30)
        conn.close()
        with lock:
            latencies.extend(local)

    workers = [threading.Thread(target=client, args=(n * 7919,), daemon=True) for n in range(clients)]
    for worker in workers:
        worker.start()
    swap_ms: list[float] = []
    started = time.monotonic()
    try:
        time.sleep(interval_s)
        for n in range(swaps):
            path, model_id = (artifact_b, "bench-b") if n % 2 == 0 else (artifact_a, "bench-a")
            model = open_model(path, model_id=model_id, version=n + 2, threads=threads)
            t0 = time.perf_counter_ns()
            service.swap(model)  # returns once the replaced model drained and was closed
            swap_ms.append((time.perf_counter_ns() - t0) / 1e6)
            time.sleep(interval_s)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
        handle.stop()
        service.close()
    duration = time.monotonic() - started
    return {
        "swap_requests": len(latencies) + len(errors),
        "swap_errors": len(errors),
        "swap_p99_ms": _p(latencies, 99) / 1e6 if latencies else None,
        "swap_p50_ms": _p(latencies, 50) / 1e6 if latencies else None,
        "swap_count": swaps,
        "swap_clients": clients,
        "swap_duration_s": duration,
        "swap_call_max_ms": max(swap_ms) if swap_ms else None,
        "swap_versions_seen": len(versions),
        "swap_error_samples": errors[:5],
    }


def _child(kind: str, artifact_dir: Path, threads: int) -> dict[str, Any]:
    """Runs in a fresh interpreter: RSS of one serving stack with the model loaded and used."""
    histories, codes = _golden(artifact_dir)
    if kind == "agent":
        from agent.model import open_model
        from agent.serving import RecommendService
        from agent.serving.http import start_http_server

        service = RecommendService()
        service.swap(open_model(artifact_dir, model_id="bench", version=1, threads=threads))
        handle = start_http_server(service)
        conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
        for i in range(300):
            service.recommend(codes[i % len(codes)])
            conn.request("POST", "/recommend", body=json.dumps({"history": codes[i % len(codes)]}).encode(),
                         headers={"Content-Type": "application/json"})
            conn.getresponse().read()
        conn.close()
        rss = _rss_mib()
        handle.stop()
        service.close()
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        interpreter = tf.lite.Interpreter(model_path=str(artifact_dir / "model.tflite"), num_threads=threads)
        runner = interpreter.get_signature_runner("recommend")
        for i in range(300):
            runner(history=np.asarray(histories[i % len(histories)], dtype=np.int32).reshape(1, -1))
        rss = _rss_mib()
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY_MODULES)
    return {"rss_mib": rss, "heavy_modules": len(heavy)}


def measure_rss(artifact_dir: Path, threads: int) -> dict[str, Any]:
    out = {}
    for kind in ("agent", "tf"):
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--artifact", str(artifact_dir),
                               "--threads", str(threads)], capture_output=True, text=True, timeout=600,
                              cwd=REPO, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"RSS child {kind!r} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["agent"]["heavy_modules"]:
        raise SystemExit(f"the agent stack imported TensorFlow modules: {out['agent']}")
    return {"agent_rss_mib": out["agent"]["rss_mib"], "tf_rss_mib": out["tf"]["rss_mib"]}


# ----------------------------------------------------------------------------- artifact
def build_artifact(out_dir: Path, max_customers: int | None, epochs: int) -> None:
    """Train + export the demo-shaped model (TensorFlow: only ever in a subprocess of the bench)."""
    from compression.data import load_dataset
    from compression.export import export_artifact
    from compression.train import TrainConfig, train_reference

    dataset = load_dataset(max_customers=max_customers)
    config = TrainConfig.quick(epochs=epochs, max_customers=max_customers)
    model, _ = train_reference(dataset, config, progress=False)
    export_artifact(model, dataset, out_dir, model_id="bench-serving", training=config.to_dict(), check_compat=False)


def ensure_artifact(args: argparse.Namespace) -> Path:
    if args.artifact:
        return Path(args.artifact)
    target = Path(args.workdir) / "artifact"
    if (target / "metrics.json").is_file():
        _LOGGER.info("reusing cached artifact %s", target)
        return target
    _LOGGER.info("building the benchmark model in a subprocess (one-off, a few minutes) -> %s", target)
    cmd = [sys.executable, __file__, "--build-artifact", str(target), "--epochs", str(args.epochs)]
    if args.max_customers:
        cmd += ["--max-customers", str(args.max_customers)]
    subprocess.run(cmd, check=True, cwd=REPO)
    return target


def _context(artifact_dir: Path) -> dict[str, Any]:
    from protocol import artifact

    metrics = artifact.read_metrics(artifact_dir)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "artifact": str(artifact_dir),
        "model_id": metrics.get("model_id"),
        "tflite_bytes": metrics.get("tflite_bytes"),
        "quantization": metrics.get("quantization"),
        "machine": platform.machine(),
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the results here (also printed)")
    p.add_argument("--artifact", help="artifact folder to serve (default: build one under --workdir)")
    p.add_argument("--artifact-b", help="second artifact for the swap run (default: --artifact again)")
    p.add_argument("--workdir", default=str(REPO / ".cache" / "bench-serving"))
    p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    p.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds per phase")
    p.add_argument("--min-runs", type=int, default=2000, help="minimum timed calls per path")
    p.add_argument("--swaps", type=int, default=10)
    p.add_argument("--clients", type=int, default=4, help="HTTP client threads during the swap run")
    p.add_argument("--swap-interval-s", type=float, default=0.3, help="load time before and between swaps")
    p.add_argument("--epochs", type=int, default=1, help="epochs when building the benchmark model")
    p.add_argument("--max-customers", type=int, help="data slice when building the model (default: all)")
    p.add_argument("--build-artifact", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=("agent", "tf"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("agent").setLevel(logging.WARNING)

    if args.build_artifact:
        build_artifact(args.build_artifact, args.max_customers, args.epochs)
        return 0
    if args.child:
        print(json.dumps(_child(args.child, Path(args.artifact), args.threads)))
        return 0

    artifact_a = ensure_artifact(args)
    artifact_b = Path(args.artifact_b) if args.artifact_b else artifact_a
    context = _context(artifact_a)
    _LOGGER.info("invoke vs API (%s threads, >= %.0f s)", args.threads, args.seconds)
    core = measure_invoke_and_api(artifact_a, args.threads, args.seconds, args.min_runs)
    _LOGGER.info("HTTP")
    web = measure_http(artifact_a, args.threads, args.seconds, args.min_runs)
    _LOGGER.info("RSS (subprocesses)")
    rss = measure_rss(artifact_a, args.threads)
    _LOGGER.info("hot swap: %d swaps, %d clients", args.swaps, args.clients)
    swap = measure_swaps(artifact_a, artifact_b, args.threads, args.swaps, args.clients, args.swap_interval_s)

    ratio = core["api_p50_us"] / core["invoke_p50_us"]
    result = {
        "invoke_p50_us": round(core["invoke_p50_us"], 2),
        "api_p50_us": round(core["api_p50_us"], 2),
        "http_p50_us": round(web["http_p50_us"], 2),
        "api_overhead_ratio": round(ratio, 3),
        "agent_rss_mib": round(rss["agent_rss_mib"], 1),
        "tf_rss_mib": round(rss["tf_rss_mib"], 1),
        "swap_requests": swap["swap_requests"],
        "swap_errors": swap["swap_errors"],
        "swap_p99_ms": round(swap["swap_p99_ms"], 3) if swap["swap_p99_ms"] is not None else None,
        "targets": {
            "api_overhead_ratio<=1.10": ratio <= TARGET_OVERHEAD_RATIO,
            "swap_errors==0": swap["swap_errors"] == 0,
            "agent_rss_mib<=tf_rss_mib/8": rss["agent_rss_mib"] <= rss["tf_rss_mib"] / TARGET_RSS_FRACTION,
        },
        "details": {
            **{k: v for k, v in core.items() if k not in ("invoke_p50_us", "api_p50_us")},
            "top_k_overhead_ratio": core["top_k_p50_us"] / core["invoke_p50_us"],
            "recommender_overhead_ratio": core["recommender_p50_us"] / core["invoke_p50_us"],
            **{k: v for k, v in web.items() if k != "http_p50_us"},
            **{k: v for k, v in swap.items() if k not in ("swap_requests", "swap_errors", "swap_p99_ms")},
            "threads": args.threads,
            "swap_mode": "http keep-alive clients, swaps alternate between --artifact and --artifact-b",
        },
        "context": context,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
