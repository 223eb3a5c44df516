"""A real agent process started inside an emulated link's device namespace."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hil_tests.netlink.netns import EmulatedLink
from server.local_agent import LocalAgent

_LOGGER = logging.getLogger(__name__)


class NamespacedAgent(LocalAgent):
    """`python -m agent` in the link's device namespace, reaching the broker only through the link.

    Its local HTTP API listens inside that namespace: callers check the device through the server
    (registry, retained state), as a remote device would be checked.
    """

    def __init__(self, link: EmulatedLink, device_id: str, state_dir: Path, server_key: Path, **kwargs: Any) -> None:
        super().__init__(device_id, link.device_url, state_dir, server_key, **kwargs)
        self.link = link

    def command(self) -> list[str]:
        return [*self.link.device_prefix, *super().command()]
