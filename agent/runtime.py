"""The TFLite interpreter behind every on-device recommendation.

Devices differ in which interpreter they can install (LiteRT wheels, Termux's tflite-runtime, a
developer's TensorFlow), so the loader tries them in that order and reports which one ran: the
server gates a model on the runtime the device actually has. TensorFlow is imported only when
neither device runtime is installed, or when forced, because it costs ~600 MB of RSS.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

_LOGGER = logging.getLogger(__name__)

RUNTIME_ENV = "EDGEGUIDE_RUNTIME"
SIGNATURE = "recommend"
SCORE_SIGNATURE = "score"
INPUT_NAME = "history"
OUTPUT_IDS = "item_ids"
OUTPUT_SCORES = "scores"

_OP_VERSION_RE = re.compile(r"Didn't find op for builtin opcode '(?P<op>[A-Za-z0-9_]+)' version '(?P<version>\d+)'")


@dataclass(frozen=True)
class RuntimeInfo:
    """Which interpreter package runs the models (`name` is the distribution name)."""

    name: str
    version: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class _Backend:
    """One interpreter package: where its Interpreter class lives and how it is named on PyPI."""

    name: str
    module: str
    attr: str
    dist: str


# Order matters: the first importable one is used (see docs/design.md, notes/stack.md).
_BACKENDS: tuple[_Backend, ...] = (
    _Backend("ai-edge-litert", "ai_edge_litert.interpreter", "Interpreter", "ai-edge-litert"),
    _Backend("tflite-runtime", "tflite_runtime.interpreter", "Interpreter", "tflite-runtime"),
    _Backend("tensorflow", "tensorflow.lite", "Interpreter", "tensorflow"),
)


class ModelLoadError(RuntimeError):
    """A model file could not be turned into a working recommender; says which file and runtime."""

    def __init__(self, message: str, *, path: Path | str | None = None, runtime: RuntimeInfo | None = None) -> None:
        where = f" [model={path}]" if path is not None else ""
        rt = f" [runtime={runtime}]" if runtime is not None else ""
        super().__init__(f"{message}{where}{rt}")
        self.path = Path(path) if path is not None else None
        self.runtime = runtime


class OpVersionError(ModelLoadError):
    """The runtime lacks a kernel for an op version the model uses (the model is too new for it)."""

    def __init__(self, op: str, op_version: int, *, path: Path | str | None = None,
                 runtime: RuntimeInfo | None = None, detail: str = "") -> None:
        msg = (f"runtime has no kernel for builtin op {op} version {op_version}; re-export the model for "
               f"this runtime or upgrade the runtime")
        if detail:
            msg += f" ({detail.strip()[:300]})"
        super().__init__(msg, path=path, runtime=runtime)
        self.op = op
        self.op_version = op_version


class RuntimeNotFoundError(ModelLoadError):
    """No interpreter package is importable (or the forced one is missing)."""


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _backend_named(name: str) -> _Backend:
    wanted = _normalise(name)
    for backend in _BACKENDS:
        if wanted in {backend.name, _normalise(backend.module.split(".")[0])}:
            return backend
    raise RuntimeNotFoundError(
        f"unknown runtime {name!r} (from {RUNTIME_ENV} or --runtime); choose one of {[b.name for b in _BACKENDS]}")


def _version_of(backend: _Backend, module: Any) -> str:
    try:
        return importlib.metadata.version(backend.dist)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown"))


def _import_backend(backend: _Backend) -> tuple[Callable[..., Any], RuntimeInfo]:
    module = importlib.import_module(backend.module)
    interpreter_cls = getattr(module, backend.attr)
    root = importlib.import_module(backend.module.split(".")[0])
    return interpreter_cls, RuntimeInfo(backend.name, _version_of(backend, root))


_CACHE: dict[str | None, tuple[Callable[..., Any], RuntimeInfo]] = {}
_CACHE_LOCK = threading.Lock()


def _resolve(forced: str | None = None) -> tuple[Callable[..., Any], RuntimeInfo]:
    """Find the interpreter class: the forced runtime, else the first device runtime installed."""
    forced = forced or os.environ.get(RUNTIME_ENV) or None
    with _CACHE_LOCK:
        if forced in _CACHE:
            return _CACHE[forced]
        if forced:
            backend = _backend_named(forced)
            try:
                found = _import_backend(backend)
            except ImportError as exc:
                raise RuntimeNotFoundError(
                    f"runtime {backend.name!r} was forced but cannot be imported: {exc}") from exc
        else:
            found = _first_available()
        _LOGGER.info("runtime=%s forced=%s", found[1], forced or "no")
        _CACHE[forced] = found
        return found


def _first_available() -> tuple[Callable[..., Any], RuntimeInfo]:
    errors = []
    for backend in _BACKENDS:
        if backend.name == "tensorflow":
            # Development fallback only: the device runtimes are missing, say so loudly.
            _LOGGER.warning("no device runtime (ai-edge-litert, tflite-runtime) installed; falling back to "
                            "tensorflow.lite, which costs ~600 MB RSS: errors=%s", errors)
        try:
            return _import_backend(backend)
        except ImportError as exc:
            errors.append(f"{backend.name}: {exc}")
    raise RuntimeNotFoundError(f"no TFLite interpreter is installed: {errors}; pip install ai-edge-litert")


def detect_runtime(forced: str | None = None) -> RuntimeInfo:
    """The runtime this process would load models with (honours EDGEGUIDE_RUNTIME)."""
    return _resolve(forced)[1]


class Recommender:
    """A loaded model's `recommend` signature: a history of L item indices in, top-K ids and scores out.

    The interpreter is not thread-safe, so calls are serialised by a lock; serving keeps one
    Recommender per model and never shares an interpreter across processes.
    """

    def __init__(self, interpreter: Any, runtime: RuntimeInfo, path: Path, threads: int) -> None:
        self.runtime = runtime
        self.path = path
        self.threads = threads
        self._interpreter = interpreter
        self._lock = threading.Lock()
        signatures = interpreter.get_signature_list()
        if SIGNATURE not in signatures:
            raise ModelLoadError(f"model has no {SIGNATURE!r} signature (found {sorted(signatures)})",
                                 path=path, runtime=runtime)
        sig = signatures[SIGNATURE]
        inputs, outputs = list(sig.get("inputs", [])), list(sig.get("outputs", []))
        if inputs != [INPUT_NAME] or not {OUTPUT_IDS, OUTPUT_SCORES} <= set(outputs):
            raise ModelLoadError(f"signature {SIGNATURE!r} has inputs {inputs} outputs {outputs}, "
                                 f"expected [{INPUT_NAME!r}] -> [{OUTPUT_IDS!r}, {OUTPUT_SCORES!r}]",
                                 path=path, runtime=runtime)
        self._runner = interpreter.get_signature_runner(SIGNATURE)
        self._score_runner = (interpreter.get_signature_runner(SCORE_SIGNATURE)
                              if SCORE_SIGNATURE in signatures else None)
        shape = [int(x) for x in self._runner.get_input_details()[INPUT_NAME]["shape"]]
        if len(shape) != 2 or shape[0] != 1 or shape[1] < 1:
            raise ModelLoadError(f"input {INPUT_NAME!r} has shape {shape}, expected [1, L]", path=path, runtime=runtime)
        self.window = shape[1]
        out_shape = [int(x) for x in self._runner.get_output_details()[OUTPUT_IDS]["shape"]]
        self.k = out_shape[-1] if out_shape else 0

    @property
    def closed(self) -> bool:
        return self._interpreter is None

    def _check_history(self, history: np.ndarray) -> np.ndarray:
        array = np.asarray(history)
        if array.shape != (self.window,):
            raise ValueError(f"history must have shape ({self.window},), got {array.shape}")
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"history must hold integer item indices, got dtype {array.dtype}")
        return np.ascontiguousarray(array, dtype=np.int32).reshape(1, self.window)

    def recommend(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-K `(item_ids int32 [K], scores float32 [K])` for one left-padded history."""
        batch = self._check_history(history)
        with self._lock:
            if self._interpreter is None:
                raise RuntimeError(f"recommender for {self.path} is closed")
            out = self._runner(**{INPUT_NAME: batch})
            return np.array(out[OUTPUT_IDS][0], dtype=np.int32), np.array(out[OUTPUT_SCORES][0], dtype=np.float32)

    def score(self, history: np.ndarray) -> np.ndarray:
        """Full scores float32 [V+1] from the `score` signature (used for full-ranking checks)."""
        batch = self._check_history(history)
        with self._lock:
            if self._interpreter is None:
                raise RuntimeError(f"recommender for {self.path} is closed")
            if self._score_runner is None:
                raise RuntimeError(f"model {self.path} has no {SCORE_SIGNATURE!r} signature")
            out = self._score_runner(**{INPUT_NAME: batch})
            return np.array(next(iter(out.values()))[0], dtype=np.float32)

    def close(self) -> None:
        """Drop the interpreter so its memory is freed once no call is in flight."""
        with self._lock:
            self._interpreter = None
            self._runner = None
            self._score_runner = None

    def __repr__(self) -> str:
        return f"Recommender(path={self.path}, runtime={self.runtime}, window={self.window}, k={self.k})"


