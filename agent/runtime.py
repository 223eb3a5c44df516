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
import struct
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
    errors: list[str] = []
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


class _SignatureCalls:
    """The three interpreter calls one signature needs, with its tensor indices resolved once.

    Why not the library's SignatureRunner: every call of it resizes the input and re-runs
    AllocateTensors, about a fifth of a small model's invoke time. These are the same wrapper
    calls it makes (`SetTensor`, `Invoke`, `GetTensor` with the signature's subgraph), minus
    that per-call setup: our input shape never changes after loading.
    """

    __slots__ = ("set_tensor", "invoke", "get_tensor", "subgraph", "input_index", "output_index")

    def __init__(self, interpreter: Any, key: str, *, direct: bool = True) -> None:
        runner = interpreter.get_signature_runner(key)
        self.input_index = {n: int(d["index"]) for n, d in runner.get_input_details().items()}
        self.output_index = {n: int(d["index"]) for n, d in runner.get_output_details().items()}
        wrapper: Any = getattr(interpreter, "_interpreter", None)
        if direct and all(callable(getattr(wrapper, name, None)) for name in _WRAPPER_CALLS):
            self.subgraph = int(wrapper.GetSubgraphIndexFromSignature(key))
            if self.subgraph:
                wrapper.AllocateTensors(self.subgraph)  # subgraph 0 was allocated by the loader
            self.set_tensor, self.invoke, self.get_tensor = wrapper.SetTensor, wrapper.Invoke, wrapper.GetTensor
        else:  # an interpreter without the usual wrapper: the public runner, slower but equivalent
            self.subgraph = 0
            portable = _RunnerCalls(runner, self.input_index, self.output_index)
            self.set_tensor, self.invoke, self.get_tensor = portable.set_tensor, portable.invoke, portable.get_tensor

    def close(self, path: Path) -> None:
        """Drop the references to the interpreter; any later call raises RecommenderClosedError."""
        self.set_tensor = self.invoke = self.get_tensor = _closed_calls(path)


_WRAPPER_CALLS = ("SetTensor", "Invoke", "GetTensor", "GetSubgraphIndexFromSignature", "AllocateTensors")


class _RunnerCalls:
    """`SetTensor`/`Invoke`/`GetTensor` look-alikes over a public SignatureRunner (fallback path)."""

    def __init__(self, runner: Any, inputs: dict[str, int], outputs: dict[str, int]) -> None:
        self._runner = runner
        self._input_names = {index: name for name, index in inputs.items()}
        self._output_names = {index: name for name, index in outputs.items()}
        self._feed: dict[str, np.ndarray] = {}
        self._result: dict[str, np.ndarray] = {}

    def set_tensor(self, index: int, value: np.ndarray, _subgraph: int = 0) -> None:
        self._feed[self._input_names[index]] = np.array(value)

    def invoke(self, _subgraph: int = 0) -> None:
        self._result = self._runner(**self._feed)

    def get_tensor(self, index: int, _subgraph: int = 0) -> np.ndarray:
        return np.array(self._result[self._output_names[index]])


class RecommenderClosedError(RuntimeError):
    """The recommender was closed (its model was swapped out or released)."""


def _closed_calls(path: Path) -> Callable[..., Any]:
    """What an interpreter call becomes after `close`: a clear error instead of a None dereference."""

    def closed(*_args: Any) -> Any:
        raise RecommenderClosedError(f"recommender for {path} is closed")

    return closed


