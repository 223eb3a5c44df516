"""One deployment on the device: download state, then candidate evaluation into a Report.

`evaluate_candidate` runs steps 4 of docs/design.md's flow: whole-file check, unpack into the
inactive slot, load with the device's runtime, measure on the golden set. Every failure becomes a
Report with `load_ok` False and an `error_kind`, so the server always learns why; the incumbent
model is never touched here.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.model import LoadedModel, open_model
from agent.runtime import ModelLoadError, OpVersionError, RuntimeInfo
from agent.store import ModelStore, SlotRef, StoreError
from agent.transfer import Receiver, VerifyError
from protocol import artifact
from protocol.jsonsafe import dumps_compact
from protocol.messages import Manifest, Report
from protocol.states import AgentPhase

_LOGGER = logging.getLogger(__name__)

MeasureFn = Callable[..., dict[str, Any]]
PairedFn = Callable[..., dict[str, Any]]

# Kept for readers of this module; the phases and their transitions live in protocol.states.
DOWNLOADING = AgentPhase.DOWNLOADING
MEASURING = AgentPhase.MEASURING
AWAITING_VERDICT = AgentPhase.AWAITING_VERDICT


@dataclass
class Deployment:
    """The one deployment in progress and where it stands."""

    manifest: Manifest
    receiver: Receiver
    phase: AgentPhase = AgentPhase.DOWNLOADING
    candidate: SlotRef | None = None
    loaded: LoadedModel | None = None
    last_progress: float = field(default_factory=time.monotonic)
    verdict_deadline: float | None = None  # the report awaiting it is held by agent.link.DeviceLink

    @property
    def deployment_id(self) -> str:
        return self.manifest.deployment_id

    def release(self) -> None:
        """Close the candidate's interpreter (it was never handed to serving)."""
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None


@dataclass
class Evaluation:
    """What evaluating a candidate produced: always a report; a candidate and model only on success."""

    report: Report
    candidate: SlotRef | None = None
    loaded: LoadedModel | None = None
    failed_event: str | None = None  # verify_failed | load_failed | error, when it failed


@dataclass(frozen=True)
class EvalSettings:
    """Device-side knobs of the evaluation."""

    device_id: str
    threads: int
    mode: str
    max_unpacked_bytes: int
    runtime: str | None = None
    measure_config: Any = None
    power_source: Any = None
    paired_pairs: int = 20


def _failure(deployment: Deployment, settings: EvalSettings, kind: str, error: str, event: str,
             runtime: RuntimeInfo | None = None, model_bytes: int | None = None) -> Evaluation:
    m = deployment.manifest
    _LOGGER.error("candidate_failed deployment=%s kind=%s error=%s", m.deployment_id, kind, error)
    report = Report(device_id=settings.device_id, deployment_id=m.deployment_id, model_id=m.model_id,
                    version=m.version, load_ok=False, error_kind=kind, error=error[:2000], mode=settings.mode,
                    runtime=runtime.to_dict() if runtime else None, model_bytes=model_bytes)
    return Evaluation(report=report, failed_event=event)


def failure_kind(exc: BaseException, default: str) -> str:
    """The Report error_kind of an exception raised while evaluating a candidate.

    A full disk is always "disk_full" and a failed integrity check always "verify_error", whatever
    the step; anything else (MemoryError under a memory cap included) takes the step's `default`.
    """
    if isinstance(exc, VerifyError):
        return "verify_error"
    if isinstance(exc, StoreError) and exc.kind in {"disk_full", "verify_error"}:
        return exc.kind
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full"
    return default


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, StoreError | VerifyError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_FAILED_EVENTS = {"verify_error": "verify_failed", "load_error": "load_failed", "op_version": "load_failed"}


def _event_for(kind: str) -> str:
    return _FAILED_EVENTS.get(kind, "error")


def failed_evaluation(deployment: Deployment, settings: EvalSettings, exc: BaseException, default_kind: str,
                      runtime: RuntimeInfo | None = None, model_bytes: int | None = None,
                      prefix: str = "") -> Evaluation:
    """A load_ok False evaluation for `exc`, with the error_kind `failure_kind` gives it."""
    kind = failure_kind(exc, default_kind)
    return _failure(deployment, settings, kind, prefix + _describe(exc), _event_for(kind), runtime, model_bytes)


