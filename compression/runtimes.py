"""Does a .tflite load in the runtimes devices really run? Checked for real, never guessed.

Two runtimes matter (see /work/shared/notes/stack.md): ``ai-edge-litert`` (in-process here)
and the last ``tflite-runtime`` (2.14, numpy<2, so it lives in its own cached venv at
``.cache/legacy-venv`` and is driven through a subprocess that prints JSON). TF 2.21 writes
op versions tflite-runtime 2.14 lacks (e.g. FULLY_CONNECTED v12 in dynamic-range models);
such failures are classified ``op_version`` so the gate can say why a model was refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import numpy as np

from compression.data import REPO_ROOT

_LOGGER = logging.getLogger(__name__)

LEGACY_VENV = REPO_ROOT / ".cache" / "legacy-venv"
LEGACY_REQUIREMENTS = ("tflite-runtime==2.14.0", "numpy<2")
LEGACY_NAME = "tflite-runtime==2.14.0"
OP_VERSION_MARKER = "Didn't find op for builtin opcode"
_READY = ".edgeguide-ready"
_BUILD_TIMEOUT_S = 900
_CHECK_TIMEOUT_S = 120
_THREAD_LOCK = threading.Lock()

# Runs inside the legacy venv: load, allocate and invoke every signature on a full and an
# empty history; print JSON.
_CHECK_SCRIPT = r"""
import json, sys
result = {"loads": False, "error": None}
try:
    import numpy as np
    from tflite_runtime.interpreter import Interpreter
    interpreter = Interpreter(model_path=sys.argv[1])
    interpreter.allocate_tensors()
    for key in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(key)
        for fill in (np.ones, np.zeros):  # zeros = an empty (all-padding) history
            runner(**{name: fill(d["shape"], d["dtype"]) for name, d in runner.get_input_details().items()})
    result["loads"] = True
except BaseException as exc:
    result["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(result))
"""


class RuntimeSetupError(Exception):
    """Raised when the legacy tflite-runtime venv cannot be built."""


def classify_error(text: str | None) -> str | None:
    """Map a load error text to the report's ``error_kind`` (None when there was no error)."""
    if not text:
        return None
    return "op_version" if OP_VERSION_MARKER in text else "load_error"


def _result(loads: bool | None, error: str | None, kind: str | None = None) -> dict:
    return {"loads": loads, "error": error, "error_kind": kind if kind else classify_error(error)}


def legacy_python(venv: Path = LEGACY_VENV) -> Path:
    """Python of a venv with tflite-runtime 2.14 + numpy<2 (and no TensorFlow); built on first use.

    Safe across threads and processes: builders serialise on a lock file, and a venv only
    counts as ready once its marker file is written after a successful install.
    """
    python = venv / "bin" / "python"
    if (venv / _READY).is_file():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _THREAD_LOCK, open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (venv / _READY).is_file():
                _build_legacy_venv(venv)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return python


def _build_legacy_venv(venv: Path) -> None:
    base = shutil.which("python3.11")
    if base is None:
        raise RuntimeSetupError("python3.11 not found on PATH; tflite-runtime 2.14 has wheels for "
                                "CPython <= 3.11 only")
    shutil.rmtree(venv, ignore_errors=True)  # a half-built venv from a killed build
    _LOGGER.info("building %s with %s (needs PyPI, once)", venv, " ".join(LEGACY_REQUIREMENTS))
    steps = [
        [base, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         *LEGACY_REQUIREMENTS],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            raise RuntimeSetupError(f"{' '.join(cmd)} failed with exit code {proc.returncode}: "
                                    f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    (venv / _READY).write_text(" ".join(LEGACY_REQUIREMENTS) + "\n")


def check_litert(tflite_path: str | Path) -> dict:
    """Load, allocate and invoke every signature of the model in ai-edge-litert, in-process."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(tflite_path))
        interpreter.allocate_tensors()
        for key in interpreter.get_signature_list():
            runner = interpreter.get_signature_runner(key)
            inputs = runner.get_input_details()
            for fill in (np.ones, np.zeros):  # zeros = an empty (all-padding) history, as the agent checks
                runner(**{name: fill(d["shape"], d["dtype"]) for name, d in inputs.items()})
    except Exception as exc:  # noqa: BLE001  (any failure to load is the answer we are after)
        return _result(False, f"{type(exc).__name__}: {exc}")
    return _result(True, None)


def check_legacy(tflite_path: str | Path, venv: Path = LEGACY_VENV) -> dict:
    """Load, allocate and invoke the model in tflite-runtime 2.14 (subprocess in the legacy venv)."""
    try:
        python = legacy_python(venv)
    except (RuntimeSetupError, OSError, subprocess.TimeoutExpired) as exc:
        _LOGGER.warning("tflite-runtime check unavailable: %s", exc)
        return _result(None, f"runtime unavailable: {exc}", "unavailable")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    try:
        proc = subprocess.run([str(python), "-c", _CHECK_SCRIPT, str(Path(tflite_path).resolve())],
                              capture_output=True, text=True, timeout=_CHECK_TIMEOUT_S, env=env, check=False)
    except subprocess.TimeoutExpired:
        return _result(False, f"tflite-runtime check timed out after {_CHECK_TIMEOUT_S} s", "timeout")
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return _result(False, f"check exited {proc.returncode} without a result: "
                              f"{proc.stderr.strip()[-2000:]}")
    error = answer.get("error")
    if error and proc.stderr.strip():
        # the C++ error reporter writes the op-version detail to stderr, not into the exception
        error = f"{error} | stderr: {proc.stderr.strip()[-1000:]}"
    return _result(bool(answer.get("loads")), error)


def litert_name() -> str:
    """Key of the in-process runtime in metrics.json ``runtimes``."""
    return f"ai-edge-litert=={metadata.version('ai-edge-litert')}"


def check_runtimes(tflite_path: str | Path) -> dict[str, dict]:
    """``{runtime==version: {"loads", "error", "error_kind"}}`` for every runtime we ship to.

    ``loads`` is None (error_kind "unavailable") when a runtime could not be set up here.
    """
    if not Path(tflite_path).is_file():
        raise FileNotFoundError(f"no .tflite at {tflite_path}")
    result = {litert_name(): check_litert(tflite_path), LEGACY_NAME: check_legacy(tflite_path)}
    _LOGGER.info("runtime compatibility of %s: %s", tflite_path, result)
    return result


if __name__ == "__main__":  # pragma: no cover - manual check: python -m compression.runtimes MODEL
    print(json.dumps(check_runtimes(sys.argv[1]), indent=1))
