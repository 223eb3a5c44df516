"""`edgeguide-server`: the operator's command line (serve, register, deploy, list, export the key, demo).

Every subcommand works on the registry in `--data-dir`. `deploy` records a deployment that a
running `serve` picks up within a second; with `--broker` it runs the server itself until the
deployment ends, so one command is enough on a machine with no `serve` running.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from protocol.limits import DEFAULT_LIMITS
from protocol.redact import redact_text, redact_url

_LOGGER = logging.getLogger(__name__)

ENV_DATA_DIR = "EDGEGUIDE_DATA_DIR"
ENV_BROKER = "EDGEGUIDE_BROKER"
ENV_DATABASE = "EDGEGUIDE_DATABASE"


def _default_data_dir() -> Path:
    from server.registry import DEFAULT_DATA_DIR

    return Path(os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR)


def _registry(args: argparse.Namespace, data_dir: Path):
    """The registry in `data_dir`, on PostgreSQL when --database/EDGEGUIDE_DATABASE gives a URL."""
    from server.db import open_database
    from server.registry import Registry

    url = getattr(args, "database", None)
    return Registry(data_dir, db=open_database(url) if url else None)


def _model_ref(text: str) -> tuple[str, int | None]:
    name, sep, version = text.partition(":")
    if not sep:
        return name, None
    try:
        return name, int(version)
    except ValueError:
        raise argparse.ArgumentTypeError(f"MODEL[:VERSION] expects an integer version, got {text!r}") from None


def _mqtt_options(parser: argparse.ArgumentParser, broker_required_help: str) -> None:
    group = parser.add_argument_group("broker connection")
    group.add_argument("--broker", default=os.environ.get(ENV_BROKER),
                       help=f"{broker_required_help} (mqtt://[user:pass@]HOST:PORT or mqtts://...; "
                            f"env {ENV_BROKER})")
    group.add_argument("--client-id", default=None,
                       help="MQTT client id (serve: default edgeguide-server, keep it stable so the broker keeps "
                            "the session across restarts; deploy: a one-off id with a clean session)")
    group.add_argument("--topic-prefix", default="edgeguide", help="topic prefix shared with the agents")
    group.add_argument("--protocol", choices=("auto", "5", "3.1.1"), default="auto",
                       help="MQTT version: auto tries 5 and falls back to 3.1.1")
    group.add_argument("--username", help="broker user name (overrides the URL)")
    group.add_argument("--password", help="broker password (prefer the URL or a config-managed secret)")
    group.add_argument("--tls-ca", help="CA certificate file for mqtts://")
    group.add_argument("--tls-cert", help="client certificate file (mutual TLS)")
    group.add_argument("--tls-key", help="client key file (mutual TLS)")
    group.add_argument("--no-shared-subscription", action="store_true",
                       help="on MQTT 5 brokers, subscribe to device topics directly instead of through the "
                            "$share group (only for a single server process)")


def _deploy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", type=Path,
                        help="gate policy TOML (default: the shipped server/policies/default.toml)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_LIMITS.default_chunk_bytes,
                        help="bytes per chunk on the wire (default %(default)s)")
    parser.add_argument("--deadline", type=float, default=1800.0,
                        help="seconds a deployment may take before it is timed out (default %(default)s)")
    parser.add_argument("--max-resends", type=int, default=10,
                        help="give up when one chunk was re-requested this many times (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeguide-server",
        description="EdgeGuide server: registry of compressed recommender artifacts, deployment over MQTT to "
                    "device agents, and the on-device acceptance gate.")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="registry, keys and reports live here "
                             f"(default ~/.local/share/edgeguide; env {ENV_DATA_DIR})")
    parser.add_argument("--database", default=os.environ.get(ENV_DATABASE),
                        help="registry database URL, postgresql://USER@HOST:PORT/DB (needs the postgres extra); "
                             f"default: SQLite in the data dir (env {ENV_DATABASE})")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the server: ingest device presence/events/reports, run deployments",
                       description="Long-running server: records device state and heartbeats, runs pending "
                                   "deployments (also those created by `deploy` from another shell), gates reports "
                                   "and sends signed verdicts. Stops on Ctrl-C/SIGTERM.")
    _mqtt_options(p, "broker to connect to (default mqtt://127.0.0.1:1883)")
    _deploy_options(p)

    p = sub.add_parser("register", help="copy an exported artifact folder into the registry (new version)",
                       description="Validate an artifact folder (model.tflite, items.json, metrics.json, golden.json), "
                                   "copy it into the data dir and assign the next global version.")
    p.add_argument("artifact_dir", type=Path, metavar="ARTIFACT_DIR", help="folder written by compression.export")
    p.add_argument("--model-id", help="model id to register under (default: metrics.json model_id)")

    p = sub.add_parser("deploy", help="deploy MODEL[:VERSION] to one device",
                       description="Create a deployment of a registered artifact (latest version unless :VERSION). "
                                   "Without --broker a running `serve` performs it; with --broker this command runs "
                                   "the server until the deployment ends.")
    p.add_argument("model", type=_model_ref, metavar="MODEL[:VERSION]", help="registered model id, optional version")
    p.add_argument("--device", required=True, help="target device id (must have been seen unless --force)")
    p.add_argument("--wait", action="store_true", help="wait for promoted/rolled back/rejected/timeout and print it")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to --wait (default %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="deploy to a never-seen device, or despite metrics.json saying its runtime cannot load it")
    _deploy_options(p)
    _mqtt_options(p, "run the server in this process against this broker (default: leave it to `serve`)")

    p = sub.add_parser("rollout", help="staged rollout of MODEL[:VERSION]: canary group first, then waves",
                       description="Deploy to named groups (in order), then to the remaining devices in waves. A stage "
                                   "whose failures pass --max-failure-pct stops the rollout and its promoted devices "
                                   "are told to roll back. Progress is kept in the registry: a restarted server "
                                   "resumes it. Without --broker a running `serve` performs it.")
    p.add_argument("model", type=_model_ref, metavar="MODEL[:VERSION]", help="registered model id, optional version")
    p.add_argument("--group", action="append", default=[], metavar="NAME=DEV1,DEV2",
                   help="a named stage run before the waves (repeatable, in order), e.g. canary=pi-1,pi-2")
    p.add_argument("--devices",
                   help="comma-separated devices for the waves (default: every known device not in a group)")
    p.add_argument("--waves", type=int, default=1, help="split the wave devices into this many waves (default 1)")
    p.add_argument("--max-failure-pct", type=float, default=20.0,
                   help="stop and roll back a stage when more than this percent of it failed (default 20)")
    p.add_argument("--plan", type=Path, help="TOML plan (max_failure_pct, waves, devices, [[group]] name/devices) "
                                             "instead of the options above")
    p.add_argument("--wait", action="store_true", help="wait until the rollout completes or aborts")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to --wait (default %(default)s)")
    _deploy_options(p)
    _mqtt_options(p, "run the server in this process against this broker until the rollout ends")

    p = sub.add_parser("rollouts", help="list rollouts with their stage and per-device outcomes")

    p = sub.add_parser("devices", help="list devices the server has heard from")
    p = sub.add_parser("deployments", help="list deployments, newest first")
    p.add_argument("--device", help="only this device")
    p.add_argument("--active", action="store_true", help="only deployments still in progress")
    p.add_argument("--limit", type=int, default=50, help="at most this many rows (default %(default)s)")
    sub.add_parser("artifacts", help="list registered artifacts")

    p = sub.add_parser("export-key", help="write the server's public key (the agents pin it with --server-key)")
    p.add_argument("out", type=Path, metavar="OUT", help="PEM file to write")

    p = sub.add_parser("demo", help="train, export int8, deploy to a local agent, query it: the whole loop",
                       description="End-to-end demo on this machine: loads Online Retail, trains the QUICK preset "
                                   "(--full for the reference preset), exports int8, registers it, starts a broker "
                                   "(embedded amqtt unless --broker), the server and one local agent, deploys, "
                                   "waits for the on-device verdict and asks the agent for a recommendation.")
    p.add_argument("--full", action="store_true", help="train the full reference preset (slower) instead of quick")
    p.add_argument("--broker", help="use this broker instead of starting the embedded amqtt one")
    p.add_argument("--max-customers", type=int, default=None, help="train on the first N customers only (faster)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the demo's data dir, artifacts and agent state here (default: a temp dir, removed)")
    p.add_argument("--measure-mode", choices=("quick", "full"), default="quick",
                   help="agent measurement mode: quick (seconds) or full (>= 60 s timed run, MLPerf-style)")
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _server_config(args: argparse.Namespace, one_shot: bool = False):
    from server.service import ServerConfig

    client_id = args.client_id or (f"edgeguide-deploy-{os.getpid()}" if one_shot else "edgeguide-server")
    return ServerConfig(broker_url=args.broker or "mqtt://127.0.0.1:1883", client_id=client_id,
                        clean_start=one_shot and not args.client_id,
                        topic_prefix=args.topic_prefix, protocol=args.protocol, username=args.username,
                        password=args.password, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        # A one-off process must see every reply itself: in the $share group the broker could
                        # hand the device's report to a stopped `serve` session that queues it for later.
                        shared_subscription=not (args.no_shared_subscription or one_shot))


def _deployer_config(args: argparse.Namespace):
    from server.deployer import DeployerConfig

    return DeployerConfig(chunk_size=args.chunk_size, deadline_s=args.deadline, max_resends=args.max_resends)


def _ts(value: float | None) -> str:
    return datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def cmd_serve(args: argparse.Namespace, data_dir: Path) -> int:
    import signal

    from server.policy import load_policy
    from server.service import EdgeGuideServer

    server = EdgeGuideServer(_registry(args, data_dir), _server_config(args), policy=load_policy(args.policy),
                             deployer_config=_deployer_config(args))
    stop = {"flag": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    server.start()
    print(f"edgeguide-server serving on {redact_url(server.config.broker_url)} (prefix {server.topics.prefix!r}, "
          f"data {data_dir}); Ctrl-C to stop", flush=True)
    try:
        while not stop["flag"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def cmd_register(args: argparse.Namespace, data_dir: Path) -> int:

    registry = _registry(args, data_dir)
    record = registry.register(args.artifact_dir, model_id=args.model_id)
    m = record.metrics
    print(f"registered {record.model_id} version {record.version}: {record.size} bytes packed, sha256 {record.sha256}"
          f" (HR@10 {m.get('hr10', 'n/a')}, tflite {m.get('tflite_bytes', 'n/a')} B)")
    return 0


def cmd_deploy(args: argparse.Namespace, data_dir: Path) -> int:
    from server import keys
    from server.deployer import Deployer
    from server.policy import load_policy
    from server.service import EdgeGuideServer, wait_for_deployment

    model_id, version = args.model
    registry = _registry(args, data_dir)
    policy = load_policy(args.policy)
    server = None
    if args.broker:
        server = EdgeGuideServer(registry, _server_config(args, one_shot=True), policy=policy,
                                 deployer_config=_deployer_config(args))
        server.start()
        record = server.deploy(model_id, args.device, version=version, policy=policy, force=args.force,
                               chunk_size=args.chunk_size, wait_seen_s=3.0)
    else:
        deployer = Deployer(registry, keys.server_key(data_dir), _no_publish, policy=policy,
                            config=_deployer_config(args))
        record = deployer.create(model_id, args.device, version=version, policy=policy, force=args.force,
                                 chunk_size=args.chunk_size)
    print(f"deployment {record.deployment_id}: {record.model_id}@{record.version} -> {record.device_id} "
          f"({record.status})", flush=True)
    try:
        if not (args.wait or server):
            print("a running `edgeguide-server serve` will perform it; follow it with `edgeguide-server deployments`")
            return 0
        if server is None:
            print("waiting for a running `edgeguide-server serve` to perform it ...", flush=True)
        final = wait_for_deployment(registry, record.deployment_id, args.timeout,
                                    on_change=lambda d: print(f"  {d.status} {d.reason}".rstrip(), flush=True))
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        if server is not None:
            server.stop()
    if final.verdict:
        for check in final.verdict.get("checks", []):
            figure = check.get("figure")
            shown = f"{figure:.4g}" if isinstance(figure, float) else str(figure)
            print(f"  {check.get('outcome'):20s} {check.get('name')}: {shown} {check.get('op')} {check.get('limit')}"
                  f" {check.get('unit') or ''}".rstrip())
    print(f"{final.deployment_id}: {final.status} - {final.reason}")
    return 0 if final.status == "promoted" else 1


def cmd_rollout(args: argparse.Namespace, data_dir: Path) -> int:
    from server import keys
    from server.deployer import Deployer
    from server.policy import load_policy
    from server.rollout import RolloutManager, load_plan, make_plan, parse_group
    from server.service import EdgeGuideServer

    model_id, version = args.model
    registry = _registry(args, data_dir)
    known = [d.device_id for d in registry.devices()]
    if args.plan:
        plan = load_plan(args.plan, known)
    else:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else known
        plan = make_plan([parse_group(g) for g in args.group], devices, args.waves, args.max_failure_pct)
    policy = load_policy(args.policy) if args.policy else None
    server = None
    if args.broker:
        server = EdgeGuideServer(registry, _server_config(args, one_shot=True), policy=load_policy(args.policy),
                                 deployer_config=_deployer_config(args)).start()
        manager = server.rollouts
    else:
        deployer = Deployer(registry, keys.server_key(data_dir), _no_publish, policy=load_policy(args.policy),
                            config=_deployer_config(args))
        manager = RolloutManager(registry, deployer)
    rollout = manager.create(model_id, plan, version=version, policy=policy)
    for stage in plan.stages:
        print(f"  {stage.name}: {', '.join(stage.devices)}")
    print(f"rollout {rollout.rollout_id}: {rollout.model_id}@{rollout.version} in {len(plan.stages)} stages, "
          f"stop above {plan.max_failure_pct:g} % failures", flush=True)
    if not (args.wait or server):
        print("a running `edgeguide-server serve` will perform it; follow it with `edgeguide-server rollouts`")
        return 0
    deadline = time.monotonic() + args.timeout
    last = None
    try:
        while not rollout.finished:
            if (rollout.status, rollout.stage) != last:
                last = (rollout.status, rollout.stage)
                print(f"  {rollout.status} stage {rollout.stage} {rollout.reason}".rstrip(), flush=True)
            if time.monotonic() > deadline:
                print(f"error: rollout {rollout.rollout_id} still {rollout.status} after {args.timeout:.0f} s",
                      file=sys.stderr)
                return 3
            time.sleep(0.5)
            rollout = manager.get(rollout.rollout_id)
    finally:
        if server is not None:
            server.stop()
    print(f"{rollout.rollout_id}: {rollout.status} - {rollout.reason}")
    return 0 if rollout.status == "completed" else 1


def cmd_rollouts(args: argparse.Namespace, data_dir: Path) -> int:
    from rich.console import Console
    from rich.table import Table

    from server import keys
    from server.deployer import Deployer
    from server.policy import load_policy
    from server.rollout import RolloutManager

    registry = _registry(args, data_dir)
    manager = RolloutManager(registry, Deployer(registry, keys.server_key(data_dir), _no_publish,
                                                policy=load_policy(None)))
    table = Table("rollout", "model", "status", "stage", "devices (outcome)", "reason")
    for r in manager.rollouts():
        outcomes = ", ".join(f"{d}={m['outcome'] or ('-' if m['deployment_id'] is None else 'running')}"
                             for d, m in r.devices.items())
        table.add_row(r.rollout_id, f"{r.model_id}@{r.version}", r.status,
                      f"{r.stage + 1}/{len(r.plan.stages)} {r.plan.stages[r.stage].name}", outcomes, r.reason[:80])
    Console().print(table)
    return 0


def _no_publish(topic: str, payload: bytes) -> None:
    raise RuntimeError(f"this process has no broker connection (tried to publish on {topic!r})")


def cmd_devices(args: argparse.Namespace, data_dir: Path) -> int:
    from rich.console import Console
    from rich.table import Table


    table = Table("device", "status", "active model", "runtime", "last seen", "last error")
    for d in _registry(args, data_dir).devices():
        active = f"{d.active_model_id}@{d.active_version}" if d.active_model_id else "-"
        table.add_row(d.device_id, d.status, active, d.runtime_key or "-", _ts(d.last_seen), d.last_error or "")
    Console().print(table)
    return 0


def cmd_deployments(args: argparse.Namespace, data_dir: Path) -> int:
    from rich.console import Console
    from rich.table import Table


    table = Table("deployment", "device", "model", "status", "verdict", "created", "reason")
    for d in _registry(args, data_dir).deployments(active_only=args.active, device_id=args.device, limit=args.limit):
        table.add_row(d.deployment_id, d.device_id, f"{d.model_id}@{d.version}", d.status,
                      (d.verdict or {}).get("verdict", "-"), _ts(d.created), d.reason[:80])
    Console().print(table)
    return 0


def cmd_artifacts(args: argparse.Namespace, data_dir: Path) -> int:
    from rich.console import Console
    from rich.table import Table


    table = Table("id", "version", "packed bytes", "tflite bytes", "HR@10", "techniques", "registered")
    for a in _registry(args, data_dir).artifacts():
        m = a.metrics
        hr = m.get("hr10")
        table.add_row(a.id, str(a.version), str(a.size), str(m.get("tflite_bytes", "-")),
                      f"{hr:.3f}" if isinstance(hr, float) else "-", ",".join(m.get("techniques") or []) or "-",
                      _ts(a.created))
    Console().print(table)
    return 0


def cmd_export_key(args: argparse.Namespace, data_dir: Path) -> int:
    from server.keys import export_public_key

    out = export_public_key(data_dir, args.out)
    print(f"wrote the server public key to {out}; start agents with --server-key {out}")
    return 0


def cmd_demo(args: argparse.Namespace, _data_dir: Path) -> int:
    from server.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(full=args.full, broker=args.broker, max_customers=args.max_customers,
                                workdir=args.workdir, measure_mode=args.measure_mode, verbose=args.verbose))


COMMANDS = {"serve": cmd_serve, "register": cmd_register, "deploy": cmd_deploy, "rollout": cmd_rollout,
            "rollouts": cmd_rollouts, "devices": cmd_devices,
            "deployments": cmd_deployments, "artifacts": cmd_artifacts, "export-key": cmd_export_key,
            "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code (errors print one line, not a traceback)."""
    from protocol.errors import ProtocolError
    from protocol.mqtt import ConnectError
    from server.deployer import DeployError
    from server.policy import PolicyError
    from server.registry import RegistryError
    from server.rollout import RolloutError

    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    data_dir = (args.data_dir or _default_data_dir()).expanduser()
    try:
        return COMMANDS[args.command](args, data_dir)
    except (DeployError, RegistryError, RolloutError, PolicyError, ProtocolError, ConnectError, ValueError) as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
