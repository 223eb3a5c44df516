"""The HIL suite checks only the runtimes of the devices under test (a LiteRT-only run builds no
tflite-runtime venv), and records each check in the artifacts' metrics.json as an export would."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import compression.runtimes
from compression.runtimes import litert_name
from hil_tests.artifacts import HilArtifacts
from protocol.artifact import read_metrics


def test_a_litert_device_never_builds_the_tflite_runtime_venv(tiny_artifacts: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folders = {}
    for name in ("float", "dynamic", "opversion"):
        folders[name] = tmp_path / name
        shutil.copytree(tiny_artifacts[name], folders[name])
    artifacts = HilArtifacts(tmp_path, folders)

    def no_venv(*_args: object) -> Path:
        raise AssertionError("the tflite-runtime venv was asked for on a LiteRT-only run")

    monkeypatch.setattr(compression.runtimes, "legacy_python", no_venv)
    key = litert_name()
    assert artifacts.check_runtime(key) is True
    assert artifacts.runtimes("float")[key]["loads"] is True
    assert artifacts.runtimes("dynamic")[key]["loads"] is True  # LiteRT has FULLY_CONNECTED v12
    assert artifacts.runtimes("opversion")[key] == {**artifacts.runtimes("opversion")[key], "loads": False,
                                                    "error_kind": "op_version"}
    assert set(read_metrics(folders["float"])["runtimes"]) >= {key}
    assert "tflite-runtime==2.14.0" not in read_metrics(folders["float"])["runtimes"]
    assert artifacts.unloadable_for(key).name == "opversion"

    # A runtime this machine cannot run (Termux's) is not checked: its refusal is inferred instead.
    assert artifacts.check_runtime("tflite-runtime==2.20.0") is False
    inferred = artifacts.unloadable_for("tflite-runtime==2.20.0")
    assert inferred.inferred and "version '99'" in inferred.error
