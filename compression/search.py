"""Accuracy-aware compression search: try recipes, keep the Pareto frontier, pick the smallest
model whose NDCG@10 is at least ``floor`` x the float32 reference's.

Every variant is exported with ``compression.export.export_artifact``, so its figures are the
exported ``.tflite``'s own (full ranking on the test split) and the winning folder can be
deployed by the server as it is. A JSON state file records finished variants: re-running the
same command resumes where an interrupted run stopped. Each run writes ``search.json``,
``report.md`` and ``pareto.png`` into its output folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tf_keras as keras
from ai_edge_litert.interpreter import Interpreter
from tqdm.auto import tqdm

from compression.data import Dataset
from compression.export import export_artifact
from compression.reference import load_reference_model, obtain_references  # noqa: F401 - re-exported
from compression.report import markdown_table, pareto_front, pareto_plot
from compression.techniques import Recipe, StepResult
from compression.tflite_eval import INPUT_NAME, RECOMMEND
from compression.variants import (  # noqa: F401 - the search's public names live here too
    PROFILES,
    SearchError,
    Variant,
    default_variants,
    select_variants,
    size_note,
)

_LOGGER = logging.getLogger(__name__)

STATE_FORMAT = 1


@dataclass(frozen=True)
class LatencyConfig:
    """How long the host latency pass runs (quick for smoke runs; never a device figure)."""

    warmup_runs: int = 10
    warmup_seconds: float = 0.5
    min_runs: int = 200
    min_seconds: float = 1.0
    threads: int = 1

    @classmethod
    def for_profile(cls, profile: str) -> LatencyConfig:
        """Quick: a few hundred runs; full: >= 1024 runs and >= 3 s after >= 2 s warm-up."""
        if profile == "full":
            return cls(warmup_runs=10, warmup_seconds=2.0, min_runs=1024, min_seconds=3.0)
        return cls()


def measure_host_latency(tflite_path: str | Path, histories: np.ndarray, config: LatencyConfig) -> dict:
    """Latency of the ``recommend`` signature on this host, cycling through real histories."""
    interpreter = Interpreter(model_path=str(tflite_path), num_threads=config.threads)
    run = interpreter.get_signature_runner(RECOMMEND)
    rows = [np.asarray(h, dtype=np.int32)[None, :] for h in histories]
    start, i = time.perf_counter(), 0
    while i < config.warmup_runs or time.perf_counter() - start < config.warmup_seconds:
        run(**{INPUT_NAME: rows[i % len(rows)]})
        i += 1
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < config.min_runs or time.perf_counter() - start < config.min_seconds:
        t0 = time.perf_counter()
        run(**{INPUT_NAME: rows[len(times) % len(rows)]})
        times.append((time.perf_counter() - t0) * 1000.0)
    ms = np.array(times)
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "n": len(ms),
            "threads": config.threads}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _figures(metrics: dict, latency: dict) -> dict:
    return {"tflite_bytes": metrics["tflite_bytes"], "gzip_bytes": metrics["gzip_bytes"],
            "hr10": metrics["hr10"], "ndcg10": metrics["ndcg10"], "mrr": metrics["mrr"],
            "host_p50_ms": latency["p50"], "host_p90_ms": latency["p90"], "latency": latency,
            "runtimes": metrics.get("runtimes", {}), "ops": metrics.get("ops", [])}


class _PrefixCache:
    """Results of recipe prefixes, so recipes sharing a first step (a student) train it once."""

    def __init__(self) -> None:
        self._results: dict[tuple[str, ...], StepResult] = {}

    def run(self, variant: Variant, model: keras.Model, dataset: Dataset) -> StepResult:
        keys = [f"{variant.base}:{repr(step)}" if i == 0 else repr(step) for i, step in enumerate(variant.steps)]
        start, current = 0, StepResult(model=model, techniques=[])
        for n in range(len(keys), 0, -1):
            if tuple(keys[:n]) in self._results:
                start, current = n, self._results[tuple(keys[:n])]
                break
        if start:
            _LOGGER.info("variant %s: reusing the result of its first %d step(s)", variant.name, start)
        for n in range(start, len(keys)):
            if current.terminal:
                raise SearchError(f"variant {variant.name!r}: step {n} ({keys[n]}) follows a terminal step")
            step_result = Recipe([variant.steps[n]]).apply(current.model, dataset)
            notes = dict(current.notes)
            notes.update(step_result.notes)
            quantization = step_result.quantization
            if quantization == "none":
                quantization = current.quantization
            current = StepResult(step_result.model, current.techniques + step_result.techniques, notes,
                                 quantization, step_result.terminal)
            self._results[tuple(keys[:n + 1])] = current
        return current


@dataclass
class SearchRun:
    """Where a search writes and what it compares against."""

    out_dir: Path
    floor: float = 0.99
    k: int = 20
    check_compat: bool = True
    latency: LatencyConfig = dataclasses.field(default_factory=LatencyConfig)
    run_name: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.floor <= 1.5:
            raise SearchError(f"floor must be in (0, 1.5], got {self.floor}")
        self.out_dir = Path(self.out_dir)
        self.run_name = self.run_name or self.out_dir.name


def _architecture(model: keras.Model) -> dict | None:
    from compression.seqmodel import architecture_of

    try:
        return architecture_of(model).to_dict()
    except (ValueError, KeyError, AttributeError):
        return None  # wrapped (QAT/pruning) models: their base's architecture is recorded


def _data_fingerprint(dataset: Dataset) -> dict:
    return {"customers": len(dataset.customers), "items": dataset.num_items,
            "interactions": dataset.num_interactions, "source": dataset.source}


def _load_state(path: Path, fingerprint: dict) -> dict:
    if not path.is_file():
        return {"format": STATE_FORMAT, "data": fingerprint, "reference": None, "variants": {}}
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.get("format") != STATE_FORMAT:
        raise SearchError(f"{path}: state format {state.get('format')!r}, expected {STATE_FORMAT}")
    if state.get("data") != fingerprint:
        raise SearchError(f"{path} was written for data {state.get('data')} but this run has {fingerprint}; "
                          "use another --out folder (or --fresh) for a different dataset")
    _LOGGER.info("resuming from %s: %d variant(s) done", path, len(state["variants"]))
    return state


def model_key(model: keras.Model) -> str:
    """Digest of a model's name, input shape and weights: which model a stored result came from."""
    digest = hashlib.sha256(f"{model.name}:{tuple(model.inputs[0].shape)}".encode())
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