class Recommender:
    """A loaded model's `recommend` signature: a history of L item indices in, top-K ids and scores out.

    The interpreter is not thread safe, so every call holds `lock`. Serving takes `lock` itself
    (the same lock, so measurements on a serving model stay serialised with it) and calls
    `top_k_locked`; everything else calls `recommend`. One Recommender per model, never shared
    across processes.
    """

    def __init__(self, interpreter: Any, runtime: RuntimeInfo, path: Path, threads: int, *,
                 direct: bool = True) -> None:
        self.runtime = runtime
        self.path = path
        self.threads = threads
        self.lock = threading.Lock()
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
        self._check_tensors(interpreter)
        calls = _SignatureCalls(interpreter, SIGNATURE, direct=direct)
        self._score_calls = (_SignatureCalls(interpreter, SCORE_SIGNATURE, direct=direct)
                             if SCORE_SIGNATURE in signatures else None)
        self._calls = calls
        # Hot-path copies of what `top_k_locked` needs, so a call does no dict or chained lookups.
        self._set_tensor, self._invoke, self._get_tensor = calls.set_tensor, calls.invoke, calls.get_tensor
        self._subgraph = calls.subgraph
        self._input_index = calls.input_index[INPUT_NAME]
        self._ids_index = calls.output_index[OUTPUT_IDS]
        self._scores_index = calls.output_index[OUTPUT_SCORES]
        self._window_buffer = np.zeros((1, self.window), dtype=np.int32)
        self._pack_window = struct.Struct(f"={self.window}i").pack_into
        self._interpreter = interpreter  # last, so a dealloc drops the wrapper references first

    def _check_tensors(self, interpreter: Any) -> None:
        """Shapes and dtypes the fast path relies on: int32 [1, L] in, int32/float32 [1, K] out."""
        runner = interpreter.get_signature_runner(SIGNATURE)
        inp = runner.get_input_details()[INPUT_NAME]
        outs = runner.get_output_details()
        shape = [int(x) for x in inp["shape"]]
        if len(shape) != 2 or shape[0] != 1 or shape[1] < 1:
            raise ModelLoadError(f"input {INPUT_NAME!r} has shape {shape}, expected [1, L]",
                                 path=self.path, runtime=self.runtime)
        self.window = shape[1]
        out_shape = [int(x) for x in outs[OUTPUT_IDS]["shape"]]
        self.k = out_shape[-1] if out_shape else 0
        wanted = {INPUT_NAME: (inp, np.int32), OUTPUT_IDS: (outs[OUTPUT_IDS], np.int32),
                  OUTPUT_SCORES: (outs[OUTPUT_SCORES], np.float32)}
        for name, (detail, dtype) in wanted.items():
            if np.dtype(detail["dtype"]) != dtype:
                raise ModelLoadError(f"tensor {name!r} of signature {SIGNATURE!r} has dtype "
                                     f"{np.dtype(detail['dtype'])}, expected {np.dtype(dtype)}",
                                     path=self.path, runtime=self.runtime)
        if [int(x) for x in outs[OUTPUT_SCORES]["shape"]] != [1, self.k]:
            raise ModelLoadError(f"outputs {OUTPUT_IDS!r} {out_shape} and {OUTPUT_SCORES!r} "
                                 f"{list(outs[OUTPUT_SCORES]['shape'])} must both be [1, K]",
                                 path=self.path, runtime=self.runtime)

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

    def top_k_locked(self, window: list[int]) -> tuple[list[int], list[float]]:
        """Top-K ids and scores as Python lists for `window` (L valid item indices, left-padded with 0).

        The serving hot path: the caller must hold `lock` and guarantee the indices (no checks
        here). Raises RecommenderClosedError after `close`.
        """
        buffer = self._window_buffer
        self._pack_window(buffer, 0, *window)  # type: ignore[arg-type]  # numpy arrays are writable buffers
        subgraph = self._subgraph
        self._set_tensor(self._input_index, buffer, subgraph)
        self._invoke(subgraph)
        get = self._get_tensor
        return get(self._ids_index, subgraph).ravel().tolist(), get(self._scores_index, subgraph).ravel().tolist()

    def recommend(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-K `(item_ids int32 [K], scores float32 [K])` for one left-padded history."""
        batch = self._check_history(history)
        with self.lock:
            if self._interpreter is None:
                raise RecommenderClosedError(f"recommender for {self.path} is closed")
            subgraph = self._subgraph
            self._set_tensor(self._input_index, batch, subgraph)
            self._invoke(subgraph)
            # GetTensor returns copies, so the arrays stay valid after the next invoke.
            return self._get_tensor(self._ids_index, subgraph)[0], self._get_tensor(self._scores_index, subgraph)[0]

    def score(self, history: np.ndarray) -> np.ndarray:
        """Full scores float32 [V+1] from the `score` signature (used for full-ranking checks)."""
        batch = self._check_history(history)
        with self.lock:
            if self._interpreter is None:
                raise RecommenderClosedError(f"recommender for {self.path} is closed")
            calls = self._score_calls
            if calls is None:
                raise RuntimeError(f"model {self.path} has no {SCORE_SIGNATURE!r} signature")
            calls.set_tensor(calls.input_index[INPUT_NAME], batch, calls.subgraph)
            calls.invoke(calls.subgraph)
            out = calls.get_tensor(next(iter(calls.output_index.values())), calls.subgraph)
            return np.asarray(out[0], dtype=np.float32)

    def close(self) -> None:
        """Drop the interpreter so its memory is freed once no call is in flight (waits for `lock`)."""
        with self.lock:
            # The wrapper references go before the Interpreter object, whose __del__ expects to
            # release the wrapper ahead of any delegate it owns.
            self._set_tensor = self._invoke = self._get_tensor = _closed_calls(self.path)
            self._calls.close(self.path)
            if self._score_calls is not None:
                self._score_calls.close(self.path)
            self._interpreter = None

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
