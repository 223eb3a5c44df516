"""Which chunks to publish next: a window of chunks in flight per deployment, not the whole model.

The device acknowledges progress by naming the chunks it still misses (a `need_chunks` event with
reason `progress` every few chunks, `manifest_accepted` at the start). A chunk the server has sent
(it has an entry in the deployment's `resends` map, kept in the registry) that the device still
misses is in flight. The server tops the window up with chunks never sent; it sends an in-flight
chunk again only when the device says the transfer stalled, or after a fresh manifest (a restarted
server or device), never because the device reconnected: its persistent session already holds
them at the broker, so re-sending would put every in-flight chunk on the link twice.

The window is a byte budget (`DeployerConfig.window_bytes`) sized to the round trip of the links
served: it must cover the bandwidth-delay product plus the acknowledgement interval, e.g. 2 MiB
covers 100 Mbit/s at 160 ms. It also bounds how much sits queued at the broker for a device whose
link just went down, which is what a resumed transfer may see twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from protocol.states import NeedChunksReason

_LOGGER = logging.getLogger(__name__)

# need_chunks reasons after which the device is waiting for chunks the server believes in flight.
RESEND_REASONS = frozenset({NeedChunksReason.STALLED, NeedChunksReason.CHUNK_REJECTED})


@dataclass(frozen=True)
class Plan:
    """Chunks to publish now: `again` were sent before, `fresh` never."""

    again: list[int]
    fresh: list[int]
    in_flight: int

    @property
    def indices(self) -> list[int]:
        return sorted(self.again + self.fresh)


def window_chunks(window_bytes: int, chunk_size: int) -> int:
    """Chunks in the window: the byte budget in whole chunks, at least 4 (so acks can overlap sends)."""
    return max(4, window_bytes // chunk_size)


def plan(missing: Iterable[int], sent: Mapping[str, int], window: int, *, resend: bool) -> Plan:
    """What to send for a device missing `missing`, given the chunks `sent` so far (index -> re-sends)."""
    wanted = sorted(set(missing))
    outstanding = [i for i in wanted if str(i) in sent]
    never = [i for i in wanted if str(i) not in sent]
    again = outstanding[:window] if resend else []
    room = max(0, window - len(outstanding))
    return Plan(again=again, fresh=never[:room], in_flight=len(outstanding))
