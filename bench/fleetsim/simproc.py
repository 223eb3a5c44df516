"""One simulator process: thousands of device sessions on a single asyncio event loop.

Driven by its parent through two multiprocessing queues: it answers ("ready", connected) once
every device is connected and subscribed, then runs commands: ("report", {device: (deployment,
model, version, size)}) publishes one report per device and answers with the publish times;
("stats", None) answers with its counters; ("stop", None) disconnects every device cleanly and
answers with its counters and peak RSS.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_public_key

from bench.fleetsim.device import Counters, SimDevice, report_dict
from protocol.messages import Report
from protocol.topics import Topics

_LOGGER = logging.getLogger(__name__)
CONNECT_CONCURRENCY = 100  # handshakes in progress at once (a broker's listen backlog is finite)


def main(devices: list[tuple[str, str, int]], prefix: str, server_key_pem: bytes, commands: Any, answers: Any,
         heartbeat_s: float = 0.0) -> None:
    """Process entry point (spawned): raise the descriptor limit, then run the loop."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s sim %(message)s")
    asyncio.run(_run(devices, prefix, server_key_pem, commands, answers, heartbeat_s))


async def _run(devices: list[tuple[str, str, int]], prefix: str, server_key_pem: bytes, commands: Any,
               answers: Any, heartbeat_s: float = 0.0) -> None:
    key = load_pem_public_key(server_key_pem)
    topics = Topics(prefix)
    counters = Counters()
    sims = [SimDevice(d, host, port, topics, key, counters) for d, host, port in devices]
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def start(sim: SimDevice) -> bool:
        async with gate:
            try:
                await sim.start()
                return True
            except Exception as exc:  # counted: the parent reports how many connected
                _LOGGER.warning("%s did not connect: %s", sim.device_id, exc)
                return False

    connected = sum(await asyncio.gather(*(start(s) for s in sims)))
    answers.put(("ready", connected))
    pinger = asyncio.create_task(_keepalive(sims))
    beats = asyncio.create_task(_heartbeats(sims, heartbeat_s, counters)) if heartbeat_s > 0 else None
    loop = asyncio.get_running_loop()
    by_id = {s.device_id: s for s in sims}
    while True:
        kind, arg = await loop.run_in_executor(None, commands.get)
        if kind == "report":
            counters.report_ts.clear()
            await asyncio.gather(*(by_id[d].send_report(Report.from_dict({**report_dict(d, *spec), "ts": time.time()}))
                                   for d, spec in arg.items()))
            answers.put(("reported", dict(counters.report_ts)))
        elif kind == "stats":
            answers.put(("stats", _stats(counters, sims)))
        elif kind == "stop":
            pinger.cancel()
            if beats is not None:
                beats.cancel()
            await asyncio.gather(*(s.stop() for s in sims), return_exceptions=True)
            answers.put(("stopped", _stats(counters, sims)))
            return


def _stats(counters: Counters, sims: list[SimDevice]) -> dict[str, Any]:
    out = counters.to_dict()
    out.pop("report_ts")
    out["connected"] = sum(s.client.connected for s in sims)
    out["reconnects"] = sum(s.client.reconnects for s in sims)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["active_versions"] = {}
    for s in sims:
        key = str(s.active[1]) if s.active else "none"
        out["active_versions"][key] = out["active_versions"].get(key, 0) + 1
    return out


async def _keepalive(sims: list[SimDevice]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(15)
        now = loop.time()
        for s in sims:
            s.client.ping_if_idle(now)


async def _heartbeats(sims: list[SimDevice], every_s: float, counters: Counters) -> None:
    """Each device's heartbeat once per `every_s`, as the agent sends them (QoS 1), spread evenly over
    the period (an agent's phase is its start time; a fleet's starts are spread)."""
    step_s = 0.1
    per_step = max(1, round(len(sims) * step_s / every_s))
    started = time.monotonic()
    while True:
        for first in range(0, len(sims), per_step):
            await asyncio.gather(*(s.send_heartbeat(time.monotonic() - started) for s in sims[first:first + per_step]),
                                 return_exceptions=True)
            counters.heartbeats += len(sims[first:first + per_step])
            await asyncio.sleep(step_s)
