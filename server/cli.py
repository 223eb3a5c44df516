"""`edgeguide-server`: the operator's command line (serve, register, deploy, list, export the key, demo).

Every subcommand works on the registry in `--data-dir`. `deploy` records a deployment that a
running `serve` picks up within a second; with `--broker` it runs the server itself until the
deployment ends, so one command is enough on a machine with no `serve` running. Listings print
a table on a terminal, full untruncated columns when piped, and JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from protocol.limits import DEFAULT_LIMITS
from protocol.redact import redact_text, redact_url
from server import cli_output as out

_LOGGER = logging.getLogger(__name__)

ENV_DATA_DIR = "EDGEGUIDE_DATA_DIR"
ENV_BROKER = "EDGEGUIDE_BROKER"
ENV_BROKER_URL = "EDGEGUIDE_BROKER_URL"  # the agent's older name, accepted here too
ENV_DATABASE = "EDGEGUIDE_DATABASE"
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3
EXIT_CODES = """exit codes:
  0    success (listing printed, deployment promoted, rollout completed)
  1    the operation ran and failed (deployment rejected, rolled back, timed out or cancelled;
       rollout aborted)
  2    bad input, nothing changed: unknown model, version, device or deployment; invalid option,
       policy or plan; broker unreachable
  3    --wait ran out of time: the deployment or rollout goes on (the message says why it is stuck)
  130  interrupted (Ctrl-C)"""


def _version() -> str:
    from agent import __version__

    return __version__


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and shows each option's default unless its help already does."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


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
    """`MODEL`, `MODEL@VERSION` (as printed) or `MODEL:VERSION`."""
    at, colon = text.rfind("@"), text.rfind(":")
    cut = max(at, colon)
    if cut < 0:
        return text, None
    name, version = text[:cut], text[cut + 1:]
    try:
        return name, int(version)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"MODEL[@VERSION] expects an integer version, got {text!r} (e.g. {name}@2)") from None


def _versioned_ref(text: str) -> tuple[str, int]:
    name, version = _model_ref(text)
    if version is None:
        raise argparse.ArgumentTypeError(f"give the version to remove: {text}@VERSION (see `edgeguide-server models`)")
    return name, version


# Options every subcommand accepts before or after its name. Parsers get them with SUPPRESS
# defaults (so a subcommand's parser never overwrites what the top level parsed); main() fills
# in the defaults afterwards.
_GLOBAL_DEFAULTS: dict[str, Any] = {"data_dir": None, "database": None, "verbose": 0, "log_level": None,
                                    "json": False, "broker": None}


def _global_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("global options (before or after the command)")
    s = argparse.SUPPRESS
    group.add_argument("--data-dir", type=Path, default=s,
                       help=f"registry, keys and reports live here (default: ${ENV_DATA_DIR} or "
                            "~/.local/share/edgeguide)")
    group.add_argument("--database", default=s,
                       help="registry database URL, postgresql://USER@HOST:PORT/DB (needs the postgres extra) "
                            f"(default: ${ENV_DATABASE}, else SQLite in the data dir)")
    group.add_argument("--broker", default=s,
                       help=f"broker URL mqtt://[user:pass@]HOST:PORT or mqtts://... (default: ${ENV_BROKER}, "
                            f"${ENV_BROKER_URL}, else {DEFAULT_BROKER} for serve; deploy/rollout without it leave "
                            "the work to a running serve)")
    group.add_argument("--json", dest="json", action="store_const", const=True, default=s,
                       help="print JSON instead of a table/text (default: text)")
    group.add_argument("-o", "--output", dest="json", type=_json_flag, default=s, metavar="FORMAT",
                       help="json or text; `-o json` is the same as --json (default: text)")
    group.add_argument("-v", "--verbose", action="count", default=s,
                       help="more logging: -v info, -vv debug (default: warnings only; serve logs info)")
    group.add_argument("--log-level", default=s, type=str.upper,
                       choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="set the log level outright "
                                                                           "(default: from -v)")


def _json_flag(text: str) -> bool:
    if text.lower() not in {"json", "text", "table"}:
        raise argparse.ArgumentTypeError(f"output format must be json or text, got {text!r}")
    return text.lower() == "json"


def _mqtt_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("broker connection")
    group.add_argument("--client-id", default=None,
                       help="MQTT client id (serve: default edgeguide-server, keep it stable so the broker keeps "
                            "the session across restarts; deploy: a one-off id with a clean session)")
    group.add_argument("--topic-prefix", default="edgeguide", help="topic prefix shared with the agents")
    group.add_argument("--protocol", choices=("auto", "5", "3.1.1"), default="auto",
                       help="MQTT version: auto tries 5 and falls back to 3.1.1")
    group.add_argument("--username", help="broker user name (overrides the URL)")
    group.add_argument("--password", help="broker password; like a URL with a password, it shows in `ps`: prefer "
                            f"${ENV_BROKER} in the environment (a systemd EnvironmentFile, a secret store)")
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
                        help="bytes per chunk on the wire")
    parser.add_argument("--deadline", type=float, default=1800.0,
                        help="seconds a deployment may take before it is timed out")
    parser.add_argument("--max-resends", type=int, default=10,
                        help="give up when one chunk was re-requested this many times")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeguide-server", formatter_class=_HelpFormatter, epilog=EXIT_CODES,
        description="EdgeGuide server: registry of compressed recommender artifacts, deployment over MQTT to "
                    "device agents, and the on-device acceptance gate. Versions are written MODEL@VERSION "
                    "(MODEL:VERSION is accepted too).")
    parser.add_argument("--version", action="version", version=f"edgeguide-server {_version()}")
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, description: str | None = None,
                aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=description or help_text, aliases=list(aliases),
                           formatter_class=_HelpFormatter, epilog=EXIT_CODES)
        _global_options(p)
        return p

    p = command("serve", "run the server: ingest device presence/events/reports, run deployments",
                "Long-running server: records device state and heartbeats, runs pending deployments (also those "
                "created by `deploy` from another shell), gates reports and sends signed verdicts. Logs each "
                "state change at INFO. Stops on Ctrl-C/SIGTERM.")
    _mqtt_options(p)
    _deploy_options(p)
    p.add_argument("--http", metavar="HOST:PORT", help="also serve the web dashboard here, e.g. 127.0.0.1:8080")
    p.add_argument("--http-token-file", type=Path, metavar="FILE",
                   help="file holding the dashboard operator token (default: $EDGEGUIDE_HTTP_TOKEN; neither: "
                        "the dashboard is read-only)")
    p.add_argument("--http-search", type=Path, action="append", default=[], metavar="PATH",
                   help="compression search output (folder with search.json) for the Models page (repeatable)")

    p = command("register", "copy an exported artifact folder into the registry (new version)",
                "Validate an artifact folder (model.tflite, items.json, metrics.json, golden.json), copy it into "
                "the data dir and assign the next global version.")
    p.add_argument("artifact_dir", type=Path, metavar="ARTIFACT_DIR", help="folder written by compression.export")
    p.add_argument("--model-id", help="model id to register under (default: metrics.json model_id)")

    p = command("unregister", "withdraw MODEL@VERSION: no new deployments, files deleted, history kept",
                "Withdraw one registered version. Refused while a deployment of it runs or a device has it "
                "active. Its version number is never reused.")
    p.add_argument("model", type=_versioned_ref, metavar="MODEL@VERSION", help="registered model id and version")

    p = command("deploy", "deploy MODEL[@VERSION] to one device",
                "Create a deployment of a registered artifact (latest version unless @VERSION). Without --broker "
                "a running `serve` performs it; with --broker this command runs the server until the deployment "
                "ends.")
    p.add_argument("model", type=_model_ref, metavar="MODEL[@VERSION]",
                   help="registered model id, optional version (MODEL:VERSION works too)")
    p.add_argument("--device", required=True, help="target device id (must have been seen unless --force)")
    p.add_argument("--wait", action="store_true", help="wait for promoted/rolled back/rejected/timeout and print it")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to --wait")
    p.add_argument("--force", action="store_true",
                   help="deploy to a never-seen device, or despite metrics.json saying its runtime cannot load it")
    _deploy_options(p)
    _mqtt_options(p)

    p = command("rollout", "staged rollout of MODEL[@VERSION]: canary group first, then waves",
                "Deploy to named groups (in order), then to the remaining devices in waves. Devices already on the "
                "version are skipped; never-seen devices are refused up front. A stage whose failures pass "
                "--max-failure-pct stops the rollout and its promoted devices are told to roll back. Progress is "
                "kept in the registry: a restarted server resumes it. Without --broker a running `serve` "
                "performs it.")
    p.add_argument("model", type=_model_ref, metavar="MODEL[@VERSION]",
                   help="registered model id, optional version (MODEL:VERSION works too)")
    p.add_argument("--group", action="append", default=[], metavar="NAME=DEV1,DEV2",
                   help="a named stage run before the waves (repeatable, in order), e.g. canary=pi-1,pi-2")
    p.add_argument("--devices",
                   help="comma-separated devices for the waves (default: every known device not in a group)")
    p.add_argument("--waves", type=int, default=1, help="split the wave devices into this many waves")
    p.add_argument("--max-failure-pct", type=float, default=20.0,
                   help="stop and roll back a stage when more than this percent of it failed")
    p.add_argument("--plan", type=Path, help="TOML plan (max_failure_pct, waves, devices, [[group]] name/devices) "
                                             "instead of the options above")
    p.add_argument("--wait", action="store_true", help="wait until the rollout completes or aborts")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to --wait")
    _deploy_options(p)
    _mqtt_options(p)

    command("rollouts", "list rollouts with their stage and per-device outcomes")

    p = command("devices", "list devices the server has heard from (`devices remove ID` forgets one)")
    dsub = p.add_subparsers(dest="devices_action", metavar="ACTION", help="remove ID: forget a device")
    q = dsub.add_parser("remove", help="forget a device (refused while a deployment to it runs)",
                        description="Forget a device: it leaves the listings and rollouts. Its deployments and "
                                    "events stay. If its agent still runs, it reappears at its next state message.",
                        formatter_class=_HelpFormatter, epilog=EXIT_CODES)
    _global_options(q)
    q.add_argument("device_id", metavar="ID", help="device id")

    p = command("deployments", "list deployments, newest first (`deployments show ID` for one)")
    p.add_argument("--device", help="only this device")
    p.add_argument("--active", action="store_true", help="only deployments still in progress")
    p.add_argument("--limit", type=int, default=50, help="at most this many rows")
    dsub = p.add_subparsers(dest="deployments_action", metavar="ACTION", help="show ID: one deployment in full")
    q = dsub.add_parser("show", help="one deployment: status, reason, gate checks, report folder, events",
                        description="Everything recorded about one deployment.", formatter_class=_HelpFormatter,
                        epilog=EXIT_CODES)
    _global_options(q)
    q.add_argument("deployment_id", metavar="ID", help="deployment id (as listed by `deployments`)")

    p = command("cancel", "cancel a deployment in progress; its device keeps its current model",
                "Mark a deployment cancelled. With --broker the device is told at once; otherwise the next running "
                "`serve` tells it (signed cancel command).")
    p.add_argument("deployment_id", metavar="ID", help="deployment id")
    _mqtt_options(p)

    command("models", "list registered artifacts (MODEL@VERSION)", aliases=("artifacts",))

    p = command("logs", "print the server's event log (device events, status changes); -f follows it")
    p.add_argument("--device", help="only this device")
    p.add_argument("--deployment", help="only this deployment")
    p.add_argument("--limit", type=int, default=50, help="the last this many events")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events until Ctrl-C")

    p = command("export-key", "write the server's public key (the agents pin it with --server-key)",
                "Write the server's Ed25519 public key (PEM) and print its fingerprint; agents log the fingerprint "
                "of the key they pin at start, so the two can be compared.")
    p.add_argument("out", type=Path, metavar="OUT", help="PEM file to write")

    p = command("demo", "train, export int8, deploy to a local agent, query it: the whole loop",
                "End-to-end demo on this machine: loads Online Retail, trains the QUICK preset (--full for the "
                "reference preset), exports int8, registers it, starts a broker (embedded amqtt unless --broker), "
                "the server and one local agent, deploys, waits for the on-device verdict and asks the agent for "
                "a recommendation.")
    p.add_argument("--full", action="store_true", help="train the full reference preset (slower) instead of quick")
    p.add_argument("--max-customers", type=int, default=None, help="train on the first N customers only (faster)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the demo's data dir, artifacts and agent state here (default: a temp dir, removed "
                        "unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir and print where it is")
    p.add_argument("--measure-mode", choices=("quick", "full"), default="quick",
                   help="agent measurement mode: quick (seconds) or full (>= 60 s timed run, MLPerf-style)")
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    """Warnings by default, INFO for `serve` (an operator watches it); -v/-vv or --log-level raise it."""
    base = 1 if args.command == "serve" else 0
    level = args.log_level or ("WARNING", "INFO", "DEBUG")[min(2, base + args.verbose)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _server_config(args: argparse.Namespace, one_shot: bool = False):
    from server.service import ServerConfig

    client_id = args.client_id or (f"edgeguide-deploy-{os.getpid()}" if one_shot else "edgeguide-server")
    return ServerConfig(broker_url=args.broker or DEFAULT_BROKER, client_id=client_id,
                        clean_start=one_shot and not args.client_id,
                        topic_prefix=args.topic_prefix, protocol=args.protocol, username=args.username,
                        password=args.password, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        # A one-off process must see every reply itself: in the $share group the broker could
                        # hand the device's report to a stopped `serve` session that queues it for later.
                        shared_subscription=not (args.no_shared_subscription or one_shot))


def _deployer_config(args: argparse.Namespace):
    from server.deployer import DeployerConfig

    return DeployerConfig(chunk_size=args.chunk_size, deadline_s=args.deadline, max_resends=args.max_resends)


def _offline_deployer(registry: Any, data_dir: Path, args: argparse.Namespace | None = None):
    """A deployer that records in the registry but cannot publish (no broker in this process)."""
    from server import keys
    from server.deployer import Deployer
    from server.policy import load_policy

    policy_file = getattr(args, "policy", None)
    return Deployer(registry, keys.server_key(data_dir), _no_publish, policy=load_policy(policy_file),
                    config=_deployer_config(args) if args is not None and hasattr(args, "chunk_size") else None)


def _no_publish(topic: str, payload: bytes) -> None:
    raise RuntimeError(f"this process has no broker connection (tried to publish on {topic!r})")


def _say(args: argparse.Namespace, text: str) -> None:
    """Progress for people: stdout in text mode, stderr with --json (stdout holds only the JSON)."""
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


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
    token = None
    if args.http:
        from server.web import parse_http, read_token

        parse_http(args.http)
        token = read_token(args.http_token_file)
    server.start()
    dashboard = None
    try:
        if args.http:
            from server.web import start_dashboard

            dashboard = start_dashboard(server, args.http, token=token, search_paths=args.http_search)
            print(f"dashboard on {dashboard.url} ({'operator token set' if token else 'read-only'})", flush=True)
    except BaseException:
        server.stop()
        raise
    print(f"edgeguide-server serving on {redact_url(server.config.broker_url)} (prefix {server.topics.prefix!r}, "
          f"data {data_dir}); Ctrl-C to stop", flush=True)
    try:
        while not stop["flag"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if dashboard is not None:
            dashboard.stop()
        server.stop()
    return EXIT_OK


def cmd_register(args: argparse.Namespace, data_dir: Path) -> int:
    record = _registry(args, data_dir).register(args.artifact_dir, model_id=args.model_id)
    if args.json:
        out.print_json(out.artifact_dict(record))
        return EXIT_OK
    m = record.metrics
    hr10 = m.get("hr10")
    tflite = m.get("tflite_bytes")
    print(f"registered {record.id}: {record.size} bytes packed, sha256 {record.sha256}"
          f" (HR@10 {f'{hr10:.3f}' if isinstance(hr10, float) else 'n/a'}, tflite "
          f"{out.human_bytes(tflite) if isinstance(tflite, int) else 'n/a'}); "
          f"deploy it with `edgeguide-server deploy {record.id} --device DEVICE`")
    return EXIT_OK


def cmd_unregister(args: argparse.Namespace, data_dir: Path) -> int:
    model_id, version = args.model
    record = _registry(args, data_dir).unregister(model_id, version)
    if args.json:
        out.print_json({"unregistered": record.id})
    else:
        print(f"unregistered {record.id}: it can no longer be deployed; its past deployments stay listed")
    return EXIT_OK


def _print_outcome(args: argparse.Namespace, registry: Any, final: Any) -> None:
    folder = out.report_dir(registry.reports_dir, final.deployment_id)
    if args.json:
        out.print_json(out.deployment_dict(final, registry.reports_dir))
        return
    for check in (final.verdict or {}).get("checks", []):
        print("  " + out.safe(out.check_line(check)))
    print(out.safe(f"{final.deployment_id}: {final.status} - {final.reason}"))
    if folder is not None:
        print(f"report: {folder}")


def cmd_deploy(args: argparse.Namespace, data_dir: Path) -> int:
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
        try:
            record = server.deploy(model_id, args.device, version=version, policy=policy, force=args.force,
                                   chunk_size=args.chunk_size, wait_seen_s=3.0)
        except BaseException:
            server.stop()
            raise
    else:
        record = _offline_deployer(registry, data_dir, args).create(model_id, args.device, version=version,
                                                                    policy=policy, force=args.force,
                                                                    chunk_size=args.chunk_size)
    _say(args, f"deployment {record.deployment_id}: {record.model_id}@{record.version} -> {record.device_id} "
               f"({record.status})")
    try:
        if not (args.wait or server):
            if args.json:
                out.print_json(out.deployment_dict(record))
            else:
                print("a running `edgeguide-server serve` will perform it; follow it with "
                      f"`edgeguide-server deployments show {record.deployment_id}`")
            return EXIT_OK
        if server is None:
            _say(args, "waiting for a running `edgeguide-server serve` to perform it ...")
        final = wait_for_deployment(registry, record.deployment_id, args.timeout,
                                    on_change=lambda d: _say(args, f"  {d.status} {d.reason}".rstrip()))
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.json:
            out.print_json({**out.deployment_dict(registry.deployment(record.deployment_id), registry.reports_dir),
                            "error": str(exc)})
        return EXIT_TIMEOUT
    finally:
        if server is not None:
            server.stop()
    _print_outcome(args, registry, final)
    return EXIT_OK if final.status == "promoted" else EXIT_FAILED


def cmd_rollout(args: argparse.Namespace, data_dir: Path) -> int:
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
        manager = RolloutManager(registry, _offline_deployer(registry, data_dir, args))
    try:
        rollout = manager.create(model_id, plan, version=version, policy=policy)
        for stage in plan.stages:
            _say(args, f"  {stage.name}: {', '.join(stage.devices)}")
        for device, member in rollout.devices.items():
            if member["outcome"] == "skipped":
                _say(args, f"  skip {device}: {member['detail']}")
        _say(args, f"rollout {rollout.rollout_id}: {rollout.model_id}@{rollout.version} in {len(plan.stages)} "
                   f"stages, stop above {plan.max_failure_pct:g} % failures")
        if not (args.wait or server):
            if args.json:
                out.print_json(out.rollout_dict(rollout))
            else:
                print("a running `edgeguide-server serve` will perform it; follow it with `edgeguide-server "
                      "rollouts`")
            return EXIT_OK
        deadline = time.monotonic() + args.timeout
        last = None
        while not rollout.finished:
            if (rollout.status, rollout.stage) != last:
                last = (rollout.status, rollout.stage)
                _say(args, f"  {rollout.status} stage {rollout.stage} {rollout.reason}".rstrip())
            if time.monotonic() > deadline:
                print(f"error: rollout {rollout.rollout_id} still {rollout.status} after {args.timeout:.0f} s"
                      f"{_rollout_stall(registry, rollout)}", file=sys.stderr)
                if args.json:
                    out.print_json({**out.rollout_dict(rollout), "error": "timeout"})
                return EXIT_TIMEOUT
            time.sleep(0.5)
            rollout = manager.get(rollout.rollout_id)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        out.print_json(out.rollout_dict(rollout))
    else:
        for device, member in rollout.devices.items():
            print(out.safe(f"  {device}: {member['outcome'] or '-'} {member['detail']}".rstrip()))
        print(out.safe(f"{rollout.rollout_id}: {rollout.status} - {rollout.reason}"))
    return EXIT_OK if rollout.status == "completed" else EXIT_FAILED


def _rollout_stall(registry: Any, rollout: Any) -> str:
    from server.service import stall_reason

    for member in rollout.devices.values():
        if member["outcome"] is None and member["deployment_id"] not in (None, "claiming"):
            return f": {member['device_id']}: " + stall_reason(registry, registry.deployment(member["deployment_id"]))
    seen = registry.last_server_seen()
    if seen is None or time.time() - seen > 15:
        return ": no server heartbeat seen: no `edgeguide-server serve` runs on this registry"
    return ""


def cmd_rollouts(args: argparse.Namespace, data_dir: Path) -> int:
    from server.rollout import RolloutManager

    registry = _registry(args, data_dir)
    rollouts = RolloutManager(registry, _offline_deployer(registry, data_dir)).rollouts()
    if args.json:
        out.print_json([out.rollout_dict(r) for r in rollouts])
        return EXIT_OK
    tty = out.is_tty()
    rows = []
    for r in rollouts:
        outcomes = ", ".join(f"{d}={m['outcome'] or ('-' if m['deployment_id'] is None else 'running')}"
                             for d, m in r.devices.items())
        rows.append([r.rollout_id, f"{r.model_id}@{r.version}", r.status,
                     f"{r.stage + 1}/{len(r.plan.stages)} {r.plan.stages[r.stage].name}", outcomes,
                     r.reason[:80] if tty else r.reason])
    out.print_table(["rollout", "model", "status", "stage", "devices (outcome)", "reason"], rows)
    return EXIT_OK


def cmd_devices(args: argparse.Namespace, data_dir: Path) -> int:
    registry = _registry(args, data_dir)
    if getattr(args, "devices_action", None) == "remove":
        device = registry.remove_device(args.device_id)
        if args.json:
            out.print_json({"removed": device.device_id})
        else:
            print(f"removed device {device.device_id} (its deployments stay listed; a running agent re-appears)")
        return EXIT_OK
    devices = registry.devices()
    if args.json:
        out.print_json([out.device_dict(d) for d in devices])
        return EXIT_OK
    rows = [[d.device_id, d.status, f"{d.active_model_id}@{d.active_version}" if d.active_model_id else "-",
             d.runtime_key or "-", out.local_time(d.last_seen), d.last_error or ""] for d in devices]
    out.print_table(["device", "status", "active model", "runtime", "last seen", "last error"], rows)
    return EXIT_OK


def cmd_deployments(args: argparse.Namespace, data_dir: Path) -> int:
    registry = _registry(args, data_dir)
    if getattr(args, "deployments_action", None) == "show":
        return _show_deployment(args, registry)
    deps = registry.deployments(active_only=args.active, device_id=args.device, limit=args.limit)
    if args.json:
        out.print_json([out.deployment_dict(d) for d in deps])
        return EXIT_OK
    tty = out.is_tty()
    rows = [[d.deployment_id, d.device_id, f"{d.model_id}@{d.version}", d.status,
             (d.verdict or {}).get("verdict", "-"), out.local_time(d.created), d.reason[:80] if tty else d.reason]
            for d in deps]
    out.print_table(["deployment", "device", "model", "status", "verdict", "created", "reason"], rows)
    return EXIT_OK


def _show_deployment(args: argparse.Namespace, registry: Any) -> int:
    from server.service import stall_reason

    dep = registry.deployment(args.deployment_id)
    info = out.deployment_dict(dep, registry.reports_dir)
    if not dep.terminal:
        info["waiting_on"] = stall_reason(registry, dep)
    events = registry.events(deployment_id=dep.deployment_id, limit=200)
    info["events"] = [{"ts": out.iso(e["ts"]), "kind": e["kind"], "detail": e["detail"]} for e in events]
    if args.json:
        out.print_json(info)
        return EXIT_OK
    for key in ("deployment_id", "device_id", "model", "status", "reason", "verdict", "created", "updated",
                "report_dir", "waiting_on"):
        if info.get(key) not in (None, ""):
            print(f"{key + ':':15s} {out.safe(info[key])}")
    if info["checks"]:
        print("checks:")
        for check in info["checks"]:
            print("  " + out.safe(out.check_line(check)))
    print("events:")
    for e in events:
        print(out.safe(f"  {out.local_time(e['ts'])} {e['kind']} {e['detail']}".rstrip()))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, data_dir: Path) -> int:
    from server.service import EdgeGuideServer

    registry = _registry(args, data_dir)
    if args.broker:
        with EdgeGuideServer(registry, _server_config(args, one_shot=True)) as server:
            dep = server.deployer.cancel(args.deployment_id, notify=True)
    else:
        dep = _offline_deployer(registry, data_dir).cancel(args.deployment_id, notify=False)
    if args.json:
        out.print_json(out.deployment_dict(dep))
    else:
        print(out.safe(f"{dep.deployment_id}: {dep.status} - {dep.reason}"))
    return EXIT_OK


def cmd_models(args: argparse.Namespace, data_dir: Path) -> int:
    artifacts = _registry(args, data_dir).artifacts()
    if args.json:
        out.print_json([out.artifact_dict(a) for a in artifacts])
        return EXIT_OK
    rows = []
    for a in artifacts:
        m = a.metrics
        hr = m.get("hr10")
        rows.append([a.id, str(a.size), str(m.get("tflite_bytes", "-")), f"{hr:.3f}" if isinstance(hr, float) else "-",
                     ",".join(m.get("techniques") or []) or "-", out.local_time(a.created)])
    out.print_table(["model", "packed bytes", "tflite bytes", "HR@10", "techniques", "registered"], rows)
    return EXIT_OK


def cmd_logs(args: argparse.Namespace, data_dir: Path) -> int:
    registry = _registry(args, data_dir)
    rows = registry.events(device_id=args.device, deployment_id=args.deployment, limit=1_000_000)[-args.limit:]
    last_id = rows[-1]["id"] if rows else 0
    while True:
        for e in rows:
            entry = {"ts": out.iso(e["ts"]), "device_id": e["device_id"], "deployment_id": e["deployment_id"],
                     "kind": e["kind"], "detail": e["detail"]}
            if args.json:  # one JSON object per line, so -f output can be streamed
                print(json.dumps(entry, sort_keys=True), flush=True)
            else:
                print(out.safe(f"{out.local_time(e['ts'])} {e['kind']:24s} {e['device_id'] or '-'} "
                               f"{e['deployment_id'] or '-'} {e['detail']}".rstrip()), flush=True)
            last_id = max(last_id, e["id"])
        if not args.follow:
            return EXIT_OK
        time.sleep(0.5)
        rows = [e for e in registry.events(device_id=args.device, deployment_id=args.deployment, limit=1_000_000)
                if e["id"] > last_id]


def cmd_export_key(args: argparse.Namespace, data_dir: Path) -> int:
    from protocol import signing
    from server.keys import export_public_key

    written = export_public_key(data_dir, args.out)
    fingerprint = signing.fingerprint(signing.load_public_key(written))
    if args.json:
        out.print_json({"path": str(written), "fingerprint": fingerprint})
    else:
        print(f"wrote the server public key to {written} (fingerprint {fingerprint}); start agents with "
              f"--server-key {written}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, _data_dir: Path) -> int:
    from server.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(full=args.full, broker=args.broker, max_customers=args.max_customers,
                                workdir=args.workdir, measure_mode=args.measure_mode, verbose=args.verbose,
                                keep=args.keep))


COMMANDS = {"serve": cmd_serve, "register": cmd_register, "unregister": cmd_unregister, "deploy": cmd_deploy,
            "rollout": cmd_rollout, "rollouts": cmd_rollouts, "devices": cmd_devices,
            "deployments": cmd_deployments, "cancel": cmd_cancel, "models": cmd_models, "artifacts": cmd_models,
            "logs": cmd_logs, "export-key": cmd_export_key, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code (errors print one line, not a traceback)."""
    from protocol.errors import ProtocolError
    from protocol.mqtt import ConnectError
    from server.deployer import DeployError
    from server.policy import PolicyError
    from server.registry import RegistryError
    from server.rollout import RolloutError

    args = build_parser().parse_args(argv)
    for name, value in _GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    args.broker = args.broker or os.environ.get(ENV_BROKER) or os.environ.get(ENV_BROKER_URL)
    args.database = args.database or os.environ.get(ENV_DATABASE)
    _setup_logging(args)
    data_dir = (args.data_dir or _default_data_dir()).expanduser()
    try:
        return COMMANDS[args.command](args, data_dir)
    except (DeployError, RegistryError, RolloutError, PolicyError, ProtocolError, ConnectError, ValueError) as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
