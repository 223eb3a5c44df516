"""Link profiles: descriptions of a device's network, turned into tc and relay settings by netns.py."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkProfile:
    """One emulated link. Delays are per round trip; `cut_after_bytes` counts downstream bytes.

    stalls: every `stall_every_s` on average (exponential gaps, seeded) the link holds all data for
    `stall_ms` in both directions: how packet loss shows up above TCP (a retransmission pause).
    cut: once `cut_after_bytes` have gone down the link, every connection through it is dropped and
    new ones are refused for `cut_s` seconds (a Wi-Fi/LTE link that goes away and comes back).
    """

    name: str
    rate_mbit: float
    rtt_ms: float
    jitter_ms: float = 0.0
    stall_every_s: float = 0.0
    stall_ms: float = 0.0
    cut_after_bytes: int = 0
    cut_s: float = 0.0
    seed: int = 17

    def __post_init__(self) -> None:
        if self.rate_mbit <= 0:
            raise ValueError(f"profile {self.name!r}: rate_mbit must be > 0, got {self.rate_mbit}")
        if self.rtt_ms < 0 or self.jitter_ms < 0 or self.stall_ms < 0 or self.cut_s < 0:
            raise ValueError(f"profile {self.name!r}: delays must be >= 0")
        if self.jitter_ms > self.rtt_ms / 2:
            raise ValueError(f"profile {self.name!r}: jitter_ms {self.jitter_ms} exceeds half the RTT {self.rtt_ms}")
        if (self.stall_every_s > 0) != (self.stall_ms > 0):
            raise ValueError(f"profile {self.name!r}: set both stall_every_s and stall_ms, or neither")
        if (self.cut_after_bytes > 0) != (self.cut_s > 0):
            raise ValueError(f"profile {self.name!r}: set both cut_after_bytes and cut_s, or neither")

    @property
    def has_cut(self) -> bool:
        return self.cut_s > 0

    def without_cut(self) -> LinkProfile:
        """The same link with no cut (the raw runs measure the link's rate, not the outage)."""
        return replace(self, cut_after_bytes=0, cut_s=0.0)

    def with_cut(self, after_bytes: int, seconds: float) -> LinkProfile:
        return replace(self, cut_after_bytes=after_bytes, cut_s=seconds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The profiles: a home/shop Wi-Fi, a mobile LTE link, and a poor rural link with one outage.
# `poor`'s cut position is set per run (the middle of the transfer being measured).
PROFILES: dict[str, LinkProfile] = {
    "wifi": LinkProfile("wifi", rate_mbit=20.0, rtt_ms=40.0, jitter_ms=4.0),
    "lte": LinkProfile("lte", rate_mbit=5.0, rtt_ms=80.0, jitter_ms=10.0, stall_every_s=4.0, stall_ms=200.0),
    "poor": LinkProfile("poor", rate_mbit=1.0, rtt_ms=200.0, jitter_ms=20.0, stall_every_s=3.0, stall_ms=300.0,
                        cut_after_bytes=1, cut_s=30.0),
}


def profile(name: str) -> LinkProfile:
    """A named profile; ValueError naming the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown link profile {name!r}; known: {sorted(PROFILES)}") from None
