"""A pure-Python MQTT 3.1.1 broker (amqtt) in a child process, for the single-machine demo.

Used when no `--broker` is given, so the demo needs nothing installed beyond the Python packages.
A child process (not a thread) keeps amqtt's asyncio loop off the server's GIL and can always be
killed; it exits by itself when its parent dies (it watches its parent pid). Production uses
mosquitto: amqtt relays ~40 MiB/s here against mosquitto's ~190 MiB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from server.mosquitto import free_port, wait_port

_LOGGER = logging.getLogger(__name__)


class EmbeddedBroker:
    """amqtt broker child process on a free loopback port; use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_path: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        if self.proc is not None:
            raise RuntimeError(f"embedded broker already running on {self.url} (pid {self.proc.pid})")
        self.port = self.port or free_port()
        if self.log_path is None:
            self.log_path = Path(tempfile.mkdtemp(prefix="edgeguide-amqtt-")) / "amqtt.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.embedded_broker", "--host", self.host, "--port", str(self.port),
                 "--parent-pid", str(os.getpid())],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                cwd=str(Path(__file__).resolve().parents[1]))
        finally:
            log.close()
        try:
            wait_port(self.host, self.port, timeout=timeout)
        except TimeoutError as exc:
            code = self.proc.poll()
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"amqtt broker did not listen on {self.url} within {timeout:.0f} s "
                               f"(exit code {code}); log {self.log_path}:\n{tail}") from exc
        _LOGGER.info("embedded amqtt broker on %s (pid %d, log %s)", self.url, self.proc.pid, self.log_path)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the child, killing it if it does not exit in `timeout` seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _LOGGER.warning("amqtt broker pid %d ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def broker_config(host: str, port: int) -> dict:
    """amqtt configuration: one loopback TCP listener, anonymous access, no $SYS or packet logging."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def _serve(host: str, port: int, parent_pid: int | None) -> None:
    from amqtt.broker import Broker

    broker = Broker(broker_config(host, port))
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                _LOGGER.warning("parent %d is gone; stopping the broker", parent_pid)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
    finally:
        await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: run amqtt until SIGTERM/SIGINT or until the parent exits."""
    parser = argparse.ArgumentParser(description="Run the embedded amqtt MQTT 3.1.1 broker (demo only).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args.host, args.port, args.parent_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