def run_search(reference: keras.Model, dataset: Dataset, variants: Sequence[Variant], run: SearchRun,
               *, training: dict | None = None, bases: dict[str, keras.Model] | None = None,
               on_variant: Callable[[dict], None] | None = None) -> dict:
    """Export the reference and every variant, rank them, and write the run's outputs.

    ``bases`` holds the other trained architectures variants may start from (``Variant.base``).
    A stored result is reused only when its variant's configuration key (steps + base model
    weights) is unchanged; anything else is run again, never silently resumed.
    Returns the result dict (also written as ``search.json``): ``reference``, ``baselines``,
    ``variants``, ``pareto`` (names), ``best`` and the ``floor``.
    """
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SearchError(f"variant names must be unique, got {names}")
    models = {"reference": reference, **(bases or {})}
    missing = sorted({v.base for v in variants} - set(models))
    if missing:
        raise SearchError(f"variants start from {missing}, which were not given; have {sorted(models)}")
    keys = {name: model_key(model) for name, model in models.items()}
    out = run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = _load_state(state_path, _data_fingerprint(dataset))
    window = int(reference.inputs[0].shape[1])
    golden = dataset.eval_histories("test", window)[0][:256]

    if state["reference"] is not None and state["reference"].get("key") != keys["reference"]:
        _LOGGER.warning("%s holds another reference (key %s, now %s): exporting it again",
                        state_path, state["reference"].get("key"), keys["reference"])
        state["reference"] = None
    if state["reference"] is None:
        _LOGGER.info("exporting the float32 reference")
        path = export_artifact(reference, dataset, out / "reference", model_id=f"{run.run_name}-reference",
                               k=run.k, quantization="none", techniques=[], training=training or {},
                               check_compat=run.check_compat)
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        latency = measure_host_latency(path / "model.tflite", golden, run.latency)
        state["reference"] = {"name": "reference", "techniques": [], "recipe": [], "quantization": "none",
                              "params": int(reference.count_params()), "artifact": str(path),
                              "key": keys["reference"], "architecture": _architecture(reference),
                              "training": training or {}, **_figures(metrics, latency)}
        state["baselines"] = metrics["baselines"]
        _write_json_atomic(state_path, state)
    ref = state["reference"]
    ref_figures = {key: ref[key] for key in ("tflite_bytes", "gzip_bytes", "hr10", "ndcg10", "mrr")}

    cache = _PrefixCache()
    wanted = {v.name: v.config_key(keys[v.base]) for v in variants}
    stale = [n for n in wanted if n in state["variants"] and state["variants"][n].get("config") != wanted[n]]
    if stale:
        _LOGGER.warning("configuration changed since the stored run for %s: running them again", stale)
    todo = [v for v in variants if v.name not in state["variants"] or v.name in stale]
    bar = tqdm(total=len(variants), initial=len(variants) - len(todo), desc="search", unit="variant",
               disable=not run.progress)
    for variant in todo:
        bar.set_postfix_str(variant.name)
        started = time.perf_counter()
        try:
            result = cache.run(variant, models[variant.base], dataset)
            path = export_artifact(result.model, dataset, out / "variants" / variant.name,
                                   model_id=f"{run.run_name}-{variant.name}", k=run.k,
                                   quantization=result.quantization, techniques=result.techniques,
                                   training={"recipe": result.techniques, "notes": _jsonable(result.notes)},
                                   reference=ref_figures, check_compat=run.check_compat)
            metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
            latency = measure_host_latency(path / "model.tflite", golden, run.latency)
            row = {"name": variant.name, "base": variant.base,
                   "architecture": _architecture(result.model),
                   "techniques": list(dict.fromkeys(result.techniques)),
                   "recipe": result.techniques, "quantization": result.quantization,
                   "params": int(result.model.count_params()), "artifact": str(path),
                   **_figures(metrics, latency), "size_note": size_note(result, metrics),
                   "notes": _jsonable(result.notes)}
        except Exception as exc:  # one failing variant must not end a long search; the row says why
            _LOGGER.exception("variant %s failed", variant.name)
            row = {"name": variant.name, "base": variant.base, "architecture": _architecture(models[variant.base]),
                   "techniques": list(dict.fromkeys(s.name for s in variant.steps)),
                   "recipe": [s.name for s in variant.steps], "error": f"{type(exc).__name__}: {exc}"}
        row["seconds"] = time.perf_counter() - started
        row["config"] = wanted[variant.name]
        state["variants"][variant.name] = row
        _write_json_atomic(state_path, state)
        if on_variant is not None:
            on_variant(row)
        if "error" not in row:
            _LOGGER.info("variant %s: %d bytes (%.1fx), NDCG@10 %.4f (%.3f x ref), p50 %.3f ms",
                         variant.name, row["tflite_bytes"], ref["tflite_bytes"] / row["tflite_bytes"],
                         row["ndcg10"], row["ndcg10"] / ref["ndcg10"], row["host_p50_ms"])
        bar.update(1)
    bar.close()
    return finish_search(state, [v.name for v in variants], run)


