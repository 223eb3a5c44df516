"""The shared helpers of protocol/: atomic file writes, JSON sanitising and backoff."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from protocol.backoff import Backoff
from protocol.files import atomic_write, atomic_write_json, temp_name
from protocol.jsonsafe import dumps_compact, json_safe


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "active.json"
    target.write_bytes(b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["active.json"]


def test_atomic_write_failure_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_temp_names_are_unique_hidden_siblings(tmp_path: Path) -> None:
    target = tmp_path / "registry.json"
    names = {temp_name(target) for _ in range(200)}
    assert len(names) == 200
    assert all(n.parent == tmp_path and n.name.startswith(".registry.json.") for n in names)


def test_concurrent_writers_never_leave_a_mixed_file(tmp_path: Path) -> None:
    """Two writers with a fixed temp name could rename each other's half-written file into place."""
    target = tmp_path / "shared.json"
    payloads = [json.dumps({"writer": i, "pad": "x" * 50_000}).encode() for i in range(4)]

    def write(data: bytes) -> None:
        for _ in range(20):
            atomic_write(target, data, durable=False)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_bytes() in payloads
    assert os.listdir(tmp_path) == ["shared.json"]


def test_atomic_write_json_refuses_nan(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.json").read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}'
    with pytest.raises(ValueError, match="Out of range float"):
        atomic_write_json(tmp_path / "n.json", {"x": math.nan})
    assert not (tmp_path / "n.json").exists()


def test_json_safe_converts_numpy_and_unavailable_figures() -> None:
    figures = {"p50": np.float32(1.5), "bad": float("nan"), "inf": np.float64("inf"), "ids": np.arange(3),
               "pair": (1, 2.0), np.int64(7): "numpy key", 3: "int key", "ok": None, "flag": True}
    clean = json_safe(figures)
    assert clean == {"p50": 1.5, "bad": None, "inf": None, "ids": [0, 1, 2], "pair": [1, 2.0], "7": "numpy key",
                     3: "int key", "ok": None, "flag": True}
    assert type(clean["p50"]) is float
    assert json.loads(dumps_compact(figures))["3"] == "int key"
    kept = json_safe({"x": [np.float32("nan")]}, nonfinite_to_none=False)
    assert math.isnan(kept["x"][0])


def test_dumps_compact_is_the_wire_form() -> None:
    assert dumps_compact({"a": [1, None], "b": float("-inf")}) == b'{"a":[1,null],"b":null}'


def test_backoff_doubles_to_the_cap_and_resets() -> None:
    b = Backoff(1.0, 10.0)
    assert [b.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    b.reset()
    assert b.next() == 1.0


def test_backoff_jitter_stays_in_its_band_and_does_not_compound() -> None:
    b = Backoff(2.0, 8.0, jitter=0.2)
    delays = [b.next() for _ in range(50)]
    assert 1.6 <= delays[0] <= 2.4 and 3.2 <= delays[1] <= 4.8
    assert all(6.4 <= d <= 9.6 for d in delays[2:])
    assert b.current == 8.0


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"initial": 5, "maximum": 1}, {"factor": 0.5},
                                    {"jitter": 1.0}])
def test_backoff_refuses_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**{"initial": 1.0, "maximum": 10.0, **kwargs})
