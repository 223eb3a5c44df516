"""An unanswered report is re-sent after growing waits, so a slow server is not buried in retries.

With a fixed interval, 10,000 devices waiting on a server that is behind re-send 10,000 reports
every interval, which only puts it further behind. The schedule here is the device link's own
(no broker needed: re-sends while disconnected are only scheduled).
"""

from __future__ import annotations

import time

from agent.config import AgentConfig
from agent.health import Health
from agent.link import REPORT_RESEND_MAX_FACTOR, DeviceLink


def _waits(link: DeviceLink, resends: int) -> list[float]:
    waits = []
    for _ in range(resends):
        due = link.resend_due_in()
        assert due is not None
        waits.append(due)
        link.resend_report("no verdict yet")
    return waits


def test_resend_waits_double_with_jitter_up_to_a_cap_and_restart_for_the_next_report() -> None:
    link = DeviceLink(AgentConfig(device_id="pi-resend"), Health("pi-resend"), report_resend_s=10.0)
    link.hold_report("d-1", b"{}")
    waits = _waits(link, 7)
    nominal = [10.0 * min(2 ** n, REPORT_RESEND_MAX_FACTOR) for n in range(7)]
    for wait, expected in zip(waits, nominal, strict=True):
        assert 0.8 * expected - 0.1 <= wait <= 1.2 * expected, (waits, nominal)
    assert max(waits) <= 1.2 * 10.0 * REPORT_RESEND_MAX_FACTOR
    assert waits[3] > 2 * 1.2 * 10.0  # it grows: the 4th wait is well past twice the first's largest
    # The verdict came: nothing is due; a new report starts again from report_resend_s.
    link.drop_report()
    assert link.resend_due_in() is None
    link.hold_report("d-2", b"{}")
    again = link.resend_due_in()
    assert again is not None and 0.8 * 10.0 - 0.1 <= again <= 12.0


def test_a_due_report_is_rescheduled_not_repeated_in_a_tight_loop() -> None:
    link = DeviceLink(AgentConfig(device_id="pi-due"), Health("pi-due"), report_resend_s=0.05)
    link.hold_report("d-1", b"{}")
    time.sleep(0.1)
    link.resend_if_due()  # due: re-sent (not connected here, so only rescheduled)
    first = link.resend_due_in()
    assert first is not None and first > 0.05
    link.resend_if_due()  # not due again yet
    assert link.resend_due_in() <= first
