"""Text a device controls (its last error, deployment reasons, event details) reaches the operator's
listings literally: never read as rich markup (a stray `[/x]` once crashed `devices` on a terminal),
never as terminal control sequences (an ANSI escape from a device could clear or retitle the screen).

The real `edgeguide-server` runs in a subprocess on a real registry, once with stdout a pipe and once
on a real pseudo-terminal (so rich draws its tables as it would for a person).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from server.registry import Registry

REPO = Path(__file__).resolve().parents[1]
# rich markup (a bad closing tag, a link), then a screen clear, an OSC window title ended by BEL, a C1 CSI.
EVIL = "bad [/x] reason [link=http://evil]x[/link] \x1b[2J\x1b]0;pwned\x07 \x9b31m end"
SHOWN = "bad [/x] reason [link=http://evil]x[/link] \\x1b[2J\\x1b]0;pwned\\x07 \\x9b31m end"
# What rich itself writes on a terminal: colours and bold (SGR). Anything else with ESC came from the data.
_RICH_STYLE = re.compile(r"\x1b\[[0-9;]*m")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEGUIDE_") and k not in ("NO_COLOR", "TERM")}
    return {**env, "PYTHONPATH": str(REPO), "TERM": "xterm-256color"}


def _piped(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "server", "--data-dir", str(data_dir), *args], cwd=REPO,
                          capture_output=True, timeout=120, env={**_env(), "COLUMNS": "300"})
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout!r}\n{done.stderr!r}"
    assert b"Traceback" not in done.stderr, done.stderr
    return done


def _on_terminal(data_dir: Path, *args: str) -> str:
    """stdout on a real 300-column pseudo-terminal; returns what the terminal received, rich's styling removed."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 300, 0, 0))
    attrs = termios.tcgetattr(follower)
    attrs[1] &= ~termios.ONLCR  # keep "\n" as written (no "\r\n" translation)
    termios.tcsetattr(follower, termios.TCSANOW, attrs)
    proc = subprocess.Popen([sys.executable, "-m", "server", "--data-dir", str(data_dir), *args], cwd=REPO,
                            stdout=follower, stderr=subprocess.PIPE, env=_env())
    os.close(follower)
    received = bytearray()
    try:
        while True:
            try:
                block = os.read(leader, 65536)
            except OSError as exc:  # EIO: the child closed the terminal
                if exc.errno != errno.EIO:
                    raise
                break
            if not block:
                break
            received += block
    finally:
        os.close(leader)
    stderr = proc.stderr.read() if proc.stderr else b""
    assert proc.wait(timeout=120) == 0, f"{args}: exit {proc.returncode}\n{bytes(received)!r}\n{stderr!r}"
    assert b"Traceback" not in stderr, stderr
    return _RICH_STYLE.sub("", received.decode())


def _assert_literal(text: str) -> None:
    assert SHOWN in text, text
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text, repr(text)


@pytest.fixture
def hostile_registry(tmp_path: Path, tiny_artifact: Path) -> tuple[Path, str]:
    """A registry whose device reported EVIL as its error, a deployment reason and an event detail."""
    data_dir = tmp_path / "data"
    registry = Registry(data_dir)
    try:
        registry.upsert_device("dev-1", status="online", last_error=EVIL)
        artifact = registry.register(tiny_artifact, model_id="tiny")
        dep = registry.create_deployment(artifact, "dev-1", chunk_size=65536, policy=None, deadline_s=600)
        registry.update_deployment(dep.deployment_id, status="failed", reason=EVIL)
        registry.log_event("agent_error", device_id="dev-1", deployment_id=dep.deployment_id, detail=EVIL)
    finally:
        registry.close()
    return data_dir, dep.deployment_id


def test_device_text_is_literal_piped_and_on_a_terminal(hostile_registry: tuple[Path, str]) -> None:
    data_dir, dep_id = hostile_registry
    for args in (["devices"], ["deployments"], ["deployments", "show", dep_id], ["logs"]):
        _assert_literal(_piped(data_dir, *args).stdout.decode())
        on_terminal = _on_terminal(data_dir, *args)
        _assert_literal(on_terminal)
        if args[-1] in ("devices", "deployments"):
            assert "━" in on_terminal or "─" in on_terminal, on_terminal  # rich drew a table, as for a person
    # JSON keeps the exact text (json escapes the control characters itself).
    devices = json.loads(_piped(data_dir, "devices", "--json").stdout)
    assert devices[0]["last_error"] == EVIL
    raw = _piped(data_dir, "logs", "--json").stdout
    assert b"\x1b" not in raw
    assert [json.loads(line)["detail"] for line in raw.splitlines()][-1] == EVIL
