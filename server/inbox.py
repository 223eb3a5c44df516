"""Device messages handled in groups, one database transaction per group (group commit).

Why: on PostgreSQL every COMMIT waits for a WAL flush, and BEGIN/COMMIT are two of the ~7
round trips a report costs; with thousands of devices reporting at once the server spent more
time committing than handling. Messages waiting in the inbox are handled together, up to
`max_messages`, and committed once.

What stays true per message:
- Publishes made while a group is handled (verdicts, commands) are held until the group has
  committed, so a device never hears of a record that could still roll back (the server sends
  model chunks at once: they follow a manifest already committed). A group also ends early once
  `max_held_bytes` are held.
- If one message raises, the whole group is rolled back and its messages handled again one
  transaction each: the bad one loses only its own writes, the others are stored once (on
  PostgreSQL; SQLite's groups are single messages whose statements commit one by one). Handling
  is idempotent per message (a repeated report re-sends its verdict), which is what makes the
  second pass safe, as it already made retries after a database outage safe.
- While the database is unreachable, or when it aborted the group's transaction to break a
  conflict with another server process (a deadlock between two groups), the group is retried
  with backoff, never dropped: the broker already counts the messages as delivered.
Where a transaction cannot span messages (SQLite: a write transaction locks the whole file for
every other server process) the group size is 1, as before.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from protocol.backoff import Backoff
from server.db import DatabaseUnavailable

_LOGGER = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]
Publish = Callable[[str, bytes], None]


class Inbox:
    """Queued device messages (`put` from any thread) and their handling in groups (`drain` on the worker)."""

    def __init__(self, handle: Handler, unit_of_work: Callable[[], AbstractContextManager[None]],
                 publish_now: Publish, schedule: Callable[[Callable[[], None]], object], *,
                 on_error: Callable[[str, Exception], None], stopping: threading.Event,
                 max_messages: int = 64, max_held_bytes: int = 4 * 2**20) -> None:
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        self._handle = handle
        self._unit_of_work = unit_of_work
        self._publish_now = publish_now
        self._schedule = schedule  # runs `drain` later on the worker thread
        self._on_error = on_error
        self._stopping = stopping
        self.max_messages = max_messages
        self.max_held_bytes = max_held_bytes
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._held: list[tuple[str, bytes]] | None = None  # publishes of the group being handled
        self._held_bytes = 0
        self._group_thread: int | None = None  # the thread handling a group: only its publishes wait
        self.groups = 0
        self.regrouped = 0  # groups rolled back and handled again one message at a time

    def put(self, topic: str, payload: bytes) -> None:
        """Queue one message (from paho's thread) and a `drain` on the worker for it."""
        self._queue.append((topic, payload))
        self._schedule(self.drain)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish now, or after the commit when called from the handling of a group.

        Only the thread handling the group waits for its commit: an operator's cancel or rollback
        (the dashboard's threads, a test) is not part of any group and goes out at once, even
        while the worker is busy, and can never be dropped with a group that rolls back.
        """
        held = self._held
        if held is None or threading.get_ident() != self._group_thread:
            self._publish_now(topic, payload)
            return
        held.append((topic, payload))
        self._held_bytes += len(payload)

    def drain(self) -> None:
        """Handle one group of what is queued (the worker runs timers between groups)."""
        group: list[tuple[str, bytes]] = []
        while self._queue and len(group) < self.max_messages:
            group.append(self._queue.popleft())
        if group:
            self._handle_group(group)

    def _handle_group(self, group: list[tuple[str, bytes]]) -> None:
        backoff = Backoff(initial=0.2, maximum=5.0)
        while True:
            self._held, self._held_bytes, self._group_thread = [], 0, threading.get_ident()
            try:
                with self._unit_of_work():
                    done = self._handle_some(group)
            except DatabaseUnavailable as exc:  # also a conflict the database broke (deadlock): retry
                self._held = self._group_thread = None
                if self._stopping.is_set():
                    raise
                delay = backoff.next()
                _LOGGER.warning("registry unavailable while handling %d message(s), retrying in %.1f s: %s",
                                len(group), delay, exc)
                self._stopping.wait(delay)
                continue
            except Exception as exc:
                self._held = self._group_thread = None
                if len(group) == 1:
                    _LOGGER.exception("handling %r failed", group[0][0])
                    self._on_error(group[0][0], exc)
                    return
                # Someone in the group failed: every write of the group was rolled back. Handle each
                # message on its own so only the failing one loses its writes.
                self.regrouped += 1
                _LOGGER.warning("a group of %d messages failed (%s: %s); handling them one by one", len(group),
                                type(exc).__name__, exc)
                for one in group:
                    self._handle_group([one])
                return
            held, self._held, self._group_thread = self._held, None, None
            self.groups += 1
            if done < len(group):  # ended early: the rest go first next time, in order (before publishing,
                self._queue.extendleft(reversed(group[done:]))  # so a failing publish cannot lose them)
                self._schedule(self.drain)
            for topic, payload in held:
                self._publish_now(topic, payload)
            return

    def _handle_some(self, group: list[tuple[str, bytes]]) -> int:
        """Handle messages of `group` in order until done or the held publishes grow too large."""
        for index, (topic, payload) in enumerate(group):
            self._handle(topic, payload)
            if self._held_bytes > self.max_held_bytes:
                return index + 1
        return len(group)
