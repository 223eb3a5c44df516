"""The agents inside the arm64 userland: start, stop and restart them by device id, across processes.

Each running agent has a state file `<run_dir>/<device>.json` (pid, command, ports, log), so the
HIL suite's restart hook (`python -m hil_tests.arm64 restart --device ID`, a separate process, as
`ssh pi sudo systemctl restart ...` would be) can stop the agent the runner started and start it
again. A pid is only signalled while its command line still names the device (no stale-pid kills).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hil_tests.arm64.rootfs import ArmProfile, Userland
from server.local_agent import AgentProcessError, read_log_tail, wait_until_ready

_LOGGER = logging.getLogger(__name__)

GUEST_STATE = "/var/lib/edgeguide-agent"
GUEST_KEY = "/etc/edgeguide/server_ed25519.pub.pem"
READY_TIMEOUT_S = 240.0  # an emulated Python importing numpy + the runtime takes seconds to tens of seconds
STOP_TIMEOUT_S = 30.0  # the systemd unit's TimeoutStopSec


class DeviceError(RuntimeError):
    """An emulated agent could not be started or stopped; the message carries its log tail."""


@dataclass(frozen=True)
class AgentRun:
    """How one emulated device's agent is run (all paths but `log` are guest paths)."""

    profile: str
    device_id: str
    venv: str
    broker_url: str
    http_port: int
    measure_mode: str
    log: str
    heartbeat_s: float = 5.0

    def argv(self, start_number: int) -> list[str]:
        state = f"{GUEST_STATE}/{self.device_id}"
        return [f"{self.venv}/bin/edgeguide-agent", "--device-id", self.device_id, "--broker", self.broker_url,
                "--state-dir", state, "--server-key", GUEST_KEY, "--http-port", str(self.http_port),
                "--measure-mode", self.measure_mode, "--heartbeat-s", str(self.heartbeat_s),
                "--once-ready-file", f"{state}.ready.json",
                "--debug-modules-file", f"{state}.modules-{start_number}.txt"]


def _state_file(run_dir: Path, device_id: str) -> Path:
    return run_dir / f"{device_id}.json"


def _alive(pid: int, device_id: str) -> bool:
    """The pid runs (not a zombie) and is still this device's agent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X") and device_id.encode() in cmdline


def start(land: Userland, run: AgentRun, run_dir: Path) -> int:
    """Start the agent in the chroot and wait until it is connected and serving; returns its pid."""
    state_path = _state_file(run_dir, run.device_id)
    previous = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if previous.get("pid") and _alive(previous["pid"], run.device_id):
        raise DeviceError(f"agent {run.device_id} already runs as pid {previous['pid']}")
    number = int(previous.get("starts", 0))
    guest_state = f"{GUEST_STATE}/{run.device_id}"
    ready = land.host_path(f"{guest_state}.ready.json")
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    cmd = land.command(run.argv(number))
    log = Path(run.log)
    with open(log, "ab") as out:
        out.write(f"\n# hil-arm64: starting {' '.join(run.argv(number))}\n".encode())
        out.flush()
        # Its own session: the agent outlives the restart command that started it, like a service.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    state_path.write_text(json.dumps({**asdict(run), "pid": proc.pid, "starts": number + 1}, indent=1) + "\n")
    try:
        wait_until_ready(proc, ready, READY_TIMEOUT_S, f"{run.device_id} (arm64 {run.profile})", log)
    except AgentProcessError as exc:
        stop(run_dir, run.device_id)
        raise DeviceError(str(exc)) from exc
    return proc.pid


def stop(run_dir: Path, device_id: str, timeout: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM the device's agent (it publishes offline and exits), SIGKILL after `timeout`; its pid or None."""
    state_path = _state_file(run_dir, device_id)
    if not state_path.is_file():
        return None
    pid = json.loads(state_path.read_text()).get("pid")
    if not pid or not _alive(pid, device_id):
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid, device_id):
        if time.monotonic() > deadline:
            _LOGGER.warning("agent %s (pid %d) ignored SIGTERM for %.0f s; killing it", device_id, pid, timeout)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.1)
    return pid


def restart(land: Userland, run_dir: Path, device_id: str) -> int:
    """Stop and start again with the recorded settings (the suite's restart hook)."""
    state_path = _state_file(run_dir, device_id)
    if not state_path.is_file():
        raise DeviceError(f"no running arm64 device {device_id} recorded in {run_dir}")
    recorded = json.loads(state_path.read_text())
    run = AgentRun(**{k: recorded[k] for k in AgentRun.__dataclass_fields__})
    stop(run_dir, device_id)
    return start(land, run, run_dir)


def log_tail(run: AgentRun, chars: int = 3000) -> str:
    return read_log_tail(Path(run.log), chars)


def imported_modules(land: Userland, device_id: str) -> dict[str, list[str]]:
    """Per exited agent process, the heavy (TensorFlow) modules it imported: the proof it never did."""
    heavy = ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization")
    found = {}
    for path in sorted(land.host_path(GUEST_STATE).glob(f"{device_id}.modules-*.txt")):
        found[path.name] = [m for m in path.read_text().split() if m.split(".")[0] in heavy]
    return found


def profile_run(profile: ArmProfile, broker_url: str, http_port: int, mode: str, log_dir: Path) -> AgentRun:
    return AgentRun(profile=profile.name, device_id=profile.device_id, venv=profile.venv, broker_url=broker_url,
                    http_port=http_port, measure_mode=mode, log=str(log_dir / f"{profile.device_id}.log"))
