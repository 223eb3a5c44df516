"""`edgeguide-server`: the operator's command line (serve, register, deploy, list, export the key, demo).

Every subcommand works on the registry in `--data-dir`; this module parses and dispatches, the
commands live in `server.commands` by group (deploying, listing, admin). `deploy` records a deployment that a
running `serve` picks up within a second; with `--broker` it runs the server itself until the
deployment ends, so one command is enough on a machine with no `serve` running. Listings print
a table on a terminal, full untruncated columns when piped, and JSON with `--json`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from protocol.cli_help import HelpFormatter
from protocol.limits import DEFAULT_LIMITS
from protocol.redact import redact_text, redact_url
from server.commands.admin import cmd_demo, cmd_export_key, cmd_register, cmd_unregister
from server.commands.common import DEFAULT_BROKER, EXIT_OK, EXIT_USAGE
from server.commands.common import deployer_config as _deployer_config
from server.commands.common import open_registry as _registry
from server.commands.common import server_config as _server_config
from server.commands.deploying import cmd_cancel, cmd_deploy, cmd_rollout
from server.commands.listing import cmd_deployments, cmd_devices, cmd_logs, cmd_models, cmd_rollouts

_LOGGER = logging.getLogger(__name__)

ENV_DATA_DIR = "EDGEGUIDE_DATA_DIR"
ENV_BROKER = "EDGEGUIDE_BROKER"
ENV_BROKER_URL = "EDGEGUIDE_BROKER_URL"  # the agent's older name, accepted here too
ENV_DATABASE = "EDGEGUIDE_DATABASE"

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



def _default_data_dir() -> Path:
    from server.registry import DEFAULT_DATA_DIR

    return Path(os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR)


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
        prog="edgeguide-server", formatter_class=HelpFormatter, epilog=EXIT_CODES,
        description="EdgeGuide server: registry of compressed recommender artifacts, deployment over MQTT to "
                    "device agents, and the on-device acceptance gate. Versions are written MODEL@VERSION "
                    "(MODEL:VERSION is accepted too).")
    parser.add_argument("--version", action="version", version=f"edgeguide-server {_version()}")
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, description: str | None = None,
                aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=description or help_text, aliases=list(aliases),
                           formatter_class=HelpFormatter, epilog=EXIT_CODES)
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

    p = command("rollouts", "list rollouts with their stage and per-device outcomes (`rollouts abort ID` stops one)")
    rsub = p.add_subparsers(dest="rollouts_action", metavar="ACTION", help="abort ID: stop a running rollout")
    q = rsub.add_parser("abort", help="stop a running rollout and roll its current stage back",
                        description="Stop a running rollout: no later stage starts, devices of the current stage "
                                    "not started yet are skipped, its deployments in progress are cancelled and "
                                    "its promoted devices told to roll back. The running `serve` sends the signed "
                                    "cancel and rollback commands on its next tick.",
                        formatter_class=HelpFormatter, epilog=EXIT_CODES)
    _global_options(q)
    q.add_argument("rollout_id", metavar="ID", help="rollout id (see `rollouts`)")
    q.add_argument("--reason", default="aborted by an operator from the command line",
                   help="why: kept in the rollout's reason and the event log")

    p = command("devices", "list devices the server has heard from (`devices remove ID` forgets one)")
    dsub = p.add_subparsers(dest="devices_action", metavar="ACTION", help="remove ID: forget a device")
    q = dsub.add_parser("remove", help="forget a device (refused while a deployment to it runs)",
                        description="Forget a device: it leaves the listings and rollouts. Its deployments and "
                                    "events stay. If its agent still runs, it reappears at its next state message.",
                        formatter_class=HelpFormatter, epilog=EXIT_CODES)
    _global_options(q)
    q.add_argument("device_id", metavar="ID", help="device id")

    p = command("deployments", "list deployments, newest first (`deployments show ID` for one)")
    p.add_argument("--device", help="only this device")
    p.add_argument("--active", action="store_true", help="only deployments still in progress")
    p.add_argument("--limit", type=int, default=50, help="at most this many rows")
    dsub = p.add_subparsers(dest="deployments_action", metavar="ACTION", help="show ID: one deployment in full")
    q = dsub.add_parser("show", help="one deployment: status, reason, gate checks, report folder, events",
                        description="Everything recorded about one deployment.", formatter_class=HelpFormatter,
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
