"""Sample a PowerSource over time, on a thread or in a separate process (why: costly readers such as
Termux's must not load the measuring process; cheap sysfs readers can sample at >= 10 Hz in-process)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import threading
import time
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Protocol

from agent.measure.power.base import PowerSource, PowerUnavailable

_LOGGER = logging.getLogger(__name__)

SAMPLER_THREAD_NAME = "edgeguide-power-sampler"


@dataclasses.dataclass
class PowerTrace:
    """Timestamps (``time.monotonic`` seconds, system-wide on Linux) with watts, plus read errors."""

    times: list[float] = dataclasses.field(default_factory=list)
    watts: list[float] = dataclasses.field(default_factory=list)
    errors: list[tuple[float, str]] = dataclasses.field(default_factory=list)

    def add(self, when: float, watts: float) -> None:
        self.times.append(when)
        self.watts.append(watts)


class PowerSampler(Protocol):
    """Common face of the two samplers."""

    trace: PowerTrace

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def wait_for_sample_after(self, when: float, timeout_s: float) -> bool: ...


def _read_once(source: PowerSource) -> tuple[str, float, float | str]:
    begin = time.monotonic()
    try:
        watts = source.read()
    except PowerUnavailable as exc:
        return "err", time.monotonic(), exc.reason
    end = time.monotonic()
    # The figure describes the read span, so stamp it at the middle (matters for slow readers).
    return "ok", (begin + end) / 2.0, watts


def _next_tick(previous: float, interval_s: float) -> float:
    """Next read time on a fixed grid; ticks missed during a stall are skipped, not fired back to back
    (a burst of reads would add samples that saw no activity in between)."""
    now = time.monotonic()
    tick = previous + interval_s
    if tick < now:
        tick += ((now - tick) // interval_s + 1) * interval_s
    return tick


class _Waitable:
    trace: PowerTrace
    _changed: threading.Condition

    def _record(self, kind: str, when: float, value: float | str) -> None:
        with self._changed:
            if kind == "ok":
                self.trace.add(when, float(value))
            else:
                self.trace.errors.append((when, str(value)))
            self._changed.notify_all()

    def wait_for_sample_after(self, when: float, timeout_s: float) -> bool:
        """Block until a sample or error stamped at or after ``when`` arrives; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                latest = max([*self.trace.times[-1:], *(t for t, _ in self.trace.errors[-1:])], default=None)
                if latest is not None and latest >= when:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)


class ThreadPowerSampler(_Waitable):
    """Calls ``source.read()`` every ``interval_s`` on a daemon thread of this process."""

    def __init__(self, source: PowerSource, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"sampling interval must be > 0 s, got {interval_s}")
        self.source = source
        self.interval_s = interval_s
        self.trace = PowerTrace()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._record(*_read_once(self.source))
            next_at = _next_tick(next_at, self.interval_s)
            self._stop.wait(next_at - time.monotonic())

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("ThreadPowerSampler already started; create one per pass")
        self._thread = threading.Thread(target=self._loop, name=SAMPLER_THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            raise RuntimeError("ThreadPowerSampler.stop() called before start()")
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> ThreadPowerSampler:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _child_main(source: PowerSource, interval_s: float, conn: Connection) -> None:
    """Sampler process: send ("ok"|"err", time, value) tuples until the parent writes "stop"."""
    next_at = time.monotonic()
    try:
        while True:
            conn.send(_read_once(source))
            next_at = _next_tick(next_at, interval_s)
            if conn.poll(next_at - time.monotonic()):
                break
    except (BrokenPipeError, EOFError, OSError):
        return
    conn.send(("done", time.monotonic(), ""))
    conn.close()


class ProcessPowerSampler(_Waitable):
    """Calls ``source.read()`` from a spawned process and streams samples back over a pipe.

    Only a pipe is used (no multiprocessing semaphores), which also works on Android, where
    ``sem_open`` is missing. ``source`` must be picklable.
    """

    def __init__(self, source: PowerSource, interval_s: float, start_timeout_s: float = 60.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"sampling interval must be > 0 s, got {interval_s}")
        self.source = source
        self.interval_s = interval_s
        self.start_timeout_s = start_timeout_s
        self.trace = PowerTrace()
        self._changed = threading.Condition()
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None

    def _pump(self) -> None:
        assert self._conn is not None
        while True:
            try:
                kind, when, value = self._conn.recv()
            except (EOFError, OSError):
                return
            if kind == "done":
                return
            self._record(kind, when, value)

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("ProcessPowerSampler already started; create one per pass")
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=True)
        self._conn = parent
        self._process = context.Process(target=_child_main, args=(self.source, self.interval_s, child),
                                        name="edgeguide-power-sampler", daemon=True)
        self._process.start()
        child.close()
        self._reader = threading.Thread(target=self._pump, name=SAMPLER_THREAD_NAME + "-pipe", daemon=True)
        self._reader.start()
        _LOGGER.info("power sampler process %s started for %s every %.2f s",
                     self._process.pid, self.source.source, self.interval_s)

    def stop(self) -> None:
        if self._process is None or self._conn is None or self._reader is None:
            raise RuntimeError("ProcessPowerSampler.stop() called before start()")
        with contextlib.suppress(BrokenPipeError, OSError):
            self._conn.send("stop")
        # A slow reader may be mid-call; give it one interval plus the read time to finish.
        self._reader.join(self.interval_s + self.start_timeout_s)
        self._process.join(self.start_timeout_s)
        if self._process.is_alive():
            _LOGGER.warning("power sampler process %s did not stop; terminating it", self._process.pid)
            self._process.terminate()
            self._process.join(5.0)
        self._conn.close()

    def __enter__(self) -> ProcessPowerSampler:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def make_sampler(source: PowerSource, hz: float) -> ThreadPowerSampler | ProcessPowerSampler:
    """Sampler for ``source`` at ``hz``, slowed to the source's ``min_interval_s`` when it needs it."""
    interval = max(1.0 / hz, float(source.min_interval_s))
    if source.out_of_process:
        return ProcessPowerSampler(source, interval)
    return ThreadPowerSampler(source, interval)
