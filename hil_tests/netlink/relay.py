"""A delay-line TCP relay: per-direction queues released after the link's one-way delay.

    python -m hil_tests.netlink.relay --netns NS --listen HOST:PORT --target HOST:PORT \
        --profile-json '{...}' --stats FILE

The listening socket is created inside network namespace NS (setns around socket creation), so
the device side reaches it only through the namespace's veth; connections to the target (the
broker on loopback) are made from the namespace the relay was started in. Rate is not shaped
here (tbf on the veth does that); this adds what the kernel's missing netem would: delay with
jitter (order kept, as TCP keeps it), link-wide stalls, and one cut (every connection aborted,
new ones refused for `cut_s`). SIGUSR1 starts a cut at once; SIGTERM writes the stats and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import random
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hil_tests.netlink.profiles import LinkProfile

_LOGGER = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
READ_BYTES = 16 * 1024


def listen_in_netns(netns: str | None, host: str, port: int) -> socket.socket:
    """A listening TCP socket bound inside `netns` (None: the current namespace)."""
    if netns is None:
        return _listen(host, port)
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/ns/net", "rb") as own, open(f"/var/run/netns/{netns}", "rb") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {netns!r} failed (root needed)")
        try:
            return _listen(host, port)
        finally:
            if libc.setns(own.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back into the relay's own network namespace failed")


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class LinkState:
    """What all connections through the link share: stalls, the cut, byte counts."""

    def __init__(self, profile: LinkProfile, manual_cut_s: float | None = None) -> None:
        self.profile = profile
        self.manual_cut_s = manual_cut_s
        self.rng = random.Random(profile.seed)
        self.stall_until = 0.0
        self.cut_until = 0.0
        self.cut_done = False
        self.pipes: set[Pipe] = set()
        self.stats: dict[str, Any] = {"connections": 0, "refused_during_cut": 0, "stalls": 0, "bytes_down": 0,
                                      "bytes_up": 0, "cuts": [], "aborted_by_cut": 0}

    def one_way_delay(self) -> float:
        base = self.profile.rtt_ms / 2000.0
        jitter = self.profile.jitter_ms / 2000.0
        return max(0.0, base + self.rng.uniform(-jitter, jitter))

    @property
    def cutting(self) -> bool:
        return time.monotonic() < self.cut_until

    def cut(self, why: str) -> None:
        """Drop every connection now and refuse new ones for `cut_s` (SIGUSR1: --manual-cut-s, default 30 s)."""
        manual = why == "SIGUSR1" and self.manual_cut_s is not None
        seconds = self.manual_cut_s if manual else (self.profile.cut_s or 30.0)
        self.cut_done = True
        self.cut_until = time.monotonic() + seconds
        self.stats["cuts"].append({"at": time.time(), "seconds": seconds, "why": why,
                                   "connections": len(self.pipes)})
        _LOGGER.warning("link cut for %.1f s (%s): aborting %d connections", seconds, why, len(self.pipes))
        for pipe in list(self.pipes):
            self.stats["aborted_by_cut"] += 1
            pipe.abort()

    def sent_down(self, n: int) -> None:
        self.stats["bytes_down"] += n
        p = self.profile
        if p.has_cut and not self.cut_done and self.stats["bytes_down"] >= p.cut_after_bytes:
            self.cut(f"after {self.stats['bytes_down']} bytes down")

    async def stall_loop(self) -> None:
        p = self.profile
        if p.stall_every_s <= 0:
            return
        while True:
            await asyncio.sleep(self.rng.expovariate(1.0 / p.stall_every_s))
            self.stall_until = time.monotonic() + p.stall_ms / 1000.0
            self.stats["stalls"] += 1


class Pipe:
    """One relayed connection: two delay lines, device <-> target."""

    def __init__(self, link: LinkState, dev: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 up: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.link = link
        self.dev = dev
        self.up = up
        self.tasks: list[asyncio.Task] = []

    async def run(self) -> None:
        down_q: asyncio.Queue = asyncio.Queue()
        up_q: asyncio.Queue = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._read(self.up[0], down_q)),
                      asyncio.create_task(self._send(down_q, self.dev[1], down=True)),
                      asyncio.create_task(self._read(self.dev[0], up_q)),
                      asyncio.create_task(self._send(up_q, self.up[1], down=False))]
        self.link.pipes.add(self)
        try:
            await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.link.pipes.discard(self)
            self.abort()

    async def _read(self, reader: asyncio.StreamReader, queue: asyncio.Queue) -> None:
        last = 0.0
        while True:
            data = await reader.read(READ_BYTES)
            # Released in order: a later piece never overtakes an earlier one (TCP keeps order).
            release = max(last, time.monotonic() + self.link.one_way_delay())
            last = release
            await queue.put((release, data))
            if not data:
                # EOF travels the delay line too, then the sender closes its side.
                await asyncio.sleep(max(0.0, release - time.monotonic()) + 5.0)
                return

    async def _send(self, queue: asyncio.Queue, writer: asyncio.StreamWriter, *, down: bool) -> None:
        link = self.link
        while True:
            release, data = await queue.get()
            while True:
                due = max(release, link.stall_until)
                wait = due - time.monotonic()
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            if down:
                link.sent_down(len(data))
            else:
                link.stats["bytes_up"] += len(data)

    def abort(self) -> None:
        for task in self.tasks:
            task.cancel()
        for _reader, writer in (self.dev, self.up):
            writer.transport.abort()


async def serve(sock: socket.socket, target: tuple[str, int], link: LinkState, ready: Path | None,
                stats_path: Path | None) -> None:
    """Relay until SIGTERM; the stats go to `stats_path` on the way out."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: link.cut("SIGUSR1"))

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if link.cutting:
            link.stats["refused_during_cut"] += 1
            writer.transport.abort()
            return
        try:
            up = await asyncio.open_connection(*target)
        except OSError as exc:
            _LOGGER.warning("target %s:%d unreachable: %s", *target, exc)
            writer.transport.abort()
            return
        for w in (writer, up[1]):
            with contextlib.suppress(OSError):
                w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.stats["connections"] += 1
        await Pipe(link, (reader, writer), up).run()

    server = await asyncio.start_server(on_client, sock=sock)
    staller = asyncio.create_task(link.stall_loop())
    if ready is not None:
        ready.write_text(json.dumps({"pid": __import__("os").getpid()}))
    await stop.wait()
    staller.cancel()
    server.close()
    for pipe in list(link.pipes):
        pipe.abort()
    if stats_path is not None:
        stats_path.write_text(json.dumps(link.stats, indent=1))


def _hostport(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--netns", help="network namespace to listen in (default: this one)")
    parser.add_argument("--listen", type=_hostport, required=True)
    parser.add_argument("--target", type=_hostport, required=True)
    parser.add_argument("--profile-json", required=True, help="a LinkProfile as JSON")
    parser.add_argument("--ready", type=Path, help="written once the relay accepts connections")
    parser.add_argument("--stats", type=Path, help="JSON stats written on SIGTERM")
    parser.add_argument("--manual-cut-s", type=float, help="length of a cut started by SIGUSR1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay %(message)s", stream=sys.stderr)
    profile = LinkProfile(**json.loads(args.profile_json))
    sock = listen_in_netns(args.netns, *args.listen)  # before any thread exists: setns is per thread
    asyncio.run(serve(sock, args.target, LinkState(profile, args.manual_cut_s), args.ready, args.stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
