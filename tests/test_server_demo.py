"""The demo end to end on a data slice, and that it leaves no process behind (also on Ctrl-C)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
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


def test_demo_runs_the_whole_loop_and_stops_what_it_started(tmp_path: Path) -> None:
    before = _children()
    console = Console(record=True, width=140, force_terminal=False)
    code = run_demo(DemoOptions(max_customers=200, workdir=tmp_path,
                                train_overrides={"epochs": 1, "dim": 16, "hidden": 32}), console=console)
    text = console.export_text()
    assert code == 0, text[-3000:]
    for expected in ("data: 200 customers", "popularity baseline", "item-to-item (tuned on val)", "int8 (deployed)",
                     "smaller on disk", "promoted", "latency p50 / p90 / p99", "peak RSS", "energy source",
                     "top-K agreement", "Gate verdict: PASS", "POST /recommend"):
        assert expected in text, f"{expected!r} missing from the demo output"
    assert _children() <= before, "the demo left child processes running"
    assert (tmp_path / "agent.log").exists() and list((tmp_path / "server" / "reports").iterdir())


def test_ctrl_c_during_the_demo_stops_the_agent_and_the_broker(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "server", "demo", "--max-customers", "200", "--workdir",
                             str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ready = tmp_path / "agent-state.ready.json"
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the demo never started its agent"
            time.sleep(0.1)
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
    assert proc.returncode == 130, proc.stdout.read().decode(errors="replace")[-3000:]  # "interrupted"
