"""A bounded on-disk queue for messages that must reach the server even across outages and restarts.

A report costs a full measurement to produce, so it is written to disk before publishing and
deleted only once the broker acknowledged it (QoS 1 PUBACK). Delivery is at-least-once: the
server de-duplicates by deployment id. The queue is bounded: when full, the oldest entry goes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from protocol.backoff import Backoff
from protocol.files import atomic_write

_LOGGER = logging.getLogger(__name__)

Sender = Callable[[str, bytes], bool]
SUFFIX = ".msg"


class Outbox:
    """Messages as files `<ns-timestamp>-<n>.msg` holding `topic\\n` + payload, oldest first."""

    def __init__(self, directory: Path | str, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._counter = 0
        for stale in self.dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def pending(self) -> list[Path]:
        return sorted(self.dir.glob(f"*{SUFFIX}"))

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.pending())

    def put(self, topic: str, payload: bytes) -> Path:
        """Persist one message (fsynced), evicting the oldest ones if the queue would exceed its bound."""
        if "\n" in topic:
            raise ValueError(f"topic {topic!r} contains a newline")
        record = topic.encode() + b"\n" + payload
        if len(record) > self.max_bytes:
            raise ValueError(f"message of {len(record)} bytes for {topic} exceeds the outbox bound {self.max_bytes}")
        with self._lock:
            self._counter += 1
            path = self.dir / f"{time.time_ns():020d}-{self._counter:06d}{SUFFIX}"
            self._evict_for(len(record))
            atomic_write(path, record)
        _LOGGER.info("outbox_put topic=%s bytes=%d queued=%d", topic, len(payload), len(self.pending()))
        return path

    def _evict_for(self, incoming: int) -> None:
        entries = self.pending()
        total = sum(p.stat().st_size for p in entries)
        while entries and total + incoming > self.max_bytes:
            oldest = entries.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
            _LOGGER.warning("outbox_evicted file=%s reason=bound max_bytes=%d", oldest.name, self.max_bytes)

    @staticmethod
    def read(path: Path) -> tuple[str, bytes]:
        raw = path.read_bytes()
        topic, _, payload = raw.partition(b"\n")
        return topic.decode(), payload

    def flush(self, send: Sender) -> int:
        """Send queued messages oldest first; stop at the first one `send` could not deliver."""
        sent = 0
        for path in self.pending():
            try:
                topic, payload = self.read(path)
            except OSError as exc:
                _LOGGER.warning("outbox_unreadable file=%s error=%s: dropping", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            if not send(topic, payload):
                break
            path.unlink(missing_ok=True)
            sent += 1
        if sent:
            _LOGGER.info("outbox_flushed sent=%d left=%d", sent, len(self.pending()))
        return sent


class OutboxFlusher:
    """Background thread that drains the outbox whenever kicked, retrying with capped jittered backoff."""

    def __init__(self, outbox: Outbox, send: Sender, is_connected: Callable[[], bool], *,
                 min_backoff_s: float = 1.0, max_backoff_s: float = 60.0) -> None:
        self.outbox = outbox
        self._send = send
        self._is_connected = is_connected
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeguide-outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def kick(self) -> None:
        """Try to flush now (after a put or a reconnect)."""
        self._kick.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        # The first retry waits twice the minimum; an emptied outbox starts over from the minimum.
        retries = Backoff(min(self.max_backoff_s, self.min_backoff_s * 2), self.max_backoff_s, jitter=0.2)
        wait_s = self.min_backoff_s
        while not self._stop.is_set():
            self._kick.wait(wait_s if self.outbox.pending() else None)
            self._kick.clear()
            if self._stop.is_set() or not self.outbox.pending():
                continue
            if not self._is_connected():
                continue  # a reconnect kicks us
            try:
                self.outbox.flush(self._send)
            except Exception:
                _LOGGER.exception("outbox_flush_failed")
            if self.outbox.pending():
                wait_s = retries.next()
                _LOGGER.info("outbox_retry in_s=%.1f left=%d", wait_s, len(self.outbox.pending()))
            else:
                retries.reset()
                wait_s = self.min_backoff_s

