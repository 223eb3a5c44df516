"""The in-process recommendation API, with atomic hot swap of the model behind it.

A promotion or rollback must not fail a request that already picked the old model, and must
not leak the old interpreter. TFLite interpreters are not thread safe, so every request holds
its model's lock (the Recommender's own) around the invoke anyway; that one lock is also the
pin: `swap` retires the old model, takes its lock (waiting for the request inside, at most
`drain_timeout_s`) and closes it; a request that was queued on a closed model simply retries
on the new active one. A request is therefore one lock step and no shared counter, which keeps
the API close to the bare interpreter (bench/serving.py). Different models never wait for each
other; measurements on the serving model (paired comparison) share its lock, so they are safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.model import LoadedModel
from agent.runtime import Recommender

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
    """One model as served: lookup tables built once, its lock, and its lifecycle flags.

    `retired` and `closed` change under the service lock; `closed` is also only set while `lock`
    is held, so a request holding `lock` that sees `closed` False may use the interpreter.
    """

    model: LoadedModel
    index: dict[str, int]
    index_of: Callable[[str], int]  # index.__getitem__, bound once
    codes: list[str]
    descriptions: list[str]
    padding: list[list[int]]  # padding[n]: the zeros that left-pad n known items to the window
    lock: threading.Lock
    top_k: Callable[[list[int]], tuple[list[int], list[float]]]  # call with `lock` held
    loaded_at: float
    served: int = 0  # model answers, counted under `lock`
    fallback_served: int = 0  # popularity answers, counted under the service lock
    retired: bool = False
    closed: bool = False  # claimed for closing; `released` is set once the close has finished
    released: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def build(cls, model: LoadedModel) -> _Slot:
        """Precompute the code -> index table once, so a request does only dict lookups."""
        index: dict[str, int] = {}
        for idx, (code, _desc) in enumerate(model.items):
            key = code.strip().upper()
            if idx == 0 or not key:
                continue  # index 0 is padding and must never be fed as an item
            index.setdefault(key, idx)
        rec = model.recommender
        if isinstance(rec, Recommender):
            lock, top_k = rec.lock, rec.top_k_locked
        else:  # any other object with .recommend (tests wrap the real one): serialised by our own lock
            lock, top_k = threading.Lock(), _lists_from(rec)
        return cls(model=model, index=index, index_of=index.__getitem__, codes=[c for c, _ in model.items],
                   descriptions=[d for _, d in model.items],
                   padding=[[0] * (model.window - n) for n in range(model.window + 1)],
                   lock=lock, top_k=top_k, loaded_at=time.time())


def _lists_from(rec: Any) -> Callable[[list[int]], tuple[list[int], list[float]]]:
    """`top_k_locked` semantics on top of a plain `.recommend(ndarray)`."""

    def top_k(window: list[int]) -> tuple[list[int], list[float]]:
        ids, scores = rec.recommend(np.asarray(window, dtype=np.int32))
        return np.asarray(ids).tolist(), np.asarray(scores).tolist()

    return top_k


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

        A request already running on the previous model finishes there; new requests see
        `model` at once. Returns after the previous model is closed, or after `drain_timeout_s`
        (the request still running on it then closes it).
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
                if old is not None:
                    old.retired = True
                    self._draining.append(old)
            _LOGGER.info("swap from=%s/%s to=%s/%s", *_ident(old.model if old else None), *_ident(model))
            if old is None:
                return
            # Holding the model's lock means no request is inside its interpreter.
            deadline = time.monotonic() + self.drain_timeout_s
            if old.lock.acquire(timeout=self.drain_timeout_s):
                try:
                    close_now = self._claim_close(old)
                finally:
                    old.lock.release()
                if close_now:
                    self._close(old)
                    return
            # The last request on it claimed the close: wait until that request has finished it.
            if not old.released.wait(max(0.0, deadline - time.monotonic())):
                _LOGGER.warning("swap_drain_timeout model_id=%s version=%s after %.1f s; "
                                "the request still running on it will close it", *_ident(old.model),
                                self.drain_timeout_s)

    def _slot_for(self, model: LoadedModel) -> _Slot:
        """A fresh slot, or the still-draining slot of the same model object (a quick swap back)."""
        with self._lock:
            if self._active is not None and self._active.model is model:
                return self._active
            for slot in self._draining:
                if slot.model is model and not slot.closed:
                    self._draining.remove(slot)
                    slot.retired = False
                    return slot
        return _Slot.build(model)

    def close(self) -> None:
        """Stop serving and release the active model (same as `swap(None)`)."""
        self.swap(None)

    def _claim_close(self, slot: _Slot) -> bool:
        """True for exactly one caller, holding `slot.lock`, once the slot is retired: it must close it."""
        with self._lock:
            if not slot.retired or slot.closed:
                return False
            slot.closed = True
            if slot in self._draining:
                self._draining.remove(slot)
            return True

    def _close(self, slot: _Slot) -> None:
        # Called after releasing slot.lock: a Recommender's close takes that lock itself.
        try:
            slot.model.close()
        except Exception:  # a broken close must not fail the request that triggered it
            _LOGGER.exception("model_close_failed model_id=%s version=%s", *_ident(slot.model))
        finally:
            slot.released.set()
        _LOGGER.info("model_released model_id=%s version=%s served=%d", *_ident(slot.model),
                     slot.served + slot.fallback_served)

    # ----------------------------------------------------------------- requests
    def recommend(self, history: Sequence[str], k: int | None = None) -> dict[str, Any]:
        """Recommend up to `k` products for a history of stock codes (oldest first, most recent last).

        Unknown codes are ignored and listed; an empty or all-unknown history gets the
        popularity fallback; only the most recent `window` known codes are used.
        """
        # The hot path is written out in one function on purpose: every call and attribute
        # lookup here costs a measurable share of a ~40 us invoke (bench/serving.py).
        if not isinstance(history, (list, tuple)):  # the tuple form is faster than `list | tuple`
            raise RequestError(f"history must be a list of stock codes, got {type(history).__name__}")
        if len(history) > self.max_history:
            raise RequestError(f"history has {len(history)} codes; at most {self.max_history} are accepted "
                               f"(only the most recent ones are used anyway)")
        while True:
            slot = self._active
            if slot is None:
                raise NoModelError()
            model = slot.model
            model_k = model.k
            if k is not None:
                k = _check_k(k, model_k)
            try:  # common case: every code known, spelled exactly as in the catalogue
                known = list(map(slot.index_of, history))
                unknown: list[str] = []
            except (KeyError, TypeError):  # unknown, odd spelling, or not a string at all
                known, unknown = _lookup_careful(history, slot.index)
            n = len(known)
            if not n:
                return self._fallback(slot, model_k if k is None else k, unknown)
            window_len = model.window
            truncated = n > window_len
            window = known[-window_len:] if truncated else slot.padding[n] + known if n < window_len else known
            close_now = False
            try:
                with slot.lock:
                    if slot.closed:
                        continue  # swapped out and closed while this request queued: use the new model
                    try:
                        ids, scores = slot.top_k(window)
                        slot.served += 1
                    finally:  # the last request on a retired model closes it, even when it failed
                        close_now = slot.retired and self._claim_close(slot)
            finally:
                if close_now:
                    self._close(slot)  # outside the lock: a Recommender's close takes it
            break
        if k is not None and k < model_k:
            ids, scores = ids[:k], scores[:k]
        codes, descriptions, size = slot.codes, slot.descriptions, len(slot.codes)
        items = [{"stock_code": codes[i], "description": descriptions[i], "score": s}
                 for i, s in zip(ids, scores, strict=True) if 0 < i < size]
        return {"items": items, "unknown": unknown, "truncated": truncated, "fallback": None,
                "model": {"model_id": model.model_id, "version": model.version}}

    def _fallback(self, slot: _Slot, k: int, unknown: list[str]) -> dict[str, Any]:
        """Popularity answer for a history with no known code (no interpreter involved)."""
        with self._lock:
            slot.fallback_served += 1
            self._fallbacks += 1
        model = slot.model
        items = [{"stock_code": slot.codes[i], "description": slot.descriptions[i], "score": None}
                 for i in model.popular[:k]]
        return {"items": items, "unknown": unknown, "truncated": False, "fallback": FALLBACK_POPULARITY,
                "model": {"model_id": model.model_id, "version": model.version}}

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
            "served": slot.served + slot.fallback_served,
        }

    def stats(self) -> dict[str, int]:
        """Counters for logs and heartbeats (`inflight`: 1 while the active interpreter is busy)."""
        with self._lock:
            active = self._active
            return {"swaps": self._swaps, "fallbacks": self._fallbacks,
                    "served_active": active.served + active.fallback_served if active else 0,
                    "inflight": int(active.lock.locked()) if active else 0,
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
