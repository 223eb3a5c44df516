"""Device targets behind one interface: an agent process on this machine, or a real device.

Only these drivers touch the device directly, and only to start, stop or restart its agent (the
one thing production does not do over MQTT). Everything a test checks goes through the broker and
the server (see rig.py), so the same test bodies run against both targets.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hil_tests.legacy_env import LegacyEnv
from hil_tests.profiles import LEGACY_ENV, DeviceProfile
from server.local_agent import AgentProcessError, read_log_tail, stop_process, wait_until_ready

_LOGGER = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization")
# A TensorFlow import maps files from its package directory (tflite_runtime's own
# _pywrap_tensorflow_interpreter_wrapper.so lives in tflite_runtime/ and does not match).
_TF_MAPPING = re.compile(r"/(tensorflow|tf_keras|keras|tensorflow_model_optimization)/|libtensorflow")
RESTART_FIX = "pass --hil-restart-cmd, e.g. --hil-restart-cmd 'ssh pi sudo systemctl restart edgeguide-agent'"


class TargetError(RuntimeError):
    """A target could not be started, restarted or set up as its profile says."""


class DeviceTarget(Protocol):
    """What the suite may do to a device besides talking to it over the broker."""

    kind: str
    device_id: str
    profile: str

    @property
    def http_url(self) -> str | None:
        """Base URL of the agent's recommendation API, or None if this machine cannot reach it."""

    @property
    def can_restart(self) -> bool:
        """Whether `restart` is possible (a remote target needs a restart command)."""

    def start(self) -> None:
        """Make sure the agent runs (a remote device is already running)."""

    def restart(self) -> None:
        """Stop and start the agent; returns once the restart was carried out (not once it is online)."""

    def stop(self) -> None:
        """Stop what `start` started."""

    def describe(self) -> dict:
        """Plain data for the HIL report."""

    def tensorflow_evidence(self) -> list[str] | None:
        """Signs that the agent process loaded TensorFlow ([] = none), or None when not observable."""

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the agent's log, when this machine has it."""


@dataclass(frozen=True)
class AgentSpec:
    """Everything a local agent is started with."""

    device_id: str
    broker_url: str
    topic_prefix: str
    server_key: Path
    workdir: Path
    measure_mode: str = "quick"
    heartbeat_s: float = 5.0


def _which(tool: str) -> str:
    found = shutil.which(tool)
    if not found:
        raise TargetError(f"{tool} not found on PATH; the pi4-like profile needs it (apt-get install util-linux)")
    return found


