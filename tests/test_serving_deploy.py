"""Device install files: the example config loads, the systemd unit is hardened, the Termux script supervises.

The Termux test runs the real boot script under /bin/sh against the real agent and broker; only
`termux-wake-lock`/`termux-wake-unlock`, which exist on Android alone, are recording stand-ins.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from agent.config import load_config
from protocol import signing
from server.mosquitto import free_port

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "systemd" / "edgeguide-agent.service"
TERMUX_SCRIPT = REPO / "deploy" / "termux" / "edgeguide-agent"
EXAMPLE = REPO / "deploy" / "agent.example.toml"


def _public_key(path: Path) -> Path:
    signing.save_public_key(signing.generate_private_key().public_key(), path)
    return path


def test_example_config_sets_every_key_and_loads(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("placeholder: load_config only checks that the file exists\n")
    config = load_config(EXAMPLE, {"server_key": str(_public_key(tmp_path / "server.pem")), "tls_ca": str(ca)},
                         env={})
    assert config.http_host == "127.0.0.1" and config.http_port == 8700
    assert config.device_id == "pi5-kitchen" and config.broker_url.startswith("mqtts://")
    assert config.password is None  # secrets belong in the env file, not the example


def _unit_directives(path: Path) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = defaultdict(list)
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            directives[key.strip()].append(value.strip())
    return directives


def test_systemd_unit_restarts_on_failure_as_a_dedicated_hardened_user() -> None:
    unit = _unit_directives(UNIT)
    assert unit["Restart"] == ["on-failure"] and unit["RestartPreventExitStatus"] == ["2"]
    assert unit["User"] == ["edgeguide"] and unit["KillSignal"] == ["SIGTERM"]
    assert unit["StateDirectory"] == ["edgeguide-agent"]
    assert "EDGEGUIDE_STATE_DIR=/var/lib/edgeguide-agent" in unit["Environment"]
    assert unit["ExecStart"][0].startswith("/opt/edgeguide/venv/bin/edgeguide-agent --config ")
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": "", "RestrictSUIDSGID": "yes"}.items():
        assert unit[key] == [value], key
    assert "password" not in UNIT.read_text().lower().replace("edgeguide_password=...", "")


# ------------------------------------------------------------------------------ Termux supervisor
def _termux_env(tmp_path: Path, config: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("termux-wake-lock", "termux-wake-unlock"):
        stub = bin_dir / name
        stub.write_text(f"#!/bin/sh\necho {name} >> {tmp_path / 'wake.log'}\n")
        stub.chmod(0o755)
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    agent = venv_bin / "edgeguide-agent"
    agent.write_text(f'#!/bin/sh\nexec {sys.executable} -m agent "$@"\n')
    agent.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEGUIDE_")}
    env.update({
        "HOME": str(tmp_path / "home"), "PATH": f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(REPO), "EDGEGUIDE_VENV": str(tmp_path / "venv"), "EDGEGUIDE_CONFIG": str(config),
        "EDGEGUIDE_RESTART_DELAY_S": "1",
    })
    return env


def _script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", str(TERMUX_SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def _wait_for(predicate, timeout: float, what: str, log: Path) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    text = log.read_text() if log.exists() else "<no log>"
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; log tail:\n{text[-3000:]}")


def _healthz(port: int) -> tuple[int, dict] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return None


@pytest.mark.network
@pytest.mark.slow
def test_termux_script_restarts_a_crashed_agent_and_stops_it_gracefully(mosquitto, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "phone-1"\nbroker_url = "{mosquitto.url}"\nserver_key = "{_public_key(tmp_path / "k.pem")}"\n'
        f'http_port = {port}\nheartbeat_s = 1.0\n')
    env = _termux_env(tmp_path, config)
    log = tmp_path / "home" / ".edgeguide" / "agent.log"
    with socket.socket() as squatter:  # the agent's port is taken: its first starts crash
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        started = _script(env, "start")
        assert started.returncode == 0 and "started" in started.stdout, started.stderr
        _wait_for(lambda: log.exists() and "event=agent_crashed rc=1" in log.read_text(), 60, "a crash", log)
    _wait_for(lambda: _healthz(port) is not None, 60, "the restarted agent's HTTP API", log)
    assert _healthz(port) == (503, {"status": "no_model", "model": None})
    assert _script(env, "status").stdout.startswith("running")
    assert "already running" in _script(env, "start").stdout
    assert (tmp_path / "home" / ".edgeguide" / "state").is_dir()  # the script's default state dir

    stopped = _script(env, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    text = log.read_text()
    assert "event=stopped rc=0" in text and "signal_received signal=SIGTERM" in text
    assert _healthz(port) is None
    assert _script(env, "status").returncode == 3
    assert (tmp_path / "wake.log").read_text().split() == ["termux-wake-lock", "termux-wake-unlock"]


def test_termux_script_gives_up_on_an_invalid_config(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "not a valid id!"\n')
    env = _termux_env(tmp_path, config)
    log = tmp_path / "home" / ".edgeguide" / "agent.log"
    assert _script(env, "start").returncode == 0
    _wait_for(lambda: log.exists() and "event=invalid_config rc=2" in log.read_text(), 60, "the exit-2 stop", log)
    _wait_for(lambda: _script(env, "status").returncode == 3, 10, "the supervisor to exit", log)
    assert "device_id" in log.read_text()  # the agent's own message says which key is wrong
