"""The in-process recommendation API, with atomic hot swap of the model behind it.

Why a reference count per model: a promotion or rollback must not fail a request that already
picked the old model, and must not leak the old interpreter. Each request pins the model that
was active when it arrived; the old model is closed by whoever finishes with it last (normally
`swap`, which waits for the drain). Invokes are serialised per model because TFLite interpreters
are not thread safe; different models never wait for each other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.model import LoadedModel

_LOGGER = logging.getLogger(__name__)

DEFAULT_MAX_HISTORY = 1000
DEFAULT_DRAIN_TIMEOUT_S = 30.0
FALLBACK_POPULARITY = "popularity"


class ServingError(Exception):
    """Base class of the errors `RecommendService` raises on purpose."""


class RequestError(ServingError, ValueError):
    """The caller's input is invalid (HTTP 400); the message says which value and why."""


class NoModelError(ServingError):
    """No model is active yet (HTTP 503): the agent has not installed or promoted one."""

    def __init__(self) -> None:
        super().__init__("no model is active yet; the agent serves once a model has been installed and promoted")


@dataclass(eq=False)
class _Slot:
    """One model as served: its lookup table, lock and in-flight count (guarded by the service lock)."""

    model: LoadedModel
    index: dict[str, int]
    codes: list[str]
    descriptions: list[str]
    padding: list[int]
    loaded_at: float
    invoke_lock: threading.Lock = field(default_factory=threading.Lock)
    inflight: int = 0
    served: int = 0
    retired: bool = False
    closed: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def build(cls, model: LoadedModel) -> _Slot:
        """Precompute the code -> index table once, so a request does only dict lookups."""
        index: dict[str, int] = {}
        for idx, (code, _desc) in enumerate(model.items):
            key = code.strip().upper()
            if idx == 0 or not key:
                continue  # index 0 is padding and must never be fed as an item
            index.setdefault(key, idx)
        return cls(model=model, index=index, codes=[c for c, _ in model.items],
                   descriptions=[d for _, d in model.items], padding=[0] * model.window, loaded_at=time.time())


