"""Peak-RSS pass with a psutil sampling thread (why: kept apart from the latency pass it would perturb)."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

import numpy as np
import psutil

from agent.measure.config import MeasureConfig
from agent.measure.latency import run_until
from agent.measure.recommender import Recommender

_LOGGER = logging.getLogger(__name__)

_MIB = 1024.0 * 1024.0
SAMPLER_THREAD_NAME = "edgeguide-rss-sampler"


class RssSampler:
    """Samples this process's RSS at ``hz`` on a daemon thread; use as a context manager."""

    def __init__(self, hz: float, pid: int | None = None) -> None:
        if hz <= 0:
            raise ValueError(f"RSS sampling rate must be > 0 Hz, got {hz}")
        self._interval = 1.0 / hz
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples_mib: list[float] = []

    def _sample(self) -> None:
        self.samples_mib.append(self._process.memory_info().rss / _MIB)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def start(self) -> None:
        """Take one sample now and keep sampling until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("RssSampler already started; create a new one per pass")
        self._sample()
        self._thread = threading.Thread(target=self._loop, name=SAMPLER_THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and take a last sample, so even a very short pass has two."""
        if self._thread is None:
            raise RuntimeError("RssSampler.stop() called before start()")
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_mib(self) -> float:
        """Largest RSS seen."""
        if not self.samples_mib:
            raise RuntimeError("no RSS samples taken; call start() first")
        return max(self.samples_mib)

    def __enter__(self) -> RssSampler:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def measure_memory(recommender: Recommender, histories: np.ndarray, config: MeasureConfig,
                   *, load_delta_mib: float, rss_after_load_mib: float) -> dict[str, float | int]:
    """Run the memory pass on an already loaded model and report peak RSS.

    ``load_delta_mib``/``rss_after_load_mib`` come from the cold start, where RSS was read around
    the load without a sampler; the peak also counts that post-load reading.
    """
    with RssSampler(config.rss_hz) as sampler:
        run = run_until(recommender, histories, min_runs=config.memory_min_runs,
                        min_s=config.memory_min_s)
    peak = max(sampler.peak_mib, rss_after_load_mib)
    result = {
        "peak_rss_mib": float(peak),
        "load_delta_mib": float(load_delta_mib),
        "rss_after_load_mib": float(rss_after_load_mib),
        "samples": len(sampler.samples_mib),
        "runs": len(run.samples_ms),
        "duration_s": run.duration_s,
        "sample_hz": config.rss_hz,
    }
    _LOGGER.info("memory: peak RSS %.1f MiB over %d samples, load delta %.1f MiB",
                 peak, result["samples"], load_delta_mib)
    return result

