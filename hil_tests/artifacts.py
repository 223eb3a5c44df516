"""The models the suite deploys: real tiny artifacts with real runtime-compatibility checks.

The tiny model is trained once per process by the shared test helper (tests/test_agent_support.py:
200 customers, one epoch) and exported float32 and dynamic-range; a copy of the dynamic one claims
FULLY_CONNECTED version 99. Unlike the unit tests, the server must judge these the way it judges a
real export, so each copy's metrics.json gets the runtime checks compression/runtimes.py performs
(ai-edge-litert in-process, tflite-runtime 2.14 in its venv): the dynamic-range model is then
genuinely marked as not loading on tflite-runtime 2.14 (FULLY_CONNECTED v12). Only the runtimes
of the devices under test are checked, once each device has announced its runtime, so a run
against LiteRT devices never builds the tflite-runtime venv.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from protocol.artifact import read_golden, read_items, read_metrics

_LOGGER = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SUPPORT_MODULE = "test_agent_support"
NAMES = ("float", "dynamic", "opversion")
# Models a runtime may be unable to load, most realistic first.
_UNLOADABLE_ORDER = ("dynamic", "opversion")


def _support() -> ModuleType:
    """The shared builder; the module pytest already imported if any, so its per-process cache is shared."""
    module = sys.modules.get(SUPPORT_MODULE)
    if module is not None:
        return module
    path = REPO / "tests" / f"{SUPPORT_MODULE}.py"
    spec = importlib.util.spec_from_file_location(SUPPORT_MODULE, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the tiny-artifact builder from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[SUPPORT_MODULE] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Unloadable:
    """A model some runtime cannot load, with the export-time check's verdict for that runtime."""

    name: str
    folder: Path
    runtime_key: str
    error: str
    inferred: bool = False


@dataclass(frozen=True)
class HilArtifacts:
    """Artifact folders by name (float, dynamic, opversion), ready to register."""

    base: Path
    folders: dict[str, Path]

    def folder(self, name: str) -> Path:
        if name not in self.folders:
            raise KeyError(f"no HIL artifact {name!r}; have {sorted(self.folders)}")
        return self.folders[name]

    def runtimes(self, name: str) -> dict:
        return read_metrics(self.folder(name)).get("runtimes") or {}

    def check_runtime(self, runtime_key: str | None) -> bool:
        """Record in every copy's metrics.json whether `runtime_key` loads it, as an export would.

        Only the runtimes compression/runtimes.py can run here are checked; False for any other
        (e.g. Termux's tflite-runtime 2.20: `unloadable_for` then infers). Idempotent.
        """
        from compression.runtimes import LEGACY_NAME, check_legacy, check_litert, litert_name

        checks = {litert_name(): check_litert, LEGACY_NAME: check_legacy}
        check = checks.get(runtime_key or "")
        if check is None:
            _LOGGER.info("runtime %s cannot be checked on this machine; its refusals are inferred", runtime_key)
            return False
        for name, folder in self.folders.items():
            metrics = read_metrics(folder)
            runtimes = metrics.get("runtimes") or {}
            if runtime_key in runtimes:
                continue
            runtimes[runtime_key] = check(folder / "model.tflite")
            metrics["runtimes"] = runtimes
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
            _LOGGER.info("HIL artifact %s on %s: loads=%s", name, runtime_key, runtimes[runtime_key].get("loads"))
        return True

    def unloadable_for(self, runtime_key: str) -> Unloadable:
        """The most realistic model the export-time checks say `runtime_key` cannot load.

        A runtime we cannot run here (e.g. Termux's tflite-runtime 2.20) gets a copy of the
        FULLY_CONNECTED v99 model marked as not loading: no runtime has that op version.
        """
        for name in _UNLOADABLE_ORDER:
            entry = self.runtimes(name).get(runtime_key)
            if isinstance(entry, dict) and entry.get("loads") is False:
                return Unloadable(name, self.folder(name), runtime_key, str(entry.get("error") or ""))
        safe = "".join(c if c.isalnum() else "-" for c in runtime_key)
        dest = self.base / f"opversion-{safe}"
        error = ("Didn't find op for builtin opcode 'FULLY_CONNECTED' version '99' (inferred: no runtime "
                 "implements FULLY_CONNECTED v99; this runtime was not checked at export)")
        if not dest.exists():
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.folder("opversion"), tmp)
            metrics = read_metrics(tmp)
            metrics["runtimes"] = {**(metrics.get("runtimes") or {}),
                                   runtime_key: {"loads": False, "error": error, "error_kind": "op_version"}}
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
            tmp.rename(dest)
        return Unloadable("opversion", dest, runtime_key, error, inferred=True)

    def history_codes(self, count: int = 16) -> list[list[str]]:
        """Real shopper histories (the golden ones) as stock codes, the form the HTTP API takes."""
        folder = self.folder("float")
        items = read_items(folder)["items"]
        rows = read_golden(folder)["histories"][:count]
        return [[items[i][0] for i in row if i > 0] for row in rows]


def build_hil_artifacts(base: Path, shared_root: str) -> HilArtifacts:
    """Train/export via the shared helper (cached per `shared_root`) and copy; runtimes are checked
    per device with `HilArtifacts.check_runtime` (the export's own checks are replaced)."""
    built = _support().build_artifacts(shared_root)
    folders = {}
    for name in NAMES:
        dest = Path(base) / name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(built[name], dest)
        metrics = read_metrics(dest)
        metrics["model_id"] = f"hil-{name}"
        metrics["runtimes"] = {}
        (dest / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        folders[name] = dest
    return HilArtifacts(Path(base), folders)
