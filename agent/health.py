"""What every part of the agent may report and the heartbeat reads: the last error and a fatal one.

The only agent state written by several threads (the connect loop, the worker, a dying thread),
so it is the only one behind a lock. `Snapshot` is what the deployment controller publishes for
readers on other threads: an immutable value replaced whole, never a view of worker state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """The active model and deployment phase as last published by the controller (worker thread)."""

    active_model_id: str | None = None
    active_version: int | None = None
    phase: str = "idle"
    deployment_id: str | None = None


class Health:
    """The agent's last error and, once it can no longer work, its fatal error (the CLI exits on it)."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self._lock = threading.Lock()
        self._last_error: str | None = None
        self._fatal_error: str | None = None

    @property
    def last_error(self) -> str | None:
        with self._lock:
            return self._last_error

    @property
    def fatal_error(self) -> str | None:
        with self._lock:
            return self._fatal_error

    def note_error(self, text: str) -> None:
        """Remember `text` as the last error (sent in every heartbeat)."""
        with self._lock:
            self._last_error = text

    def declare_fatal(self, reason: str) -> None:
        """Record an error the process cannot recover from; the CLI exits non-zero on it."""
        with self._lock:
            if self._fatal_error is not None:
                return
            self._fatal_error = reason
            self._last_error = reason
        _LOGGER.critical("AGENT_FATAL device=%s reason=%s: exiting so the supervisor restarts the agent",
                         self.device_id, reason)

    def guarded(self, name: str, target: Callable[[], None], stopping: threading.Event) -> Callable[[], None]:
        """A thread body: if `target` dies while the agent is meant to run, the agent is broken."""
        def run() -> None:
            try:
                target()
            except Exception as exc:
                if stopping.is_set():
                    _LOGGER.warning("thread_failed_while_stopping thread=%s error=%r", name, exc)
                    return
                _LOGGER.exception("thread_died thread=%s", name)
                self.declare_fatal(f"{name} thread died: {type(exc).__name__}: {exc}")
        return run
