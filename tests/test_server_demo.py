"""The demo end to end on a data slice, and that it leaves no process behind (also on Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from server.demo import DemoOptions, run_demo

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_demo_runs_the_whole_loop_and_stops_what_it_started(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    before = _children()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the demo's temporary work dir goes here
    console = Console(record=True, width=400, force_terminal=False)
    code = run_demo(DemoOptions(max_customers=200, train_overrides={"epochs": 1, "dim": 16, "hidden": 32}),
                    console=console)
    text = console.export_text()
    # No --keep: the temporary work dir is gone and the demo printed no path inside it.
    assert list(tmp_path.glob("edgeguide-demo-*")) == []
    assert str(tmp_path) not in text and "pass --keep" in text
    assert code == 0, text[-3000:]
    for expected in ("data: 200 customers", "popularity baseline", "item-to-item (tuned on val)", "int8 (deployed)",
                     "smaller on disk", "promoted", "latency p50 / p90 / p99", "peak RSS", "energy source",
                     "top-K agreement", "Gate verdict: PASS", "POST /recommend"):
        assert expected in text, f"{expected!r} missing from the demo output"
    assert _children() <= before, "the demo left child processes running"


def test_ctrl_c_during_the_demo_stops_the_agent_and_the_broker_and_keep_keeps_the_files(tmp_path: Path) -> None:
    # the full measurement mode (a >= 60 s timed run on the device) keeps the demo busy after its agent is up
    # (quick mode: ~2 s from there to the end). preexec: a shell that starts the suite in the background
    # (`... &`) hands its children SIGINT ignored, which Python keeps; the demo must get a terminal's Ctrl-C
    proc = subprocess.Popen([sys.executable, "-m", "server", "demo", "--max-customers", "200", "--keep",
                             "--measure-mode", "full"],
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "TMPDIR": str(tmp_path), "COLUMNS": "400"})
    try:
        deadline = time.monotonic() + 300
        while not (found := list(tmp_path.glob("edgeguide-demo-*/agent-state.ready.json"))):
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the demo never started its agent"
            time.sleep(0.1)
        ready = found[0]
        agent_pid = json.loads(ready.read_text())["pid"]
        helpers = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert agent_pid in helpers and len(helpers) >= 2  # the agent and the embedded broker
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    for pid in helpers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, \
            f"pid {pid} survived the demo's Ctrl-C"
    output = proc.stdout.read().decode(errors="replace")
    assert proc.returncode == 130, output[-3000:]  # "interrupted"
    # --keep: the temporary work dir stays, and the demo says where.
    assert f"demo files kept in {ready.parent}" in output and (ready.parent / "agent.log").is_file()