def _discard(store: ModelStore, candidate: SlotRef, opened: list[LoadedModel] | None = None) -> None:
    """Close what was opened of a failed candidate and delete its slot; a cleanup error is only logged
    (the report matters more, and the next install overwrites the inactive slot anyway)."""
    for model in opened or []:
        try:
            model.close()
        except Exception:
            _LOGGER.exception("candidate_close_failed slot=%s", candidate.slot)
    try:
        store.discard_candidate(candidate)
    except Exception:
        _LOGGER.exception("candidate_discard_failed slot=%s version=%s", candidate.slot, candidate.version)


def evaluate_candidate(deployment: Deployment, store: ModelStore, settings: EvalSettings, *,
                       measure: MeasureFn, paired: PairedFn | None = None,
                       incumbent: LoadedModel | None = None,
                       runtime_info: RuntimeInfo | None = None) -> Evaluation:
    """Verify, install, load and measure the downloaded candidate; never raises for a bad model.

    Each step catches every Exception (MemoryError under a memory cap, a full disk, a broken
    golden.json, a measurement bug): the server must get a report, not wait for its deadline.
    """
    m = deployment.manifest
    started = time.perf_counter()
    try:
        packed = deployment.receiver.verified_path()  # hashed and unpacked from disk, never whole in memory
    except Exception as exc:
        return failed_evaluation(deployment, settings, exc, "verify_error", runtime_info)
    try:
        candidate = store.install_candidate(packed, model_id=m.model_id, version=m.version,
                                            deployment_id=m.deployment_id,
                                            max_unpacked_bytes=settings.max_unpacked_bytes,
                                            declared_size=m.unpacked_size)
    except Exception as exc:
        return failed_evaluation(deployment, settings, exc, "load_error", runtime_info,
                                 prefix="cannot install the candidate: ")
    install_ms = (time.perf_counter() - started) * 1000.0  # whole-file check + unpack + fsync + rename
    slot_dir = store.model_dir(candidate)
    model_bytes = _size_or_none(slot_dir / artifact.MODEL_FILE)
    try:
        golden = artifact.read_golden(slot_dir)
        histories = np.asarray(golden["histories"], dtype=np.int32)
        golden_ids = np.asarray(golden["item_ids"], dtype=np.int32)
        golden_scores = np.asarray(golden["scores"], dtype=np.float32) if golden.get("scores") else None
    except Exception as exc:  # ProtocolError, ragged lists, ids beyond int32 (OverflowError), MemoryError
        _discard(store, candidate)
        return failed_evaluation(deployment, settings, exc, "load_error", runtime_info, model_bytes,
                                 prefix="golden.json unusable: ")

    opened: list[LoadedModel] = []
    load_failures: list[BaseException] = []

    def load() -> Any:
        try:
            model = open_model(slot_dir, model_id=m.model_id, version=m.version, threads=settings.threads,
                               runtime=settings.runtime)
        except Exception as exc:
            load_failures.append(exc)  # so a MemoryError while loading is a load_error, not a measure_error
            raise
        opened.append(model)
        return model.recommender

    try:
        figures = measure(load, histories, mode=settings.mode, threads=settings.threads,
                          power_source=settings.power_source, golden_ids=golden_ids, golden_scores=golden_scores,
                          **({"config": settings.measure_config} if settings.measure_config is not None else {}))
    except ModelLoadError as exc:
        _discard(store, candidate, opened)
        kind = "op_version" if isinstance(exc, OpVersionError) else "load_error"
        return _failure(deployment, settings, kind, str(exc), "load_failed", exc.runtime or runtime_info, model_bytes)
    except Exception as exc:  # a measurement bug must still yield a report, not a stuck deployment
        _LOGGER.exception("measure_failed deployment=%s", m.deployment_id)
        _discard(store, candidate, opened)
        default = "load_error" if any(exc is f or exc.__cause__ is f for f in load_failures) else "measure_error"
        return failed_evaluation(deployment, settings, exc, default, runtime_info, model_bytes)
    loaded = opened[-1]
    for extra in opened[:-1]:
        extra.close()
    try:
        report = _measured_report(deployment, settings, figures, loaded, model_bytes, install_ms,
                                  _paired_figures(deployment, settings, paired, incumbent, loaded, histories))
    except Exception as exc:  # figures the Report refuses (a measurement bug): still a report
        _LOGGER.exception("report_build_failed deployment=%s", m.deployment_id)
        _discard(store, candidate, [loaded])
        return failed_evaluation(deployment, settings, exc, "measure_error", runtime_info, model_bytes,
                                 prefix="measurement figures unusable: ")
    _LOGGER.info("candidate_measured deployment=%s p50_ms=%s agreement=%s", m.deployment_id,
                 (report.latency_ms or {}).get("p50"), (report.quality or {}).get("agreement_at_k"))
    return Evaluation(report=report, candidate=candidate, loaded=loaded)


