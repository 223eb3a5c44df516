"""protocol.worker.Worker: ordered jobs, timers, deadline checks, errors that never kill it, stop."""

from __future__ import annotations

import threading
import time

import pytest

from protocol.worker import Worker


def _wait(cond, timeout: float = 5.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_jobs_run_in_order_on_one_thread() -> None:
    seen: list[tuple[int, str]] = []
    worker = Worker("t-order")
    worker.start()
    for i in range(50):
        worker.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    assert worker.stop(5)
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"t-order"}


def test_a_failing_job_is_reported_and_the_worker_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    errors: list[tuple[str, str]] = []
    done = threading.Event()
    worker = Worker("t-errors", on_error=lambda label, exc: errors.append((label, str(exc))))
    worker.start()

    def bad() -> None:
        raise RuntimeError("boom")

    def bad_hook_too() -> None:
        raise KeyError("x")

    worker.submit(bad, "chunk")
    worker.submit(done.set, "after")
    assert done.wait(5)
    assert errors == [("chunk", "boom")]
    assert "worker_job_failed worker=t-errors job=chunk" in caplog.text
    hookless = Worker("t-hook", on_error=lambda label, exc: bad_hook_too())
    hookless.start()
    hookless.submit(bad, "x")
    again = threading.Event()
    hookless.submit(again.set)
    assert again.wait(5) and hookless.alive
    assert "worker_error_hook_failed" in caplog.text
    assert worker.stop(5) and hookless.stop(5)


def test_timers_and_periodic_jobs() -> None:
    ticks: list[float] = []
    once = threading.Event()
    worker = Worker("t-timers", idle_s=10)
    worker.start()
    start = time.monotonic()
    worker.call_later(0.2, once.set)
    periodic = worker.every(0.05, lambda: ticks.append(time.monotonic()))
    cancelled = worker.call_later(0.1, lambda: ticks.append(-1.0))
    cancelled.cancel()
    assert once.wait(5) and time.monotonic() - start >= 0.19
    assert _wait(lambda: len(ticks) >= 5)
    periodic.cancel()
    count = len(ticks)
    time.sleep(0.2)
    assert len(ticks) <= count + 1 and -1.0 not in ticks
    assert all(b - a >= 0.045 for a, b in zip(ticks, ticks[1:], strict=False))
    assert worker.stop(5)


def test_deadline_checks_run_after_each_job_and_when_due() -> None:
    state = {"due": None, "fired": 0, "checks": 0}

    def check() -> None:
        state["checks"] += 1
        if state["due"] is not None and time.monotonic() >= state["due"]:
            state["fired"] += 1
            state["due"] = None

    def due_in() -> float | None:
        return None if state["due"] is None else state["due"] - time.monotonic()

    worker = Worker("t-deadline", idle_s=30)  # only due_in can wake it in time
    worker.add_deadline_check(check, due_in)
    worker.start()
    worker.submit(lambda: state.update(due=time.monotonic() + 0.15))
    assert _wait(lambda: state["fired"] == 1, 3)
    assert state["checks"] >= 2  # after the job, then at the deadline
    with pytest.raises(RuntimeError, match="before start"):
        worker.add_deadline_check(check, due_in)
    assert worker.stop(5)


def test_stop_runs_what_was_queued_then_refuses_more() -> None:
    seen: list[int] = []
    worker = Worker("t-stop")
    worker.start()
    for i in range(5):
        worker.submit(lambda i=i: (time.sleep(0.01), seen.append(i)))
    assert worker.stop(5)
    assert seen == [0, 1, 2, 3, 4]
    assert worker.submit(lambda: seen.append(99)) is False
    assert not worker.alive


def test_stop_reports_a_job_still_running() -> None:
    release = threading.Event()
    worker = Worker("t-busy")
    worker.start()
    worker.submit(lambda: release.wait(10))
    assert worker.stop(0.1) is False  # the caller now knows not to touch the worker's state
    assert worker.alive
    release.set()
    assert _wait(lambda: not worker.alive)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="idle_s"):
        Worker("x", idle_s=0)
    with pytest.raises(ValueError, match="interval_s"):
        Worker("x").every(0, lambda: None)
