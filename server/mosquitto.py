"""Run a real mosquitto broker as a child process on a free loopback port.

Used by the tests, the benchmarks and the HIL rig; production points at an existing broker.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


class MosquittoNotFound(RuntimeError):
    """mosquitto is not installed."""

    def __init__(self) -> None:
        super().__init__("mosquitto not found on PATH or in /usr/sbin: apt-get install -y mosquitto mosquitto-clients")


def mosquitto_binary() -> str:
    """Path of the mosquitto executable (Debian installs it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise MosquittoNotFound()
    return found


@dataclass
class MosquittoBroker:
    """A mosquitto child process; `extra_conf` lines are appended to the generated config."""

    port: int = 0
    extra_conf: list[str] = field(default_factory=list)
    workdir: Path | None = None
    host: str = "127.0.0.1"
    persistence: bool = True
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> MosquittoBroker:
        if not self.port:
            self.port = free_port()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="edgeguide-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true" if not any("password_file" in x for x in self.extra_conf) else "",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "max_queued_messages 100000",
            "max_inflight_messages 0",
            # as in deploy/mosquitto/mosquitto.conf: without it every small message after a large one
            # waits for a delayed TCP ACK (~40 ms), which dominates a deployment's round trips
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            # As root mosquitto drops to user `mosquitto`, which cannot write its persistence file in our
            # root-owned work dir; staying root keeps sessions and queued messages across restart().
            "user root" if os.geteuid() == 0 and not any(x.startswith("user ") for x in self.extra_conf) else "",
            *self.extra_conf,
        ]
        conf.write_text("\n".join(x for x in lines if x) + "\n")
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=log)
        try:
            wait_port(self.host, self.port)
        except TimeoutError as exc:
            self.stop()
            tail = (self.workdir / "mosquitto.log").read_text()[-2000:]
            raise RuntimeError(f"mosquitto did not start: {tail}") from exc
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        """Stop and start on the same port and persistence file (a broker restart mid-transfer)."""
        self.stop()
        self.start()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