def _paired_figures(deployment: Deployment, settings: EvalSettings, paired: PairedFn | None,
                    incumbent: LoadedModel | None, loaded: LoadedModel, histories: np.ndarray) -> Any:
    """Incumbent vs candidate on this device; optional, so a failure only costs the figure."""
    if paired is None or incumbent is None or settings.paired_pairs <= 0:
        return None
    try:
        result = paired(incumbent.recommender, loaded.recommender, histories, settings.paired_pairs)
        result["incumbent_version"] = incumbent.version
        return result
    except Exception:
        _LOGGER.exception("paired_compare_failed deployment=%s", deployment.deployment_id)
        return None


def _measured_report(deployment: Deployment, settings: EvalSettings, figures: dict[str, Any], loaded: LoadedModel,
                     model_bytes: int | None, install_ms: float, paired_result: Any) -> Report:
    m = deployment.manifest
    context = dict(figures.get("context") or {})
    context["measure_config"] = figures.get("config")
    context["measure_s"] = figures.get("measure_s")
    context["verify_install_ms"] = round(install_ms, 1)
    return Report(
        device_id=settings.device_id, deployment_id=m.deployment_id, model_id=m.model_id, version=m.version,
        load_ok=True, mode=figures.get("mode", settings.mode),
        runtime=figures.get("runtime") or (loaded.runtime.to_dict() if loaded.runtime else None),
        model_bytes=model_bytes, latency_ms=figures.get("latency_ms"), memory=figures.get("memory"),
        energy=figures.get("energy"), quality=figures.get("quality"), context=context, paired=paired_result,
    )


def _size_or_none(path: Any) -> int | None:
    try:
        return int(path.stat().st_size)
    except OSError:
        return None


def encode_report(report: Report) -> bytes:
    """NaN/inf figures become None (not valid JSON): an unavailable figure, never a made-up one."""
    return dumps_compact(report.to_dict())


def evaluate_and_encode(dep: Deployment, store: ModelStore, settings: EvalSettings, *, measure: MeasureFn,
                        paired: PairedFn | None, incumbent: LoadedModel | None,
                        runtime_info: RuntimeInfo) -> tuple[Evaluation, bytes]:
    """`evaluate_candidate` and the report's wire bytes; an agent bug in either still yields a report."""
    result: Evaluation | None = None
    try:
        result = evaluate_candidate(dep, store, settings, measure=measure, paired=paired, incumbent=incumbent,
                                    runtime_info=runtime_info)
        return result, encode_report(result.report)
    except Exception as exc:  # evaluate_candidate reports model failures itself; this is an agent bug
        _LOGGER.exception("evaluation_failed deployment=%s", dep.deployment_id)
        drop_candidate(store, dep, result)
        failed = failed_evaluation(dep, settings, exc, "measure_error" if result else "load_error", runtime_info,
                                   prefix="agent error while evaluating: ")
        return failed, encode_report(failed.report)


def drop_candidate(store: ModelStore, dep: Deployment, result: Evaluation | None) -> None:
    """Close and delete a candidate whose evaluation broke down (never the active or previous model)."""
    try:
        if result is not None and result.loaded is not None:
            result.loaded.close()
        candidate = result.candidate if result else None
        if candidate is None:
            held = store.slot_contents(store.inactive_slot())
            candidate = held if held is not None and held.deployment_id == dep.deployment_id else None
        if candidate is not None:
            store.discard_candidate(candidate)
    except Exception:  # cleanup only: the report and the incumbent matter more
        _LOGGER.exception("discard_failed deployment=%s", dep.deployment_id)
