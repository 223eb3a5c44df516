"""`edgeguide-agent`: run the device agent, or check its configuration.

Exit codes (also in `--help`): 0 clean stop / valid config, 2 invalid configuration, 1 failure at
start-up (e.g. the HTTP port is in use: supervisors retry, the port may free up), 3 fatal error while
running (e.g. the network machinery could not start a thread): the process exits so its supervisor
(systemd Restart=on-failure, the Termux loop) starts a fresh one.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import ENV_PREFIX, AgentConfig, ConfigError, load_config
from protocol.files import atomic_write_json

if TYPE_CHECKING:  # the daemon's imports (numpy, paho, the runtime) load only when it runs
    from agent.daemon import Agent

_LOGGER = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
# Modules whose presence in the agent process means TensorFlow was pulled in somewhere.
HEAVY_MODULES = ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization")
EXIT_FATAL = 3
# After a fatal error the graceful stop gets this long; then SIGALRM's default action ends the
# process (no thread needed: starting threads may be exactly what is failing).
FATAL_STOP_S = 20


EXIT_CODES = """exit codes:
  0  clean stop (SIGTERM/Ctrl-C), or --check-config found the configuration valid
  1  failure at start-up, e.g. the HTTP port is in use (one line on stderr; supervisors retry)
  2  invalid configuration (supervisors do not retry: fix it first)
  3  fatal error while running: exits so its supervisor starts a fresh agent"""


def build_parser() -> argparse.ArgumentParser:
    from agent import __version__

    p = argparse.ArgumentParser(
        prog="edgeguide-agent", epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="EdgeGuide device agent: receives signed models over MQTT, measures them on this device, "
                    "reports to the server and serves recommendations on a local HTTP port. Every option can also "
                    f"be set in the TOML file (--config) or as an environment variable {ENV_PREFIX}<OPTION> "
                    f"(e.g. {ENV_PREFIX}DEVICE_ID; the broker is {ENV_PREFIX}BROKER or {ENV_PREFIX}BROKER_URL); "
                    "precedence: option > env > file > default.",
    )
    p.add_argument("--version", action="version", version=f"edgeguide-agent {__version__}")
    p.add_argument("--config", type=Path, help="TOML file with the settings (top level or an [agent] table)")
    p.add_argument("--device-id", help="this device's id, e.g. pi5-kitchen (letters, digits, _ and -)")
    p.add_argument("--broker", "--broker-url", dest="broker_url",
                   help="broker URL, mqtt://HOST:PORT or mqtts://HOST:PORT (default mqtt://127.0.0.1:1883; "
                        "config key broker or broker_url)")
    p.add_argument("--state-dir", type=Path, help="directory for model slots, downloads and the report outbox")
    p.add_argument("--server-key", type=Path, help="the server's Ed25519 public key (PEM) pinned by this device; "
                   "manifests, verdicts and commands signed by any other key are refused")
    p.add_argument("--username", help="MQTT user name (usually the device id)")
    p.add_argument("--password", help=f"MQTT password (prefer {ENV_PREFIX}PASSWORD: options show up in ps)")
    p.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) to verify an mqtts:// broker")
    p.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", type=Path, help="private key (PEM) of --tls-cert")
    p.add_argument("--topic-prefix", help="MQTT topic prefix (default edgeguide)")
    p.add_argument("--http-host", help="address the recommendation API listens on (default 127.0.0.1)")
    p.add_argument("--http-allowed-hosts", help="comma-separated host names the API also answers to (e.g. "
                                                "pi-01.local for a LAN bind); other names get 421")
    p.add_argument("--http-port", help="port of the recommendation API (default 8700, 0 = any free port, "
                   "none = no HTTP server)")
    p.add_argument("--threads", type=int, help="interpreter threads for serving and measuring (default 1)")
    p.add_argument("--quota-bytes", type=int, help="largest packed model this device accepts (default 64 MiB)")
    p.add_argument("--measure-mode", choices=("quick", "full"),
                   help="full (default: >= 1024 runs and 60 s, MLPerf rules, what a real device needs) or quick "
                        "(seconds; only for tests and demos)")
    p.add_argument("--verdict-timeout-s", type=float, help="how long a measured candidate waits for the server's "
                   "verdict before it is discarded (default 600)")
    p.add_argument("--heartbeat-s", type=float, help="seconds between heartbeats (default 30)")
    p.add_argument("--chunk-stall-s", type=float, help="seconds without a new chunk before missing chunks are "
                   "requested again (default 15)")
    p.add_argument("--outbox-max-bytes", type=int, help="bound of the on-disk queue of unsent reports (default 4 MiB)")
    p.add_argument("--mqtt-protocol", choices=("auto", "5", "3.1.1"),
                   help="MQTT version: auto (default) tries 5 for up to 5 s then 3.1.1; set 3.1.1 for a broker "
                        "that only speaks it (amqtt, the demo's embedded broker, never answers an MQTT 5 CONNECT)")
    p.add_argument("--report-resend-s", type=float, help="seconds between re-sends of a report still waiting for its "
                   "verdict (default 30; it is also re-sent on every reconnect)")
    p.add_argument("--runtime", help="force the interpreter: ai-edge-litert, tflite-runtime or tensorflow "
                   "(default: the first installed, in that order)")
    p.add_argument("--check-config", action="store_true",
                   help="print the effective configuration (password masked) and the runtime, then exit "
                        "0 if valid or 2 if not")
    p.add_argument("--once-ready-file", type=Path, help="write a JSON file (pid, http_port) once the agent is "
                   "connected and serving; for supervisors and tests")
    p.add_argument("--debug-modules-file", type=Path, help="at exit, write the names of all imported Python "
                   "modules to this file (used to prove TensorFlow is never loaded)")
    p.add_argument("--log-level", default=os.environ.get(ENV_PREFIX + "LOG_LEVEL"), type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help=f"set the log level outright (default INFO, or env {ENV_PREFIX}LOG_LEVEL)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v or -vv: debug logging (the agent logs INFO by default)")
    return p


_OVERRIDES = ("device_id", "broker_url", "state_dir", "server_key", "username", "password", "tls_ca", "tls_cert",
              "tls_key", "topic_prefix", "http_host", "http_allowed_hosts", "http_port", "threads", "quota_bytes",
              "measure_mode", "verdict_timeout_s", "heartbeat_s", "chunk_stall_s", "outbox_max_bytes", "runtime",
              "mqtt_protocol", "report_resend_s")


def heavy_modules_loaded() -> list[str]:
    """Names of TensorFlow-family modules in this process (must stay empty in the agent)."""
    return sorted(m for m in sys.modules if m.split(".")[0] in HEAVY_MODULES)


def _check_config(config_dict: dict[str, Any]) -> int:
    # Import everything the running daemon imports, so heavy_modules proves the agent is TF-free.
    from agent import daemon, measure, serving  # noqa: F401
    from agent.runtime import ModelLoadError, detect_runtime
    from agent.serving import http  # noqa: F401
    try:
        runtime = detect_runtime(config_dict.get("runtime")).to_dict()
    except ModelLoadError as exc:
        print(json.dumps({"config": config_dict, "runtime_error": str(exc)}, indent=2))
        return 2
    print(json.dumps({"config": config_dict, "runtime": runtime, "heavy_modules": heavy_modules_loaded()}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or ("DEBUG" if args.verbose else "INFO")
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    overrides = {name: getattr(args, name) for name in _OVERRIDES}  # "none" for http_port disables HTTP
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.check_config:
        return _check_config(config.to_dict())
    try:
        return _run(config, args)
    finally:
        if args.debug_modules_file:
            args.debug_modules_file.write_text("\n".join(sorted(sys.modules)) + "\n")


def _run(config: AgentConfig, args: argparse.Namespace) -> int:
    from agent.daemon import Agent

    agent = Agent(config)
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        _LOGGER.info("signal_received signal=%s", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
        if args.once_ready_file:
            threading.Thread(target=_write_ready_file, args=(agent, args.once_ready_file, stop_requested),
                             name="edgeguide-ready", daemon=True).start()
        while not stop_requested.wait(0.5):
            if agent.fatal_error is not None:
                break
    except OSError as exc:
        agent.stop()
        if exc.errno != errno.EADDRINUSE:
            _LOGGER.exception("agent_failed")
            return 1
        print(f"error: {exc}: another process uses that port; pick another with --http-port PORT (0 = any free "
              "port, none = no HTTP server)", file=sys.stderr)
        return 1  # not a configuration error: the port may free up, so a supervisor retries
    except Exception:
        _LOGGER.exception("agent_failed")
        agent.stop()
        return 1
    if agent.fatal_error is not None:
        return _exit_fatal(agent)
    agent.stop()
    return 0


def _exit_fatal(agent: Agent) -> int:
    """Stop what can be stopped, then exit non-zero so the supervisor restarts the agent."""
    signal.alarm(FATAL_STOP_S)
    try:
        agent.stop()
    except Exception:
        _LOGGER.exception("stop_after_fatal_failed")
    _LOGGER.error("agent_exiting code=%d reason=%s", EXIT_FATAL, agent.fatal_error)
    return EXIT_FATAL


def _write_ready_file(agent: Agent, path: Path, stop: threading.Event) -> None:
    while not stop.is_set():
        if agent.ready.wait(0.5):
            atomic_write_json(path, {"pid": os.getpid(), "http_port": agent.http_port,
                                     "device_id": agent.device_id}, indent=None, sort_keys=False)
            return


if __name__ == "__main__":
    raise SystemExit(main())