class LocalTarget:
    """An agent child process under a device profile (pinning, thread count, memory cap, venv)."""

    kind = "local"

    def __init__(self, profile: DeviceProfile, spec: AgentSpec, legacy: LegacyEnv | None = None) -> None:
        if profile.environment == LEGACY_ENV and legacy is None:
            raise TargetError(f"profile {profile.name!r} needs the legacy venv (hil_tests.legacy_env)")
        self.profile_spec = profile
        self.profile = profile.name
        self.spec = spec
        self.device_id = spec.device_id
        self.legacy = legacy
        self.cpu = max(os.sched_getaffinity(0)) if profile.pin_one_core else None
        self.state_dir = spec.workdir / "state"
        self.log_path = spec.workdir / "agent.log"
        self.ready_file = spec.workdir / "ready.json"
        self.proc: subprocess.Popen | None = None
        self.http_port: int | None = None
        self.starts = 0
        self.applied: dict = {}

    # -- process ------------------------------------------------------------------------------
    def _modules_file(self, n: int) -> Path:
        return self.spec.workdir / f"modules-{n}.txt"

    def command(self) -> list[str]:
        """The full command line: limit wrappers, then the agent exactly as a device runs it."""
        prefix: list[str] = []
        if self.cpu is not None:
            prefix += [_which("taskset"), "--cpu-list", str(self.cpu)]
        if self.profile_spec.address_space_bytes:
            prefix += [_which("prlimit"), f"--as={self.profile_spec.address_space_bytes}", "--"]
        agent = [str(self.legacy.agent)] if self.legacy else [sys.executable, "-m", "agent"]
        s = self.spec
        return [*prefix, *agent, "--device-id", s.device_id, "--broker", s.broker_url, "--state-dir",
                str(self.state_dir), "--server-key", str(s.server_key), "--topic-prefix", s.topic_prefix,
                "--http-port", "0", "--threads", str(self.profile_spec.threads), "--measure-mode", s.measure_mode,
                "--heartbeat-s", str(s.heartbeat_s), "--once-ready-file", str(self.ready_file),
                "--debug-modules-file", str(self._modules_file(self.starts))]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.legacy is not None:  # nothing of the project venv may leak into the legacy one
            for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
                env.pop(key, None)
            env["PYTHONNOUSERSITE"] = "1"
        env.update(self.profile_spec.env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, timeout: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise TargetError(f"agent {self.device_id} already running (pid {self.proc.pid})")
        self.spec.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"\n# hil: starting {' '.join(cmd)}\n".encode())
            log.flush()
            # cwd: the repo for `python -m agent` (the project venv has no install of it); the
            # legacy venv runs its installed `edgeguide-agent` from anywhere, like a device.
            self.proc = subprocess.Popen(cmd, cwd=str(self.spec.workdir if self.legacy else REPO), env=self._env(),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.starts += 1
        try:
            ready = wait_until_ready(self.proc, self.ready_file, timeout, f"{self.device_id} ({self.profile})",
                                     self.log_path)
        except AgentProcessError as exc:
            self.stop()
            raise TargetError(str(exc)) from exc
        self.http_port = int(ready["http_port"])
        self.applied = self._check_limits(self.proc.pid)
        _LOGGER.info("local agent %s (%s) running: pid %d, http %s, limits %s", self.device_id, self.profile,
                     self.proc.pid, self.http_url, self.applied)

    def _check_limits(self, pid: int) -> dict:
        """Read the limits back from the running process: a profile that did not apply must not pass."""
        cpus = sorted(os.sched_getaffinity(pid))
        soft, _hard = resource.prlimit(pid, resource.RLIMIT_AS)
        applied = {"pid": pid, "cpus": cpus, "address_space_bytes": None if soft == resource.RLIM_INFINITY else soft}
        if self.cpu is not None and cpus != [self.cpu]:
            raise TargetError(f"agent pid {pid} runs on CPUs {cpus}, profile {self.profile} pins it to [{self.cpu}]")
        cap = self.profile_spec.address_space_bytes
        if cap and applied["address_space_bytes"] != cap:
            raise TargetError(f"agent pid {pid} has RLIMIT_AS {soft}, profile {self.profile} caps it at {cap}")
        return applied

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the agent publishes its offline state and exits 0), SIGKILL after `timeout`."""
        proc, self.proc = self.proc, None
        return stop_process(proc, timeout, self.device_id)

    def restart(self) -> None:
        code = self.stop()
        if code not in (0, None):
            raise TargetError(f"agent {self.device_id} exited with code {code} on SIGTERM (expected 0); "
                              f"log:\n{self.log_tail()}")
        self.start()

    @property
    def can_restart(self) -> bool:
        return True

    @property
    def http_url(self) -> str | None:
        return f"http://127.0.0.1:{self.http_port}" if self.http_port else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    # -- evidence -----------------------------------------------------------------------------
    def tensorflow_evidence(self) -> list[str]:
        """TensorFlow files mapped by the running agent, and heavy modules of every agent that exited."""
        evidence = []
        pid = self.pid
        if pid is not None:
            try:
                maps = Path(f"/proc/{pid}/maps").read_text()
            except OSError as exc:
                evidence.append(f"cannot read /proc/{pid}/maps: {exc}")
            else:
                hits = sorted({line.split()[-1] for line in maps.splitlines() if _TF_MAPPING.search(line)})
                evidence += [f"pid {pid} maps {path}" for path in hits]
        for n in range(self.starts):
            path = self._modules_file(n)
            if path.is_file():
                heavy = [m for m in path.read_text().split() if m.split(".")[0] in HEAVY_MODULES]
                evidence += [f"agent run {n} imported {m}" for m in heavy]
        return evidence

    def modules_checked(self) -> int:
        """How many exited agent processes left their module list (proof needs at least one)."""
        return sum(1 for n in range(self.starts) if self._modules_file(n).is_file())

    def describe(self) -> dict:
        return {"kind": self.kind, "device_id": self.device_id, "profile": self.profile,
                "description": self.profile_spec.description, "constraints": self.profile_spec.constraints(),
                "applied": self.applied, "command": self.command(), "log": str(self.log_path),
                "legacy_env": self.legacy.versions if self.legacy else None}

    def log_tail(self, chars: int = 3000) -> str:
        return read_log_tail(self.log_path, chars)


class RemoteTarget:
    """A device already running `edgeguide-agent`; it can only be restarted by a configured command."""

    kind = "remote"

    def __init__(self, device_id: str, restart_cmd: str | None = None, http_url: str | None = None,
                 restart_timeout_s: float = 120.0, profile: str = "remote") -> None:
        self.profile = profile
        self.device_id = device_id
        self.restart_cmd = restart_cmd
        self._http_url = http_url.rstrip("/") if http_url else None
        self.restart_timeout_s = restart_timeout_s

    def start(self) -> None:
        _LOGGER.info("remote device %s: expecting its agent to be running already", self.device_id)

    def stop(self) -> None:
        """The device keeps running: it is not ours to stop."""

    def restart(self) -> None:
        if not self.restart_cmd:
            raise TargetError(f"remote device {self.device_id} has no restart hook; {RESTART_FIX}")
        _LOGGER.info("restarting remote device %s: %s", self.device_id, self.restart_cmd)
        try:
            proc = subprocess.run(self.restart_cmd, shell=True, capture_output=True, text=True,
                                  timeout=self.restart_timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TargetError(f"restart command {self.restart_cmd!r} did not finish within "
                              f"{self.restart_timeout_s:.0f} s") from exc
        if proc.returncode != 0:
            raise TargetError(f"restart command {self.restart_cmd!r} exited with code {proc.returncode}: "
                              f"stdout {proc.stdout.strip()[-1000:]!r} stderr {proc.stderr.strip()[-1000:]!r}")

    @property
    def can_restart(self) -> bool:
        return bool(self.restart_cmd)

    @property
    def http_url(self) -> str | None:
        return self._http_url

    def tensorflow_evidence(self) -> None:
        return None  # the device's process table is not visible from here

    def describe(self) -> dict:
        return {"kind": self.kind, "device_id": self.device_id, "profile": self.profile,
                "restart_cmd": self.restart_cmd, "http_url": self._http_url}

    def log_tail(self, chars: int = 3000) -> str:
        return "(remote device: read its log there, e.g. journalctl -u edgeguide-agent)"
