"""MQTT topic layout: one subtree per device, commands down and status up.

`edgeguide/dev/<device>/down/<kind>` is written by the server only and read by that device;
`edgeguide/dev/<device>/up/<kind>` is written by that device only. This split is what the broker
ACL (deploy/mosquitto/acl.template) enforces with `%u` patterns.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol import names
from protocol.errors import ProtocolError

DOWN_KINDS = frozenset({"manifest", "chunk", "verdict", "command"})
UP_KINDS = frozenset({"state", "heartbeat", "event", "report"})
SHARED_GROUP = "edgeguide-servers"


@dataclass(frozen=True)
class TopicRef:
    """A parsed device topic."""

    device_id: str
    direction: str
    kind: str


@dataclass(frozen=True)
class Topics:
    """Builds and parses the topics of one deployment prefix."""

    prefix: str = "edgeguide"

    def __post_init__(self) -> None:
        parts = self.prefix.split("/")
        if not self.prefix or any(not p or p in {"+", "#"} or "$" in p for p in parts):
            raise ProtocolError(f"invalid topic prefix {self.prefix!r}")

    def down(self, device_id: str, kind: str) -> str:
        """Topic the server publishes `kind` on for `device_id`."""
        if kind not in DOWN_KINDS:
            raise ProtocolError(f"unknown down kind {kind!r}; expected one of {sorted(DOWN_KINDS)}")
        return f"{self.prefix}/dev/{names.device_id(device_id)}/down/{kind}"

    def up(self, device_id: str, kind: str) -> str:
        """Topic `device_id` publishes `kind` on."""
        if kind not in UP_KINDS:
            raise ProtocolError(f"unknown up kind {kind!r}; expected one of {sorted(UP_KINDS)}")
        return f"{self.prefix}/dev/{names.device_id(device_id)}/up/{kind}"

    def device_down_filter(self, device_id: str) -> str:
        """Subscription filter for everything sent to one device."""
        return f"{self.prefix}/dev/{names.device_id(device_id)}/down/+"

    def all_up_filter(self) -> str:
        """Subscription filter for everything all devices send."""
        return f"{self.prefix}/dev/+/up/+"

    def shared_up_filter(self, kind: str = "+", group: str = SHARED_GROUP) -> str:
        """MQTT 5 shared subscription so several server processes split device traffic."""
        return f"$share/{group}/{self.prefix}/dev/+/up/{kind}"

    def parse(self, topic: str) -> TopicRef:
        """Split a device topic into device id, direction and kind, validating each."""
        head = f"{self.prefix}/dev/"
        if not topic.startswith(head):
            raise ProtocolError(f"topic {topic!r} is not under {head!r}")
        rest = topic[len(head):].split("/")
        if len(rest) != 3 or rest[1] not in {"up", "down"}:
            raise ProtocolError(f"topic {topic!r} is not <prefix>/dev/<device>/<up|down>/<kind>")
        device, direction, kind = rest
        kinds = UP_KINDS if direction == "up" else DOWN_KINDS
        if kind not in kinds:
            raise ProtocolError(f"topic {topic!r} has unknown {direction} kind {kind!r}")
        return TopicRef(names.device_id(device), direction, kind)
