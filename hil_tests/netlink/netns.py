"""Build an emulated device link and always tear it down: two namespaces, a veth pair, tbf, the relay.

    with EmulatedLink(profile, broker_port) as link:
        subprocess.Popen([*link.device_prefix, "python", "-m", "agent", "--broker", link.device_url, ...])

Layout (all names carry a random tag, so parallel runs and leftovers never collide):
    ns eg-<tag>-c : veth end 10.<a>.<b>.1/30, tbf (rate down), the relay's listening socket
    ns eg-<tag>-d : veth end 10.<a>.<b>.2/30, tbf (rate up), the device's processes
The relay process itself runs in the caller's namespace and forwards to the broker on loopback, so
the only addresses added live inside the two namespaces created here. Needs root.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hil_tests.netlink.profiles import LinkProfile

_LOGGER = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RELAY_PORT = 18830
# A /30 per link inside 10.231.0.0/16; checked against the addresses this machine already has.
POOL = ipaddress.ip_network("10.231.0.0/16")


class LinkError(RuntimeError):
    """The emulated link could not be built; the message names the command and its output."""


def available() -> str | None:
    """None when this machine can build links, else why not (the caller skips or fails with it)."""
    if os.geteuid() != 0:
        return "emulated links need root (ip netns, tc)"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True, check=False).returncode != 0:
            return f"{tool} is not installed (iproute2)"
    return None


def _run(*cmd: str) -> str:
    result = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LinkError(f"{' '.join(cmd)} failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _free_subnet() -> ipaddress.IPv4Network:
    used = _run("ip", "-o", "-4", "addr")
    for _ in range(100):
        net = list(POOL.subnets(new_prefix=30))[secrets.randbelow(2 ** 14)]
        if str(net.network_address)[:-1] not in used:
            return net
    raise LinkError(f"no free /30 in {POOL}")


def tbf_args(rate_mbit: float) -> list[str]:
    """tbf for `rate_mbit`: a burst of >= 2 MTU (and a timer tick's worth), 100 ms of queue."""
    rate_bps = rate_mbit * 1e6 / 8
    burst = max(4 * 1514, int(rate_bps / 250))
    limit = max(3 * 1514, int(rate_bps * 0.1)) + burst
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "limit", str(limit)]


class EmulatedLink:
    """A device-side namespace reaching the broker at `broker_port` through one emulated link."""

    def __init__(self, profile: LinkProfile, broker_port: int, *, workdir: Path,
                 broker_host: str = "127.0.0.1") -> None:
        self.profile = profile
        self.broker = (broker_host, broker_port)
        self.workdir = Path(workdir)
        self.tag = secrets.token_hex(3)
        self.core_ns = f"eg-{self.tag}-c"
        self.dev_ns = f"eg-{self.tag}-d"
        self.core_if = f"eg{self.tag}c"
        self.dev_if = f"eg{self.tag}d"
        self.subnet: ipaddress.IPv4Network | None = None
        self.relay: subprocess.Popen | None = None
        self.stats_path = self.workdir / f"relay-{self.tag}.json"
        self.log_path = self.workdir / f"relay-{self.tag}.log"
        self.stats: dict[str, Any] = {}

    # -- addresses ---------------------------------------------------------------------------
    @property
    def core_addr(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    @property
    def dev_addr(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 2)

    @property
    def device_url(self) -> str:
        """The broker as the device sees it: the relay's address in the link's core namespace."""
        return f"mqtt://{self.core_addr}:{RELAY_PORT}"

    @property
    def device_prefix(self) -> list[str]:
        """Prepend to a command to run it in the device namespace."""
        return ["ip", "netns", "exec", self.dev_ns]

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> EmulatedLink:
        why = available()
        if why:
            raise LinkError(why)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._build()
            self._start_relay()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        self.subnet = _free_subnet()
        _run("ip", "netns", "add", self.core_ns)
        _run("ip", "netns", "add", self.dev_ns)
        _run("ip", "link", "add", self.core_if, "netns", self.core_ns, "type", "veth", "peer", "name", self.dev_if,
             "netns", self.dev_ns)
        ends = ((self.core_ns, self.core_if, self.core_addr), (self.dev_ns, self.dev_if, self.dev_addr))
        for ns, ifname, addr in ends:
            _run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", ifname)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", ifname, "up")
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ifname, "root",
                 *tbf_args(self.profile.rate_mbit))
        _LOGGER.info("link %s built: %s (%s) <-> %s (%s), %.1f Mbit/s each way", self.profile.name, self.core_ns,
                     self.core_addr, self.dev_ns, self.dev_addr, self.profile.rate_mbit)

    def _start_relay(self) -> None:
        ready = self.workdir / f"relay-{self.tag}.ready"
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "hil_tests.netlink.relay", "--netns", self.core_ns,
               "--listen", f"{self.core_addr}:{RELAY_PORT}", "--target", f"{self.broker[0]}:{self.broker[1]}",
               "--profile-json", json.dumps(self.profile.to_dict()), "--ready", str(ready),
               "--stats", str(self.stats_path)]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(self.log_path, "ab") as log:
            self.relay = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=log,
                                          stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.relay.poll() is not None or time.monotonic() > deadline:
                raise LinkError(f"the link relay did not start (exit {self.relay.poll()}): "
                                f"{self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def cut_now(self) -> None:
        """Start the profile's cut at once (SIGUSR1 to the relay)."""
        if self.relay is None or self.relay.poll() is not None:
            raise LinkError("the link relay is not running")
        self.relay.send_signal(signal.SIGUSR1)

    def close(self) -> None:
        """Stop the relay (collecting its stats) and delete both namespaces; safe to call twice."""
        relay, self.relay = self.relay, None
        if relay is not None:
            if relay.poll() is None:
                relay.terminate()
                try:
                    relay.wait(10)
                except subprocess.TimeoutExpired:
                    relay.kill()
                    relay.wait(5)
            with contextlib.suppress(OSError, ValueError):
                self.stats = json.loads(self.stats_path.read_text())
        for ns in (self.dev_ns, self.core_ns):  # deleting a namespace deletes its veth end (and the pair)
            result = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, check=False)
            if result.returncode != 0 and "No such file" not in result.stderr:
                _LOGGER.warning("could not delete namespace %s: %s", ns, result.stderr.strip())

    def device_popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start `cmd` inside the device namespace."""
        return subprocess.Popen([*self.device_prefix, *cmd], **kwargs)