def _classify(exc: Exception, path: Path, runtime: RuntimeInfo) -> ModelLoadError:
    text = str(exc)
    match = _OP_VERSION_RE.search(text)
    if match:
        return OpVersionError(match["op"], int(match["version"]), path=path, runtime=runtime, detail=text)
    return ModelLoadError(f"cannot load model: {type(exc).__name__}: {text.strip()[:500]}", path=path, runtime=runtime)


def load_recommender(model_path: Path | str, threads: int = 1, *, runtime: str | None = None) -> Recommender:
    """Load a `.tflite` into a Recommender; every failure is a ModelLoadError naming path and runtime."""
    path = Path(model_path)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    interpreter_cls, info = _resolve(runtime)
    if not path.is_file():
        raise ModelLoadError("model file does not exist", path=path, runtime=info)
    try:
        interpreter = interpreter_cls(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
        recommender = Recommender(interpreter, info, path, threads)
        # One real call proves every kernel is present (some runtimes resolve ops lazily).
        recommender.recommend(np.zeros(recommender.window, dtype=np.int32))
    except ModelLoadError:
        raise
    except Exception as exc:  # runtimes raise ValueError/RuntimeError with the reason in the text
        raise _classify(exc, path, info) from exc
    _LOGGER.info("model_loaded path=%s runtime=%s window=%d k=%d threads=%d",
                 path, info, recommender.window, recommender.k, threads)
    return recommender
