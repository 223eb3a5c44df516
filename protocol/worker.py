"""One worker thread that owns a state: jobs run in order, timers and deadline checks in between.

The agent and the server both keep their mutable state on a single thread, so no lock guards it:
paho's network thread only submits jobs, and anything that must happen later (a stalled download,
a verdict deadline, the server's tick) is a timer or a deadline check run by the same thread.
A job that raises is logged with its label and handed to `on_error`; it never kills the thread.

    worker = Worker("edgeguide-worker", on_error=note)
    worker.every(1.0, deployer.tick, "tick")
    worker.add_deadline_check(controller.check_deadlines, controller.next_check_in)
    worker.start()
    worker.submit(lambda: handle(topic, payload), topic)  # from any thread
    worker.stop(timeout=10)  # False: a job is still running after 10 s (its state is not ours to touch)
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_LOGGER = logging.getLogger(__name__)

Job = Callable[[], object]
ErrorHook = Callable[[str, Exception], None]
_STOP = object()


@dataclass(order=True)
class Timer:
    """A scheduled job; `cancel()` from the worker thread or any other."""

    due: float
    seq: int
    fn: Job = field(compare=False)
    label: str = field(compare=False)
    interval_s: float | None = field(default=None, compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _DeadlineCheck:
    check: Job
    due_in: Callable[[], float | None]
    label: str


class Worker:
    """A thread running submitted jobs in FIFO order, timers when due, and deadline checks.

    `idle_s` bounds how long the thread sleeps when nothing is due (a safety net: deadline checks
    that forget to report their next due time still run that often).
    `on_error(label, exc)` runs on the worker thread after a job raised (its own errors are logged).
    `on_crash(exc)` runs if the loop itself dies, which only a bug in this module can cause.
    """

    def __init__(self, name: str, *, on_error: ErrorHook | None = None,
                 on_crash: Callable[[Exception], None] | None = None, idle_s: float = 5.0) -> None:
        if idle_s <= 0:
            raise ValueError(f"idle_s must be > 0, got {idle_s}")
        self.name = name
        self.idle_s = idle_s
        self._on_error = on_error
        self._on_crash = on_crash
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._timers: list[Timer] = []  # a heap, touched only by the worker thread
        self._new_timers: queue.SimpleQueue[Timer] = queue.SimpleQueue()
        self._checks: list[_DeadlineCheck] = []
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._stopping = threading.Event()

    # -- setup and lifecycle ----------------------------------------------------------------------
    def add_deadline_check(self, check: Job, due_in: Callable[[], float | None], label: str = "deadlines") -> None:
        """Run `check` after every job and timer, and whenever `due_in()` seconds (None: idle) have passed.

        Call before `start()`. `due_in` is asked again after each run, so a state that moves its
        deadline (a chunk arrived, a verdict is awaited) needs no timer to cancel.
        """
        if self._thread.is_alive():
            raise RuntimeError(f"worker {self.name}: add deadline checks before start()")
        self._checks.append(_DeadlineCheck(check, due_in, label))

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Run what was submitted before this call, then end the thread; True once it ended.

        False means a job is still running after `timeout`: the caller must leave the state the
        worker owns alone (the job may still be changing it).
        """
        self._stopping.set()
        self._queue.put(_STOP)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def in_worker(self) -> bool:
        """True on the worker thread (assert it where a state must only be touched there)."""
        return threading.current_thread() is self._thread

    # -- scheduling (any thread) ------------------------------------------------------------------
    def submit(self, fn: Job, label: str = "") -> bool:
        """Queue `fn` to run after every job queued before it; False (and dropped) once stopping."""
        if self._stopping.is_set():
            _LOGGER.debug("worker_job_dropped worker=%s job=%s: stopping", self.name, label)
            return False
        self._queue.put((label or getattr(fn, "__name__", "job"), fn))
        return True

    def call_later(self, delay_s: float, fn: Job, label: str = "") -> Timer:
        """Run `fn` once, `delay_s` seconds from now (between jobs)."""
        return self._schedule(delay_s, fn, label, None)

    def every(self, interval_s: float, fn: Job, label: str = "", *, first_in_s: float = 0.0) -> Timer:
        """Run `fn` every `interval_s` seconds, counted from the end of its previous run."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        return self._schedule(first_in_s, fn, label, interval_s)

    def _schedule(self, delay_s: float, fn: Job, label: str, interval_s: float | None) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay_s), next(self._seq), fn,
                      label or getattr(fn, "__name__", "timer"), interval_s)
        self._new_timers.put(timer)
        self._queue.put(None)  # wake the thread so it sees the new timer
        return timer

    # -- the thread -----------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug here, not in a job: the owner must know its state is orphaned
            _LOGGER.exception("worker_crashed worker=%s", self.name)
            if self._on_crash is not None:
                self._on_crash(exc)

    def _loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._wait_s())
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if isinstance(item, tuple):
                label, fn = item
                self._run(label, fn)
            self._run_timers()
            for check in self._checks:
                self._run(check.label, check.check)

    def _wait_s(self) -> float:
        while not self._new_timers.empty():
            heapq.heappush(self._timers, self._new_timers.get())
        now = time.monotonic()
        due = now + self.idle_s
        if self._timers:
            due = min(due, self._timers[0].due)
        for check in self._checks:
            try:
                left = check.due_in()
            except Exception:
                _LOGGER.exception("worker_due_in_failed worker=%s check=%s", self.name, check.label)
                left = None
            if left is not None:
                due = min(due, now + left)
        return max(0.0, due - now)

    def _run_timers(self) -> None:
        while not self._new_timers.empty():
            heapq.heappush(self._timers, self._new_timers.get())
        now = time.monotonic()
        while self._timers and self._timers[0].due <= now:
            timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._run(timer.label, timer.fn)
            if timer.interval_s is not None and not timer.cancelled:
                timer.due = time.monotonic() + timer.interval_s
                timer.seq = next(self._seq)
                heapq.heappush(self._timers, timer)

    def _run(self, label: str, fn: Job) -> None:
        try:
            fn()
        except Exception as exc:  # a bad job must not stop the worker
            _LOGGER.exception("worker_job_failed worker=%s job=%s", self.name, label)
            if self._on_error is not None:
                try:
                    self._on_error(label, exc)
                except Exception:
                    _LOGGER.exception("worker_error_hook_failed worker=%s job=%s", self.name, label)
