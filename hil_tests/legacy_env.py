"""The legacy device environment: tflite-runtime 2.14 + numpy<2 + the agent, and no TensorFlow.

compression/runtimes.py already builds and caches that interpreter venv (`.cache/legacy-venv`) for
its load checks; the agent layer goes on top of it once: the agent's pure-Python dependencies
(pins read from pyproject's `agent` extra, minus the runtime and numpy) and this project with
`--no-deps`, which also installs the `edgeguide-agent` command a Pi would run. Every session
checks the result really lacks TensorFlow and has numpy 1, since that is what the profile proves.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from compression.runtimes import LEGACY_VENV, RuntimeSetupError, legacy_python

_LOGGER = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
AGENT_MARKER = ".edgeguide-hil-agent"
# Provided by the legacy venv itself (tflite-runtime 2.14 needs numpy<2), never by the agent extra.
_SKIPPED_REQUIREMENTS = ("ai-edge-litert", "numpy")
_INSTALL_TIMEOUT_S = 900

_PROBE = r"""
import importlib.metadata as md, importlib.util as u, json, sys
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
print(json.dumps({"python": sys.version.split()[0], "tflite_runtime": version("tflite-runtime"),
                  "numpy": version("numpy"), "edgeguide": version("edgeguide"),
                  "tensorflow_importable": u.find_spec("tensorflow") is not None,
                  "ai_edge_litert_importable": u.find_spec("ai_edge_litert") is not None}))
"""


class LegacyEnvError(RuntimeError):
    """The legacy environment could not be built, or it is not what the profile promises."""


@dataclass(frozen=True)
class LegacyEnv:
    """A ready legacy venv: its python, its `edgeguide-agent` and what is installed."""

    venv: Path
    python: Path
    agent: Path
    versions: dict


def agent_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The agent extra's requirements that the legacy venv needs on top of its runtime."""
    extras = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    wanted = []
    for req in extras["agent"]:
        name = re.match(r"[A-Za-z0-9._-]+", req.strip())
        if name is None or name.group(0).lower().replace("_", "-") not in _SKIPPED_REQUIREMENTS:
            wanted.append(req)
    return wanted


def _pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S, check=False,
                          env=_clean_env())
    if proc.returncode != 0:
        raise LegacyEnvError(f"{' '.join(cmd)} failed with exit code {proc.returncode}: "
                             f"{(proc.stderr or proc.stdout).strip()[-2000:]}")


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that would leak the project venv's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def probe(python: Path) -> dict:
    """What the venv's python can import (runs in that python)."""
    proc = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False,
                          env=_clean_env(), cwd="/")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise LegacyEnvError(f"{python} could not describe itself (exit {proc.returncode}): "
                             f"{proc.stderr.strip()[-1000:]}") from exc


def _check(versions: dict, venv: Path) -> None:
    problems = []
    if versions.get("tflite_runtime") != "2.14.0":
        problems.append(f"tflite-runtime is {versions.get('tflite_runtime')}, expected 2.14.0")
    if not versions.get("numpy") or int(versions["numpy"].split(".")[0]) >= 2:
        problems.append(f"numpy is {versions.get('numpy')}, expected < 2")
    if versions.get("tensorflow_importable"):
        problems.append("tensorflow is importable (the profile exists to prove the agent runs without it)")
    if versions.get("ai_edge_litert_importable"):
        problems.append("ai_edge_litert is importable (the agent would pick it before tflite_runtime)")
    if not versions.get("edgeguide"):
        problems.append("the edgeguide project is not installed")
    if problems:
        raise LegacyEnvError(f"legacy venv {venv} is not usable: {'; '.join(problems)}; delete it to rebuild")


def legacy_agent_env(venv: Path = LEGACY_VENV) -> LegacyEnv:
    """Build (first use, needs PyPI) or reuse the legacy venv with the agent installed; verify it."""
    try:
        python = legacy_python(venv)
    except (RuntimeSetupError, OSError, subprocess.TimeoutExpired) as exc:
        raise LegacyEnvError(f"cannot build the tflite-runtime 2.14 venv at {venv}: {exc}") from exc
    wanted = "\n".join([*agent_requirements(), f"-e {REPO} --no-deps"]) + "\n"
    marker = venv / AGENT_MARKER
    if not marker.is_file() or marker.read_text() != wanted:
        with open(venv.parent / f"{venv.name}.hil.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not marker.is_file() or marker.read_text() != wanted:
                    _LOGGER.info("installing the agent into %s (needs PyPI, once)", venv)
                    marker.unlink(missing_ok=True)
                    _pip(python, *agent_requirements())
                    _pip(python, "--no-deps", "-e", str(REPO))
                    marker.write_text(wanted)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    versions = probe(python)
    _check(versions, venv)
    agent = venv / "bin" / "edgeguide-agent"
    if not agent.is_file():
        raise LegacyEnvError(f"{agent} is missing although the project is installed; delete {marker} to reinstall")
    return LegacyEnv(venv=venv, python=python, agent=agent, versions=versions)
