"""Run a real device agent (`python -m agent`) as a child process on this machine.

The demo and the whole-loop tests need a device next to the server: this starts the agent with
its own state dir, the server's public key and a free HTTP port, waits until it is connected and
serving, and always stops it (SIGTERM, then SIGKILL). The agent's log is kept for error messages.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

_LOGGER = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


class AgentProcessError(RuntimeError):
    """The agent did not start, died, or its HTTP API answered with an error."""


def read_log_tail(path: Path, chars: int = 3000) -> str:
    """The end of an agent's log file, for error messages."""
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no agent log)"


def wait_until_ready(proc: subprocess.Popen, ready_file: Path, timeout: float, who: str, log_path: Path) -> dict:
    """Block until the agent process writes its `--once-ready-file`; return that file's JSON.

    Raises AgentProcessError (with the log tail) if the process exits first or `timeout` passes;
    the caller stops what is left of the process.
    """
    deadline = time.monotonic() + timeout
    while not ready_file.exists():
        if proc.poll() is not None:
            raise AgentProcessError(f"agent {who} exited with code {proc.returncode} before it was ready; "
                                    f"log {log_path}:\n{read_log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise AgentProcessError(f"agent {who} not ready after {timeout:.0f} s; "
                                    f"log {log_path}:\n{read_log_tail(log_path)}")
        time.sleep(0.05)
    return json.loads(ready_file.read_text())


def stop_process(proc: subprocess.Popen | None, timeout: float, who: str) -> int | None:
    """SIGTERM (an agent then publishes its offline state), SIGKILL after `timeout`; returns the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _LOGGER.warning("agent %s (pid %d) ignored SIGTERM for %.0f s; killing it", who, proc.pid, timeout)
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


class LocalAgent:
    """One agent child process; `start()` returns once it is connected to the broker and serving.

    Pass `mqtt_protocol="3.1.1"` when the broker is the embedded amqtt one (server.demo knows).
    """

    def __init__(self, device_id: str, broker_url: str, state_dir: Path, server_key: Path, *,
                 topic_prefix: str = "edgeguide", measure_mode: str = "quick", extra_args: list[str] | None = None,
                 log_path: Path | None = None, mqtt_protocol: str = "auto") -> None:
        self.device_id = device_id
        self.broker_url = broker_url
        self.state_dir = Path(state_dir)
        self.server_key = Path(server_key)
        self.topic_prefix = topic_prefix
        self.measure_mode = measure_mode
        self.extra_args = list(extra_args or [])
        # "3.1.1" for the embedded amqtt broker, which never answers an MQTT 5 CONNECT ("auto" would
        # wait 5 s for it first); the launcher cannot tell the broker kind from its URL, the caller can.
        self.mqtt_protocol = mqtt_protocol
        self.log_path = Path(log_path) if log_path else self.state_dir.with_name(self.state_dir.name + ".log")
        self.ready_file = self.state_dir.with_name(self.state_dir.name + ".ready.json")
        self.proc: subprocess.Popen | None = None
        self.http_port: int | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "agent", "--device-id", self.device_id, "--broker", self.broker_url,
                "--state-dir", str(self.state_dir), "--server-key", str(self.server_key), "--http-port", "0",
                "--topic-prefix", self.topic_prefix, "--measure-mode", self.measure_mode,
                "--once-ready-file", str(self.ready_file), "--mqtt-protocol", self.mqtt_protocol, *self.extra_args]

    def start(self, timeout: float = 60.0) -> LocalAgent:
        if self.proc is not None:
            raise AgentProcessError(f"agent {self.device_id} already running (pid {self.proc.pid})")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=str(REPO), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        try:
            ready = wait_until_ready(self.proc, self.ready_file, timeout, self.device_id, self.log_path)
        except AgentProcessError:
            self.stop()
            raise
        self.http_port = int(ready["http_port"])
        _LOGGER.info("agent %s running (pid %d, http port %d)", self.device_id, self.proc.pid, self.http_port)
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (the agent publishes its offline state), SIGKILL after `timeout`; returns the exit code."""
        proc, self.proc = self.proc, None
        return stop_process(proc, timeout, self.device_id)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return read_log_tail(self.log_path, chars)

    def _http(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> dict:
        if self.http_port is None:
            raise AgentProcessError(f"agent {self.device_id} has no HTTP port (not started?)")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise AgentProcessError(f"agent {self.device_id} {method} {path} -> HTTP {exc.code}: "
                                    f"{exc.read()[:500]!r}") from exc

    def recommend(self, history: list[str], k: int = 10) -> dict:
        """POST /recommend on the agent's HTTP API."""
        return self._http("POST", "/recommend", {"history": history, "k": k})

    def model(self) -> dict:
        """GET /model: which model the agent is serving."""
        return self._http("GET", "/model")

    def __enter__(self) -> LocalAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
