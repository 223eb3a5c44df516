"""Message decoding derived from the dataclass fields (protocol.schema.decode_fields)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from protocol import messages, names
from protocol.errors import ProtocolError
from protocol.schema import decode_fields, wire


@dataclass(frozen=True)
class Sample:
    device_id: str = field(metadata=wire(check=names.device_id))
    size: int = field(metadata=wire(lo=1, hi=10))
    digests: list[str] = field(metadata=wire(max_len=2, item_check=names.sha256_hex))
    rows: list[dict] = field(default_factory=list)
    ids: list[int] | None = None
    label: str = field(default="", metadata=wire(choices=frozenset({"", "a"})))
    created: str = field(default="now", metadata=wire(required=True, max_len=8))
    ts: float = field(default_factory=time.time, metadata=wire(missing=0.0))
    flag: bool = False


GOOD = {"device_id": "pi-1", "size": 3, "digests": ["a" * 64], "created": "t0"}


def test_types_defaults_and_missing_values() -> None:
    values = decode_fields(Sample, GOOD, "sample")
    assert values == {"device_id": "pi-1", "size": 3, "digests": ["a" * 64], "rows": [], "ids": None, "label": "",
                      "created": "t0", "ts": 0.0, "flag": False}
    assert Sample(**values).ts == 0.0  # absent on the wire: not the decoding time


@pytest.mark.parametrize(("change", "error"), [
    ({"size": 0}, r"sample.size: expected an integer in \[1, 10\], got 0"),
    ({"size": True}, "sample.size: expected an integer"),
    ({"device_id": "../x"}, "device id"),
    ({"digests": ["a" * 64] * 3}, "sample.digests: expected a list of at most 2 items"),
    ({"digests": ["zz"]}, "sha256"),
    ({"rows": [1]}, "sample.rows: expected a list of objects"),
    ({"ids": [1, -2]}, "sample.ids: expected integers"),
    ({"label": "b"}, r"sample.label: expected one of \['', 'a'\]"),
    ({"created": None}, "sample: missing required field 'created'"),
    ({"created": "x" * 9}, "sample.created: expected a string of at most 8 chars"),
    ({"ts": float("inf")}, "sample.ts: expected a finite number"),
    ({"flag": 1}, "sample.flag: expected true or false"),
])
def test_each_rule_names_the_field(change: dict, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_fields(Sample, {**GOOD, **change}, "sample")


def test_every_message_is_declared_once() -> None:
    """No message class carries its own from_dict: the fields are the schema."""
    for cls in (messages.Manifest, messages.Verdict, messages.Command, messages.DeviceState, messages.Heartbeat,
                messages.Event, messages.Report):
        assert "from_dict" not in vars(cls), cls.__name__


def test_manifest_cross_field_rules_still_hold() -> None:
    body = {"deployment_id": "d-0123456789ab", "device_id": "pi-1", "model_id": "m", "version": 1,
            "total_size": 10, "sha256": "a" * 64, "chunk_size": 4, "chunk_sha256": ["b" * 64] * 3,
            "created": "2026-01-01T00:00:00+00:00"}
    assert messages.Manifest.from_dict(body).chunk_count == 3
    with pytest.raises(ProtocolError, match=r"manifest.chunk_count 4 != 3"):
        messages.Manifest.from_dict({**body, "chunk_count": 4})
    with pytest.raises(ProtocolError, match="2 chunk digests for 10 bytes"):
        messages.Manifest.from_dict({**body, "chunk_sha256": ["b" * 64] * 2})
