"""What one device may make the server store: a per-device rate limit and size bounds on ingest.

Every up message costs the server a decode and usually a registry row, and a device's
credentials (or a bug in its agent) can send as many as the broker relays. A token bucket per
device id (the topic's, which the broker ACL binds to the account) drops what exceeds `burst`
messages at once or `per_second` sustained before it is even queued; text and objects a device
supplies are cut to fixed sizes before they are stored; old event rows are pruned. Legitimate
agents stay far below these figures (a heartbeat every 30 s, a few events per deployment step).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TypeVar

from protocol.messages import DeviceState, Event, Heartbeat

Message = TypeVar("Message")

DETAIL_MAX_CHARS = 1000


@dataclass(frozen=True)
class IngestLimits:
    """Per-device bounds on what the server accepts and keeps (docs/protocol.md, section 9)."""

    # A server-driven burst is legitimate: 64 manifests superseding each other make an agent answer
    # with ~200 messages within seconds. The disk bound comes from retention (below), not the rate.
    burst: int = 300
    per_second: float = 10.0
    max_detail_chars: int = DETAIL_MAX_CHARS
    max_runtime_chars: int = 512
    max_events_per_device: int = 5000
    max_event_age_s: float = 90 * 86400.0
    prune_interval_s: float = 300.0
    max_tracked_devices: int = 10_000
    notice_interval_s: float = 60.0

    def __post_init__(self) -> None:
        if self.burst < 1 or self.per_second <= 0:
            raise ValueError(f"burst must be >= 1 and per_second > 0, got {self.burst} and {self.per_second}")
        if self.max_detail_chars < 16 or self.max_runtime_chars < 64 or self.max_events_per_device < 1:
            raise ValueError("max_detail_chars >= 16, max_runtime_chars >= 64 and max_events_per_device >= 1 needed")


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    dropped: int = 0
    noticed: float = float("-inf")


class DeviceRateLimiter:
    """Token buckets keyed by device id, the least recently seen forgotten beyond `max_tracked_devices`."""

    def __init__(self, limits: IngestLimits) -> None:
        self.limits = limits
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, device_id: str, now: float | None = None) -> bool:
        """Take one token from `device_id`'s bucket; False (and count a drop) when it is empty."""
        now = time.monotonic() if now is None else now
        lim = self.limits
        with self._lock:
            bucket = self._buckets.get(device_id)
            if bucket is None:
                bucket = self._buckets[device_id] = _Bucket(float(lim.burst), now)
                while len(self._buckets) > lim.max_tracked_devices:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(device_id)
                bucket.tokens = min(float(lim.burst), bucket.tokens + (now - bucket.stamp) * lim.per_second)
                bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return True
            bucket.dropped += 1
            return False

    def take_notice(self, device_id: str, now: float | None = None) -> int:
        """Messages dropped for `device_id` since the last notice, at most once per `notice_interval_s` (else 0)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(device_id)
            if bucket is None or not bucket.dropped or now - bucket.noticed < self.limits.notice_interval_s:
                return 0
            dropped, bucket.dropped, bucket.noticed = bucket.dropped, 0, now
            return dropped


def bounded(message: Message, limits: IngestLimits) -> Message:
    """`message` with the text and objects a device supplies cut to what the server stores."""
    cut = limits.max_detail_chars
    if isinstance(message, Event) and message.reason and len(message.reason) > cut:
        return dataclasses.replace(message, reason=message.reason[:cut])
    if isinstance(message, Heartbeat) and message.last_error and len(message.last_error) > cut:
        return dataclasses.replace(message, last_error=message.last_error[:cut])
    if isinstance(message, DeviceState) and message.runtime is not None \
            and len(json.dumps(message.runtime)) > limits.max_runtime_chars:
        # Only what deployments use (name, version), each cut short.
        runtime = {k: str(message.runtime.get(k, ""))[:64] for k in ("name", "version")}
        return dataclasses.replace(message, runtime=runtime)
    return message
