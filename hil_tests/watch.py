"""A read-only observer of one device's up topics on the broker.

The server's registry is the main view of a device, but two things are only visible on the wire:
the order of state changes around a restart (offline, then online again) and the events a device
sends while the server is deliberately busy (the resumed download's `need_chunks`). The watch
subscribes like a second server would and never publishes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.mqtt import MqttLink
from protocol.topics import Topics

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seen:
    """One message from the device: its kind (state, heartbeat, event, report) and decoded body."""

    index: int
    kind: str
    body: dict[str, Any]
    at: float


class DeviceWatch:
    """Records everything `device_id` publishes; waits for messages by kind and predicate."""

    def __init__(self, broker_url: str, topics: Topics, device_id: str, *, tls_ca: str | None = None) -> None:
        self.topics = topics
        self.device_id = device_id
        self._seen: list[Seen] = []
        self._cond = threading.Condition()
        self.link = MqttLink(broker_url, client_id=f"hil-watch-{uuid.uuid4().hex[:8]}", clean_start=True,
                             tls_ca=tls_ca)
        self.link.subscribe(f"{topics.prefix}/dev/{device_id}/up/+", self._on_up)

    def start(self, timeout: float = 10.0) -> DeviceWatch:
        self.link.start(timeout)
        return self

    def stop(self) -> None:
        self.link.stop()

    def _on_up(self, topic: str, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            body = {"undecodable": payload[:200].hex()}
        with self._cond:
            self._seen.append(Seen(len(self._seen), topic.rsplit("/", 1)[-1], body, time.time()))
            self._cond.notify_all()

    def mark(self) -> int:
        """Index of the next message; pass it as `start` to wait only for what comes later."""
        with self._cond:
            return len(self._seen)

    def messages(self, kind: str | None = None, start: int = 0) -> list[Seen]:
        with self._cond:
            return [m for m in self._seen[start:] if kind is None or m.kind == kind]

    def wait_for(self, kind: str, pred: Callable[[dict[str, Any]], bool] = lambda _b: True, *,
                 start: int = 0, timeout: float = 60.0, what: str = "") -> Seen:
        """First `kind` message from index `start` on whose body satisfies `pred`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self._seen[start:]:
                    if msg.kind == kind and pred(msg.body):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    recent = [(m.kind, json.dumps(m.body)[:160]) for m in self._seen[start:][-15:]]
                    raise AssertionError(f"device {self.device_id}: no {what or kind} message within {timeout:.0f} s "
                                         f"on {self.topics.prefix}/dev/{self.device_id}/up/+; last seen: {recent}")
                self._cond.wait(left)

    def wait_state(self, status: str, *, start: int = 0, timeout: float = 60.0) -> Seen:
        """The device's retained presence switching to `status` ("online" / "offline")."""
        return self.wait_for("state", lambda b: b.get("status") == status, start=start, timeout=timeout,
                             what=f"state {status!r}")