class RecommendService:
    """Turns a shopper's recent stock codes into recommended products using the active model.

    Thread safe. `swap` takes ownership of the model handed to it and closes the model it
    replaces once that model's in-flight requests have finished.
    """

    def __init__(self, *, max_history: int = DEFAULT_MAX_HISTORY,
                 drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> None:
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        if drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {drain_timeout_s}")
        self.max_history = max_history
        self.drain_timeout_s = drain_timeout_s
        self._lock = threading.Lock()  # guards _active and every slot's counters
        self._swap_lock = threading.Lock()  # one swap at a time, so drains never interleave
        self._active: _Slot | None = None
        self._draining: list[_Slot] = []
        self._swaps = 0
        self._fallbacks = 0

    # ----------------------------------------------------------------- model lifecycle
    def swap(self, model: LoadedModel | None) -> None:
        """Make `model` the active one atomically (None: stop serving) and release the previous one.

        Requests that already started finish on the previous model; new requests see `model`
        at once. Returns after the previous model is closed, or after `drain_timeout_s` (its
        last request then closes it).
        """
        if model is not None and getattr(model.recommender, "closed", False):
            raise ValueError(f"model {model.model_id} v{model.version} is already closed; open it again to serve it")
        with self._swap_lock:
            new = None if model is None else self._slot_for(model)
            with self._lock:
                old = self._active
                if old is new:
                    _LOGGER.info("swap_noop model_id=%s version=%s", *_ident(model))
                    return
                self._active = new
                self._swaps += 1
                close_now = False
                if old is not None:
                    old.retired = True
                    close_now = old.inflight == 0
                    if not close_now:
                        self._draining.append(old)
            _LOGGER.info("swap from=%s/%s to=%s/%s", *_ident(old.model if old else None), *_ident(model))
            if old is None:
                return
            if close_now:
                self._close(old)
            elif not old.closed.wait(self.drain_timeout_s):
                _LOGGER.warning("swap_drain_timeout model_id=%s version=%s inflight=%d after %.1f s; "
                                "its last request will close it", *_ident(old.model), old.inflight,
                                self.drain_timeout_s)

    def _slot_for(self, model: LoadedModel) -> _Slot:
        """A fresh slot, or the still-draining slot of the same model object (a quick swap back)."""
        with self._lock:
            if self._active is not None and self._active.model is model:
                return self._active
            for slot in self._draining:
                if slot.model is model and not slot.closed.is_set():
                    self._draining.remove(slot)
                    slot.retired = False
                    return slot
        return _Slot.build(model)

    def close(self) -> None:
        """Stop serving and release the active model (same as `swap(None)`)."""
        self.swap(None)

    def _acquire(self) -> _Slot:
        with self._lock:
            slot = self._active
            if slot is None:
                raise NoModelError()
            slot.inflight += 1
            return slot

    def _release(self, slot: _Slot, fallback: bool) -> None:
        with self._lock:
            slot.inflight -= 1
            slot.served += 1
            if fallback:
                self._fallbacks += 1
            close_now = slot.retired and slot.inflight == 0 and not slot.closed.is_set()
            if close_now and slot in self._draining:
                self._draining.remove(slot)
        if close_now:
            self._close(slot)

    def _close(self, slot: _Slot) -> None:
        # Only one caller reaches here per slot: the decision is taken under self._lock.
        try:
            slot.model.close()
        except Exception:  # a broken close must not fail the request that triggered it
            _LOGGER.exception("model_close_failed model_id=%s version=%s", *_ident(slot.model))
        finally:
            slot.closed.set()
        _LOGGER.info("model_released model_id=%s version=%s served=%d", *_ident(slot.model), slot.served)

    # ----------------------------------------------------------------- requests
    def recommend(self, history: Sequence[str], k: int | None = None) -> dict[str, Any]:
        """Recommend up to `k` products for a history of stock codes (oldest first, most recent last).

        Unknown codes are ignored and listed; an empty or all-unknown history gets the
        popularity fallback; only the most recent `window` known codes are used.
        """
        if not isinstance(history, list | tuple):
            raise RequestError(f"history must be a list of stock codes, got {type(history).__name__}")
        if len(history) > self.max_history:
            raise RequestError(f"history has {len(history)} codes; at most {self.max_history} are accepted "
                               f"(only the most recent ones are used anyway)")
        slot = self._acquire()
        fallback = False
        try:
            model = slot.model
            k = _check_k(k, model.k)
            known, unknown = _lookup(history, slot.index)
            truncated = len(known) > model.window
            if known:
                # left-padded with 0, most recent last, as in training
                window = np.array(known[-model.window:] if truncated else slot.padding[len(known):] + known,
                                  dtype=np.int32)
                with slot.invoke_lock:
                    ids, scores = model.recommender.recommend(window)
                    ids, scores = ids.tolist(), scores.tolist()
                codes, descriptions, n = slot.codes, slot.descriptions, len(slot.codes)
                items = [{"stock_code": codes[i], "description": descriptions[i], "score": s}
                         for i, s in zip(ids[:k], scores[:k], strict=False) if 0 < i < n]
                fallback_name = None
            else:
                fallback = True
                items = [{"stock_code": slot.codes[i], "description": slot.descriptions[i], "score": None}
                         for i in model.popular[:k]]
                fallback_name = FALLBACK_POPULARITY
            return {"items": items, "unknown": unknown, "truncated": truncated, "fallback": fallback_name,
                    "model": {"model_id": model.model_id, "version": model.version}}
        finally:
            self._release(slot, fallback)

    # ----------------------------------------------------------------- introspection
    def healthy(self) -> bool:
        """True when a model is active (the app can get real recommendations)."""
        return self._active is not None

    def model_info(self) -> dict[str, Any] | None:
        """The active model's identity, shape, runtime and metrics; None when none is active."""
        slot = self._active
        if slot is None:
            return None
        model = slot.model
        return {
            "model_id": model.model_id,
            "version": model.version,
            "window": model.window,
            "k": model.k,
            "num_items": len(slot.codes) - 1,
            "runtime": model.runtime.to_dict() if model.runtime is not None else None,
            "metrics": model.metrics,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(slot.loaded_at)),
            "served": slot.served,
        }

    def stats(self) -> dict[str, int]:
        """Counters for logs and heartbeats."""
        with self._lock:
            active = self._active
            return {"swaps": self._swaps, "fallbacks": self._fallbacks,
                    "served_active": active.served if active else 0,
                    "inflight": active.inflight if active else 0,
                    "draining": len(self._draining)}


def _ident(model: LoadedModel | None) -> tuple[str | None, int | None]:
    return (model.model_id, model.version) if model is not None else (None, None)


def _check_k(k: object, model_k: int) -> int:
    if k is None:
        return model_k
    if type(k) is not int:  # bool is an int subclass, and 2.0 is not a count
        raise RequestError(f"k must be an integer in 1..{model_k}, got {type(k).__name__} {k!r:.40}")
    if not 1 <= k <= model_k:
        raise RequestError(f"k must be in 1..{model_k} (the model's top-K), got {k}")
    return k


def _lookup(history: Sequence[object], index: dict[str, int]) -> tuple[list[int], list[str]]:
    """Model indices of the known codes in order, and the distinct unknown codes as given.

    The common case (every code known, exact spelling) is one C-level pass over the history;
    anything else takes the careful path that validates types and normalises case.
    """
    try:
        found = list(map(index.get, history))
    except TypeError:  # an unhashable element such as a list: the careful path names it
        found = [None]
    if None not in found:
        return found, []  # only str keys exist, so every element that matched is a string
    return _lookup_careful(history, index)


def _lookup_careful(history: Sequence[object], index: dict[str, int]) -> tuple[list[int], list[str]]:
    known: list[int] = []
    unknown: list[str] = []
    seen: set[str] = set()
    for pos, code in enumerate(history):
        if not isinstance(code, str):
            raise RequestError(f"history[{pos}] must be a stock code string, got {type(code).__name__} {code!r:.40}")
        idx = index.get(code)
        if idx is None:
            idx = index.get(code.strip().upper())
        if idx is None:
            if code not in seen:
                seen.add(code)
                unknown.append(code)
        else:
            known.append(idx)
    return known, unknown
