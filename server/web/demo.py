"""`make dashboard`: the demo's loop with a small fleet, then the dashboard kept up until Ctrl-C.

    python -m server.web.demo [--http 127.0.0.1:8080] [--devices 3] [--workdir .cache/dashboard-demo]

Trains the quick preset (on `--max-customers` customers, so it takes about a minute) once per
work dir, registers the float32 and int8 artifacts, starts the embedded broker, the server and
`--devices` real agents (separate processes, quick measurement), deploys float32 to every device
and int8 to the first one, then serves the dashboard. The operator token is random per run and
written to `<workdir>/dashboard-token` (mode 0600), never printed. Unlike `make demo`, this does
not end by itself: Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any

_LOGGER = logging.getLogger(__name__)

PREFIX = "edgeguide-dashboard-demo"


def _artifacts(workdir: Path, max_customers: int) -> tuple[Path, Path]:
    """float32 and int8 artifact folders, trained once per work dir."""
    from protocol.artifact import MODEL_FILE

    base = workdir / "artifacts"
    float_dir, int8_dir = base / "float32", base / "int8"
    if (float_dir / MODEL_FILE).is_file() and (int8_dir / MODEL_FILE).is_file():
        print(f"reusing the artifacts in {base}")
        return float_dir, int8_dir
    from rich.console import Console

    from server.demo import build_artifacts

    built = build_artifacts(base, max_customers=max_customers, console=Console())
    return built.float_dir, built.int8_dir


def run(args: argparse.Namespace) -> int:
    from server.demo import DEMO_MODEL
    from server.embedded_broker import EmbeddedBroker
    from server.keys import export_public_key
    from server.local_agent import LocalAgent
    from server.registry import Registry
    from server.service import EdgeGuideServer, ServerConfig
    from server.web import parse_http, start_dashboard

    parse_http(args.http)
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    float_dir, int8_dir = _artifacts(workdir, args.max_customers)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stack: list[Any] = []
    try:
        broker = EmbeddedBroker(log_path=workdir / "amqtt.log")
        stack.append(broker)
        broker.start()
        registry = Registry(workdir / "server")
        records = [a for a in registry.artifacts() if a.model_id == DEMO_MODEL]  # float32, then int8
        if len(records) < 2:
            records = [registry.register(float_dir), registry.register(int8_dir)]
        float_rec, int8_rec = records[-2:]
        key_file = export_public_key(registry.data_dir, workdir / "server-key.pem")
        server = EdgeGuideServer(registry, ServerConfig(broker_url=broker.url, client_id="edgeguide-dashboard-demo",
                                                        topic_prefix=PREFIX, protocol="3.1.1"))
        stack.append(server)
        server.start()
        devices = [f"demo-pi-{i + 1}" for i in range(args.devices)]
        for device in devices:
            agent = LocalAgent(device, broker.url, workdir / "agents" / device, key_file, topic_prefix=PREFIX,
                               measure_mode="quick", log_path=workdir / f"{device}.log", mqtt_protocol="3.1.1")
            stack.append(agent)
            agent.start()
            print(f"agent {device} up")
        plan = [(float_rec, d) for d in devices] + [(int8_rec, devices[0])]
        for record, device in plan:
            seen = registry.find_device(device)
            if seen is not None and (seen.active_model_id, seen.active_version) == (record.model_id, record.version):
                continue  # a rerun on the same work dir: the device kept its model
            dep = server.deploy(record.model_id, device, version=record.version, wait_seen_s=15.0)
            final = server.wait(dep.deployment_id, timeout=300)
            print(f"deployment {final.deployment_id}: {record.id} -> {device}: {final.status}")
        token_file = workdir / "dashboard-token"
        token_file.touch(mode=0o600)
        os.chmod(token_file, 0o600)
        token = secrets.token_urlsafe(24)
        token_file.write_text(token + "\n", encoding="utf-8")
        searches = [p for p in (workdir / "search", Path(args.search) if args.search else None) if p]
        dashboard = start_dashboard(server, args.http, token=token, search_paths=searches)
        stack.append(dashboard)
        print(f"\ndashboard: {dashboard.url}  (operator token in {token_file}; Ctrl-C stops everything)", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for thing in reversed(stack):
            try:
                thing.stop()
            except Exception:  # keep stopping the rest
                _LOGGER.exception("could not stop %r", thing)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.web.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http", default="127.0.0.1:8080", help="where to serve the dashboard (HOST:PORT)")
    parser.add_argument("--devices", type=int, default=3, help="how many local agents to run (default: 3)")
    parser.add_argument("--workdir", default=".cache/dashboard-demo",
                        help="artifacts, registry and agent state (kept: the next run reuses the training)")
    parser.add_argument("--max-customers", type=int, default=600, help="train on the first N customers")
    parser.add_argument("--search", help="a compression search output folder to chart on the Models page")
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error("--devices must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
