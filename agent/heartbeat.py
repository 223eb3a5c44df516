"""Periodic liveness: uptime, active version and last error, on its own thread.

Its own thread so a long measurement on the worker never silences liveness. It reads only the
controller's published `Snapshot` and the lock-guarded `Health`, never worker state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.health import Health, Snapshot
from agent.link import DeviceLink
from protocol.messages import Heartbeat

_LOGGER = logging.getLogger(__name__)


class HeartbeatLoop:
    """Publishes a Heartbeat every `interval_s` while connected, until `stop()`."""

    def __init__(self, link: DeviceLink, health: Health, snapshot: Callable[[], Snapshot], interval_s: float,
                 started_at: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"heartbeat interval must be > 0, got {interval_s}")
        self.link = link
        self.health = health
        self.snapshot = snapshot
        self.interval_s = interval_s
        self.started_at = started_at
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        thread = threading.Thread(target=self.health.guarded("heartbeat", self._run, self._stopping),
                                  name="edgeguide-heartbeat", daemon=True)
        thread.start()
        self._thread = thread

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def beat(self) -> Heartbeat:
        return Heartbeat(device_id=self.link.device_id, uptime_s=round(time.monotonic() - self.started_at, 3),
                         active_version=self.snapshot().active_version, last_error=self.health.last_error)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            if self.link.connected:
                self.link.publish("heartbeat", self.beat().to_json())
