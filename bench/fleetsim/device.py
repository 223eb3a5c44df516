"""The device side of the EdgeGuide protocol for one simulated device (no model is run).

Each device is its own MQTT identity (`agent-<id>`) with a persistent session and a Last Will,
publishes its retained state, verifies every signed manifest and verdict with the server's key,
and answers as a real agent does: manifest_accepted, download_complete, a report (the figures of a
quick-mode run), then promoted (or rolled_back) and its new retained state. Devices are
pre-staged: they answer the manifest with no missing chunk (as if the bytes came from a cache),
so this measures the control plane; bench/transfer.py measures the bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.link import REPORT_RESEND_MAX_FACTOR
from bench.fleetsim.mqtt5 import Client, Will
from protocol.backoff import Backoff
from protocol.errors import ProtocolError, SignatureError
from protocol.messages import DeviceState, Event, Heartbeat, Manifest, Report, Verdict
from protocol.topics import Topics

_LOGGER = logging.getLogger(__name__)
RUNTIME = {"name": "ai-edge-litert", "version": "2.3.0"}
REPORT_RESEND_S = 20.0  # the first wait; then doubling up to REPORT_RESEND_MAX_FACTOR times it


def report_dict(device_id: str, deployment_id: str, model_id: str, version: int, size: int) -> dict[str, Any]:
    """The report a Pi-class device sends for a passing candidate (figures of a quick-mode run)."""
    return {"device_id": device_id, "deployment_id": deployment_id, "model_id": model_id, "version": version,
            "load_ok": True, "mode": "quick", "runtime": dict(RUNTIME), "model_bytes": size,
            "latency_ms": {"p50": 0.2, "p90": 0.3, "p99": 0.5, "mean": 0.22, "std": 0.05, "min": 0.15, "max": 0.9,
                           "n": 1024, "duration_s": 60.0, "cold_start_ms": 3.0},
            "memory": {"peak_rss_mib": 45.0, "load_delta_mib": 2.0},
            "energy": {"source": "unavailable", "available": False},
            "quality": {"agreement_at_k": 1.0, "ndcg_vs_reference": 1.0, "golden_n": 64}}


@dataclass
class Counters:
    """What a simulator process reports back; summed over its devices."""

    manifests: int = 0
    bad_signatures: int = 0
    verdicts: int = 0
    promoted: int = 0
    reports_sent: int = 0
    report_resends: int = 0
    duplicate_manifests: int = 0
    heartbeats: int = 0
    report_ts: dict[str, float] = field(default_factory=dict)  # deployment id -> first publish time

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class SimDevice:
    """One simulated device on a broker; all I/O through `Client`, on the process's event loop."""

    def __init__(self, device_id: str, host: str, port: int, topics: Topics, server_key: Ed25519PublicKey,
                 counters: Counters) -> None:
        self.device_id = device_id
        self.topics = topics
        self.server_key = server_key
        self.counters = counters
        self.active: tuple[str, int] | None = None
        self.current: Manifest | None = None
        self.finished: set[str] = set()
        self._awaiting: dict[str, bytes] = {}  # deployment id -> report payload, until its verdict
        offline = DeviceState(device_id=device_id, status="offline", runtime=dict(RUNTIME)).to_json()
        self.client = Client(host, port, f"agent-{device_id}", self._on_message,
                             will=Will(topics.up(device_id, "state"), offline), on_connect=self._on_connect)

    async def start(self) -> None:
        await self.client.start()
        await self.client.subscribe([(self.topics.device_down_filter(self.device_id), 1)])

    async def stop(self) -> None:
        await self.client.close()

    def _state(self) -> bytes:
        model, version = self.active or (None, None)
        return DeviceState(device_id=self.device_id, status="online", active_model_id=model, active_version=version,
                           runtime=dict(RUNTIME), agent_version="sim").to_json()

    async def _on_connect(self, _session_present: bool) -> None:
        await self.client.publish(self.topics.up(self.device_id, "state"), self._state(), retain=True)
        for payload in list(self._awaiting.values()):  # as the agent does after a reconnect
            await self.client.publish(self.topics.up(self.device_id, "report"), payload)

    async def send_heartbeat(self, uptime_s: float) -> None:
        active_version = self.active[1] if self.active else None
        beat = Heartbeat(device_id=self.device_id, uptime_s=round(uptime_s, 1), active_version=active_version)
        await self.client.publish(self.topics.up(self.device_id, "heartbeat"), beat.to_json())

    async def _event(self, type_: str, deployment_id: str, version: int | None, **kw: Any) -> None:
        event = Event(device_id=self.device_id, type=type_, deployment_id=deployment_id, version=version, **kw)
        await self.client.publish(self.topics.up(self.device_id, "event"), event.to_json())

    def _on_message(self, topic: str, payload: bytes) -> None:
        kind = topic.rsplit("/", 1)[-1]
        # Answers run as tasks: a QoS 1 publish waits for its PUBACK, which this read loop delivers.
        if kind == "manifest":
            asyncio.create_task(self._guard(self._on_manifest(payload)))
        elif kind == "verdict":
            asyncio.create_task(self._guard(self._on_verdict(payload)))

    async def _guard(self, coro: Any) -> None:
        try:
            await coro
        except Exception:
            _LOGGER.exception("%s: handler failed", self.device_id)

    def _verified(self, kind: Any, payload: bytes) -> Any:
        """A signed down message decoded and checked against the pinned key, or None (counted, logged)."""
        try:
            message = kind.from_json(payload)
            message.verify(self.server_key)
        except (ProtocolError, SignatureError) as exc:
            self.counters.bad_signatures += 1
            _LOGGER.warning("%s: %s refused: %s", self.device_id, kind.__name__.lower(), exc)
            return None
        return message

    async def _on_manifest(self, payload: bytes) -> None:
        manifest = self._verified(Manifest, payload)
        if manifest is None:
            return
        dep = manifest.deployment_id
        if dep in self.finished:
            self.counters.duplicate_manifests += 1
            await self._event("manifest_rejected", dep, manifest.version, reason=f"deployment {dep} already finished")
            return
        if self.current is not None and self.current.deployment_id == dep:
            self.counters.duplicate_manifests += 1
            await self._event("manifest_accepted", dep, manifest.version, missing=[], reason="already measuring")
            if dep in self._awaiting:
                self.counters.report_resends += 1
                await self.client.publish(self.topics.up(self.device_id, "report"), self._awaiting[dep])
            return
        self.counters.manifests += 1
        self.current = manifest
        await self._event("manifest_accepted", dep, manifest.version, missing=[])
        await self._event("download_complete", dep, manifest.version)
        report = Report.from_dict({**report_dict(self.device_id, dep, manifest.model_id, manifest.version,
                                                 manifest.total_size), "ts": time.time()})
        await self.send_report(report)

    async def send_report(self, report: Report) -> None:
        """Publish a report (QoS 1) and keep it until its verdict, re-sending it if none comes."""
        payload = report.to_json()
        self._awaiting[report.deployment_id] = payload
        self.counters.report_ts.setdefault(report.deployment_id, time.time())
        self.counters.reports_sent += 1
        await self.client.publish(self.topics.up(self.device_id, "report"), payload)
        asyncio.create_task(self._guard(self._resend_until_verdict(report.deployment_id)))

    async def _resend_until_verdict(self, deployment_id: str) -> None:
        # As the agent does (agent.link): growing, jittered waits, so a server that is behind is not
        # buried under a fleet's retries.
        backoff = Backoff(REPORT_RESEND_S, REPORT_RESEND_MAX_FACTOR * REPORT_RESEND_S, jitter=0.2)
        while True:
            await asyncio.sleep(backoff.next())
            payload = self._awaiting.get(deployment_id)
            if payload is None or self.client.closed:
                return
            self.counters.report_resends += 1
            await self.client.publish(self.topics.up(self.device_id, "report"), payload)

    async def _on_verdict(self, payload: bytes) -> None:
        verdict = self._verified(Verdict, payload)
        if verdict is None:
            return
        dep = verdict.deployment_id
        if self._awaiting.pop(dep, None) is None:
            return  # a repeated verdict
        self.counters.verdicts += 1
        self.finished.add(dep)
        manifest = self.current if self.current is not None and self.current.deployment_id == dep else None
        self.current = None if manifest is not None else self.current
        if manifest is None:  # a verdict for a report sent outside a manifest (the ingest phase)
            return
        if verdict.verdict == "PASS":
            self.active = (manifest.model_id, manifest.version)
            self.counters.promoted += 1
            await self._event("promoted", dep, manifest.version)
            await self.client.publish(self.topics.up(self.device_id, "state"), self._state(), retain=True)
        else:
            await self._event("rolled_back", dep, manifest.version, reason=verdict.reason)
