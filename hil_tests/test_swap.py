"""Recommendations keep working while the device swaps models: none fails, none is served late.

A client thread calls the device's recommendation API the way the shop's app does, before, during
and after a promotion. Without a reachable API (a remote device with no --hil-device-http) the
swap is judged by what the device reports instead, and the HIL report says so.
"""

from __future__ import annotations

import threading
import time

from hil_tests.http_api import AgentHttp, HttpApiError


class Shopper(threading.Thread):
    """Calls POST /recommend in a loop; records the serving model's version, latency and errors."""

    def __init__(self, http: AgentHttp, histories: list[list[str]], pause_s: float = 0.002) -> None:
        super().__init__(name="hil-shopper", daemon=True)
        self.http = http
        self.histories = histories
        self.pause_s = pause_s
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.versions: list[int] = []
        self.latencies_ms: list[float] = []
        self.failures: list[str] = []

    def run(self) -> None:
        i = 0
        while not self.stop_event.is_set():
            start = time.perf_counter()
            try:
                answer = self.http.recommend(self.histories[i % len(self.histories)], k=5)
                ok = len(answer["items"]) == 5
            except (HttpApiError, KeyError, TypeError) as exc:
                with self.lock:
                    self.failures.append(f"request {i}: {exc}")
            else:
                with self.lock:
                    self.latencies_ms.append((time.perf_counter() - start) * 1000)
                    self.versions.append(answer["model"]["version"])
                    if not ok:
                        self.failures.append(f"request {i}: {len(answer['items'])} items instead of 5")
            i += 1
            self.stop_event.wait(self.pause_s)

    def count(self, version: int) -> int:
        with self.lock:
            return self.versions.count(version)

    def wait_count(self, version: int, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count(version) < n and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.02)
        assert self.count(version) >= n, f"only {self.count(version)} answers from v{version}; {self.failures[:5]}"


def test_recommendations_never_fail_during_a_swap(hil, hil_record) -> None:
    incumbent = hil.ensure_incumbent()
    record = hil.register("float")
    if hil.http is None:
        final = hil.deploy(record)
        hil_record.deployment(final)
        hil_record.note(f"{hil.http_note}: the swap is judged by the device's report (golden agreement) and "
                        f"its state, not by live requests")
        hil_record.figure("serving_check", "reports (no live requests)")
        assert final.status == "promoted", f"{final.status}: {final.reason}"
        assert final.report["quality"]["agreement_at_k"] >= 0.9
        assert hil.wait_active(record.version).last_error is None
        return

    shopper = Shopper(hil.http, hil.artifacts.history_codes(16))
    shopper.start()
    final = None
    try:
        shopper.wait_count(incumbent, 10, timeout=30)
        final = hil.deploy(record)
        hil_record.deployment(final)
        if final.status == "promoted":
            shopper.wait_count(record.version, 20, timeout=30)
    finally:
        shopper.stop_event.set()
        shopper.join(10)
        _record_requests(hil_record, shopper)  # the figures land in the report even when a check fails
    assert final.status == "promoted", f"{final.status}: {final.reason}\n{hil.diagnostics(final.deployment_id)}"
    assert shopper.failures == [], shopper.failures[:10]
    first_new = shopper.versions.index(record.version)
    assert set(shopper.versions[:first_new]) == {incumbent}, sorted(set(shopper.versions[:first_new]))
    assert set(shopper.versions[first_new:]) == {record.version}, "the old model answered after the new one had"


def _record_requests(hil_record, shopper: Shopper) -> None:
    with shopper.lock:
        lat = sorted(shopper.latencies_ms)
        requests, failures = len(shopper.versions) + len(shopper.failures), len(shopper.failures)
    hil_record.figure("serving_check", "live requests to the device's HTTP API")
    hil_record.figure("requests", requests)
    hil_record.figure("failed_requests", failures)
    hil_record.figure("client_p99_ms", round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None)
    hil_record.figure("client_max_ms", round(lat[-1], 3) if lat else None)