def select_best(rows: Sequence[dict], reference: dict, floor: float) -> dict | None:
    """The smallest .tflite whose NDCG@10 >= floor x the reference's (ties: higher NDCG)."""
    needed = floor * reference["ndcg10"]
    ok = [r for r in rows if not r.get("error") and r["ndcg10"] >= needed]
    if not ok:
        return None
    return min(ok, key=lambda r: (r["tflite_bytes"], -r["ndcg10"]))


def finish_search(state: dict, names: Sequence[str], run: SearchRun) -> dict:
    """Rank the finished variants, copy the best artifact to ``best/`` and write the reports."""
    out = run.out_dir
    rows = [state["variants"][n] for n in names if n in state["variants"]]
    ref = state["reference"]
    chosen = select_best(rows, ref, run.floor)
    best_dir = out / "best"
    if chosen is None:
        _LOGGER.warning("no variant reached NDCG@10 >= %.3f x reference; best = the reference", run.floor)
        chosen = ref
    if best_dir.exists():
        shutil.rmtree(best_dir)
    shutil.copytree(chosen["artifact"], best_dir)
    best = {key: chosen.get(key) for key in ("name", "techniques", "recipe", "quantization", "tflite_bytes",
                                             "gzip_bytes", "hr10", "ndcg10", "mrr", "host_p50_ms",
                                             "host_p90_ms", "runtimes", "params")}
    best.update({"artifact": str(best_dir.resolve()), "source_artifact": chosen["artifact"],
                 "met_floor": chosen is not ref,
                 "x_smaller": ref["tflite_bytes"] / chosen["tflite_bytes"],
                 "ndcg_ratio": chosen["ndcg10"] / ref["ndcg10"]})
    result = {
        "run": run.run_name, "floor": run.floor, "data": state["data"],
        "host": {"machine": platform.machine(), "processor": platform.processor() or None,
                 "cpus": os.cpu_count(), "latency": dataclasses.asdict(run.latency)},
        "reference": ref, "baselines": state.get("baselines", {}), "variants": rows,
        "pareto": pareto_front(rows), "best": best,
    }
    _write_json_atomic(out / "search.json", result)
    (out / "report.md").write_text(markdown_table(result), encoding="utf-8")
    pareto_plot(result, out / "pareto.png")
    _LOGGER.info("search done: best %s (%d bytes, %.1fx smaller, NDCG@10 %.4f); reports in %s",
                 best["name"], best["tflite_bytes"], best["x_smaller"], best["ndcg10"], out)
    return result
