"""RecommendService on real tiny TFLite artifacts: request semantics, fuzzing, hot swap under load."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import LoadedModel, open_model
from agent.serving import NoModelError, RecommendService, RequestError
from protocol import artifact


@pytest.fixture(scope="session")
def serving_artifacts(tiny_artifact: Path, tiny_artifact_int8: Path) -> tuple[Path, Path]:
    return tiny_artifact, tiny_artifact_int8


@pytest.fixture
def model_a(serving_artifacts: tuple[Path, Path]) -> LoadedModel:
    return open_model(serving_artifacts[0], model_id="tiny", version=1)


@pytest.fixture
def service(model_a: LoadedModel) -> RecommendService:
    svc = RecommendService(max_history=200)
    svc.swap(model_a)
    yield svc
    svc.close()


def _codes(model: LoadedModel, indices: list[int]) -> list[str]:
    return [model.items[i][0] for i in indices if i]


def _ids(model: LoadedModel, response: dict) -> list[int]:
    index = {code: i for i, (code, _) in enumerate(model.items) if i}
    return [index[item["stock_code"]] for item in response["items"]]


# ------------------------------------------------------------------------------ semantics
def test_golden_histories_give_the_exported_top_k(service: RecommendService, model_a: LoadedModel) -> None:
    golden = artifact.read_golden(model_a.path)
    for history, expected_ids, expected_scores in zip(golden["histories"][:16], golden["item_ids"][:16],
                                                      golden["scores"][:16], strict=True):
        response = service.recommend(_codes(model_a, history))
        assert _ids(model_a, response) == expected_ids
        np.testing.assert_allclose([i["score"] for i in response["items"]], expected_scores, rtol=1e-5, atol=1e-6)
        assert response["fallback"] is None and response["unknown"] == [] and response["truncated"] is False
        assert response["model"] == {"model_id": "tiny", "version": 1}
        first = response["items"][0]
        assert first["description"] == model_a.items[expected_ids[0]][1]


def test_codes_match_case_insensitively_and_unknown_codes_are_listed(service: RecommendService,
                                                                    model_a: LoadedModel) -> None:
    history = _codes(model_a, artifact.read_golden(model_a.path)["histories"][3])
    baseline = service.recommend(history, k=5)
    noisy = [f"  {c.lower()} " for c in history]
    noisy.insert(1, "NOPE-1")
    noisy.append("nope-2")
    noisy.append("NOPE-1")
    response = service.recommend(noisy, k=5)
    assert response["items"] == baseline["items"]
    assert response["unknown"] == ["NOPE-1", "nope-2"]
    assert len(response["items"]) == 5


@pytest.mark.parametrize("history", [[], ["NO-SUCH-CODE", "ALSO-NOT"], [""]])
def test_empty_or_unknown_history_gets_the_popularity_fallback(service: RecommendService, model_a: LoadedModel,
                                                               history: list[str]) -> None:
    response = service.recommend(history, k=7)
    assert response["fallback"] == "popularity"
    assert [item["stock_code"] for item in response["items"]] == _codes(model_a, model_a.popular[:7])
    assert all(item["score"] is None for item in response["items"])
    assert response["unknown"] == list(dict.fromkeys(history))


def test_long_history_is_truncated_to_the_most_recent_window(service: RecommendService, model_a: LoadedModel) -> None:
    window = model_a.window
    recent = _codes(model_a, list(range(1, window + 1)))
    older = _codes(model_a, list(range(window + 1, window + 11)))
    truncated = service.recommend(older + recent)
    exact = service.recommend(recent)
    assert truncated["truncated"] is True and exact["truncated"] is False
    assert truncated["items"] == exact["items"]


def test_unknown_codes_do_not_count_towards_the_window(service: RecommendService, model_a: LoadedModel) -> None:
    recent = _codes(model_a, list(range(1, model_a.window + 1)))
    response = service.recommend(["X1", "X2", *recent])
    assert response["truncated"] is False and response["unknown"] == ["X1", "X2"]


@pytest.mark.parametrize("k", [0, -1, 21, 10**9, True, 2.0, "3", [3], float("nan")])
def test_bad_k_is_a_request_error_naming_the_value(service: RecommendService, k: object) -> None:
    with pytest.raises(RequestError, match=r"k must be"):
        service.recommend([], k=k)  # type: ignore[arg-type]


@pytest.mark.parametrize(("history", "pattern"), [
    ("85123A", r"history must be a list of stock codes, got str"),
    ({"85123A": 1}, r"got dict"),
    (None, r"got NoneType"),
    ([85123], r"history\[0\] must be a stock code string, got int 85123"),
    (["85123A", ["x"]], r"history\[1\] .* got list"),
    (["a"] * 201, r"history has 201 codes; at most 200"),
])
def test_bad_history_is_a_request_error(service: RecommendService, history: object, pattern: str) -> None:
    with pytest.raises(RequestError, match=pattern):
        service.recommend(history)  # type: ignore[arg-type]


def test_default_k_is_the_models_top_k_and_k_limits_the_answer(service: RecommendService,
                                                               model_a: LoadedModel) -> None:
    history = _codes(model_a, [1, 2, 3])
    assert len(service.recommend(history)["items"]) == model_a.k
    assert service.recommend(history, k=3)["items"] == service.recommend(history)["items"][:3]


def test_without_a_model_requests_fail_clearly_and_health_says_so(model_a: LoadedModel) -> None:
    svc = RecommendService()
    assert svc.healthy() is False and svc.model_info() is None
    with pytest.raises(NoModelError, match="no model is active"):
        svc.recommend(["85123A"])
    svc.swap(model_a)
    assert svc.healthy() is True
    info = svc.model_info()
    assert info is not None
    assert (info["model_id"], info["version"], info["window"], info["k"]) == ("tiny", 1, model_a.window, model_a.k)
    assert info["runtime"]["name"] == model_a.runtime.name
    assert info["metrics"]["hr10"] == model_a.metrics["hr10"]
    svc.close()
    assert svc.healthy() is False and model_a.recommender.closed


# ------------------------------------------------------------------------------ fuzzing
_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def _histories(draw: st.DrawFn, codes: list[str]) -> object:
    element = st.sampled_from(codes) | st.sampled_from(codes).map(str.lower) | st.text(max_size=10) | _JSONISH
    return draw(st.lists(element, max_size=60) | _JSONISH)


@pytest.fixture(scope="module")
def fuzz_target(serving_artifacts: tuple[Path, Path]) -> tuple[RecommendService, LoadedModel]:
    svc = RecommendService(max_history=50)
    model = open_model(serving_artifacts[1], model_id="tiny-int8", version=2)
    svc.swap(model)
    yield svc, model
    svc.close()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_requests_either_answer_consistently_or_raise_request_error(
        fuzz_target: tuple[RecommendService, LoadedModel], data: st.DataObject) -> None:
    fuzz_service, model = fuzz_target
    codes = [c for c, _ in model.items[1:60]]
    history = data.draw(_histories(codes), label="history")
    k = data.draw(st.none() | st.integers(-3, 30) | _JSONISH, label="k")
    try:
        response = fuzz_service.recommend(history, k)  # type: ignore[arg-type]
    except RequestError as exc:
        assert str(exc)
        return
    catalogue = {c.upper() for c, _ in model.items[1:]}
    known = [h for h in history if h.strip().upper() in catalogue]
    want_k = model.k if k is None else k
    assert len(response["items"]) == min(want_k, model.k)
    assert all(item["stock_code"].upper() in catalogue for item in response["items"])
    assert response["fallback"] == (None if known else "popularity")
    assert response["truncated"] == (len(known) > model.window)
    assert set(response["unknown"]) == {h for h in history if h.strip().upper() not in catalogue}
    assert response["model"] == {"model_id": "tiny-int8", "version": 2}
    assert fuzz_service.healthy()


# ------------------------------------------------------------------------------ hot swap
class _GatedRecommender:
    """The real recommender, but each call waits for `release` so a request can be held in flight."""

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.fail: Exception | None = None  # raised instead of answering once released

    def recommend(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        self.entered.set()
        if not self.release.wait(10):
            raise TimeoutError("test never released the gated request")
        if self.fail is not None:
            raise self.fail
        return self._inner.recommend(history)

    @property
    def closed(self) -> bool:
        return self._inner.closed

    def close(self) -> None:
        self._inner.close()


def _gated(model: LoadedModel) -> tuple[LoadedModel, _GatedRecommender]:
    gate = _GatedRecommender(model.recommender)
    return dataclasses.replace(model, recommender=gate), gate


def test_swap_waits_for_in_flight_requests_before_closing_the_old_model(serving_artifacts: tuple[Path, Path]) -> None:
    old, gate = _gated(open_model(serving_artifacts[0], model_id="tiny", version=1))
    new = open_model(serving_artifacts[1], model_id="tiny-int8", version=2)
    history = _codes(new, [1, 2, 3])
    svc = RecommendService()
    svc.swap(old)
    held: dict = {}
    request = threading.Thread(target=lambda: held.update(svc.recommend(history)))
    request.start()
    assert gate.entered.wait(10)
    swapper = threading.Thread(target=svc.swap, args=(new,))
    swapper.start()
    deadline = time.monotonic() + 5
    while svc.model_info()["version"] != 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    # New requests already go to the new model while the old one is still busy and open.
    assert svc.recommend(history)["model"]["version"] == 2
    assert swapper.is_alive() and not old.recommender.closed
    assert svc.stats()["draining"] == 1
    gate.release.set()
    request.join(10)
    swapper.join(10)
    assert held["model"] == {"model_id": "tiny", "version": 1} and len(held["items"]) == old.k
    assert old.recommender.closed and not new.recommender.closed
    assert svc.stats()["draining"] == 0
    svc.close()


def test_after_a_drain_timeout_the_last_request_closes_the_old_model(serving_artifacts: tuple[Path, Path]) -> None:
    old, gate = _gated(open_model(serving_artifacts[0], model_id="tiny", version=1))
    new = open_model(serving_artifacts[1], model_id="tiny-int8", version=2)
    svc = RecommendService(drain_timeout_s=0.05)
    svc.swap(old)
    request = threading.Thread(target=svc.recommend, args=(_codes(new, [4, 5]),))
    request.start()
    assert gate.entered.wait(10)
    started = time.monotonic()
    svc.swap(new)
    assert time.monotonic() - started < 5
    assert not old.recommender.closed
    gate.release.set()
    request.join(10)
    assert old.recommender.closed
    svc.close()


def test_swapping_back_to_a_draining_model_keeps_it_open(serving_artifacts: tuple[Path, Path]) -> None:
    old, gate = _gated(open_model(serving_artifacts[0], model_id="tiny", version=1))
    new = open_model(serving_artifacts[1], model_id="tiny-int8", version=2)
    svc = RecommendService(drain_timeout_s=0.01)
    svc.swap(old)
    request = threading.Thread(target=svc.recommend, args=(_codes(new, [6, 7]),))
    request.start()
    assert gate.entered.wait(10)
    svc.swap(new)  # times out while the gated request holds `old`
    svc.swap(old)  # rollback to the very same object before it drained
    gate.release.set()
    request.join(10)
    assert not old.recommender.closed and new.recommender.closed
    assert svc.recommend(["85123A"])["model"]["version"] == 1
    svc.close()
    assert old.recommender.closed


def _wait_until_blocked_in_recommend(thread: threading.Thread) -> None:
    """Until `thread` sits inside RecommendService.recommend (it can only block on the model lock there)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        frame = sys._current_frames().get(thread.ident)
        if frame is not None and frame.f_code is RecommendService.recommend.__code__:
            time.sleep(0.1)  # past the read of the active model, waiting for its lock
            return
        time.sleep(0.002)
    raise AssertionError("the second request never reached RecommendService.recommend")


def test_a_request_queued_on_a_swapped_out_model_is_answered_by_the_new_one(
        serving_artifacts: tuple[Path, Path]) -> None:
    old, gate = _gated(open_model(serving_artifacts[0], model_id="tiny", version=1))
    new = open_model(serving_artifacts[1], model_id="tiny-int8", version=2)
    history = _codes(new, [1, 2, 3])
    svc = RecommendService()
    svc.swap(old)
    answers: dict[str, dict] = {}
    first = threading.Thread(target=lambda: answers.update(first=svc.recommend(history)))
    first.start()
    assert gate.entered.wait(10)
    second = threading.Thread(target=lambda: answers.update(second=svc.recommend(history)))
    second.start()
    _wait_until_blocked_in_recommend(second)
    swapper = threading.Thread(target=svc.swap, args=(new,))
    swapper.start()
    deadline = time.monotonic() + 5
    while svc.model_info()["version"] != 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    gate.release.set()  # the first request finishes on the old model and closes it
    for thread in (first, second, swapper):
        thread.join(10)
    assert answers["first"]["model"]["version"] == 1 and answers["second"]["model"]["version"] == 2
    assert gate.calls == 1  # the queued request never touched the closed interpreter
    assert old.recommender.closed and svc.stats()["draining"] == 0
    svc.close()


def test_a_failing_last_request_still_closes_the_retired_model(serving_artifacts: tuple[Path, Path]) -> None:
    old, gate = _gated(open_model(serving_artifacts[0], model_id="tiny", version=1))
    gate.fail = RuntimeError("interpreter blew up")
    new = open_model(serving_artifacts[1], model_id="tiny-int8", version=2)
    svc = RecommendService(drain_timeout_s=0.05)
    svc.swap(old)
    errors: list[BaseException] = []

    def request() -> None:
        try:
            svc.recommend(_codes(new, [4, 5]))
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=request)
    thread.start()
    assert gate.entered.wait(10)
    svc.swap(new)  # gives up waiting after 0.05 s
    assert not old.recommender.closed and svc.stats()["draining"] == 1
    gate.release.set()
    thread.join(10)
    assert [str(e) for e in errors] == ["interpreter blew up"]
    assert old.recommender.closed and svc.stats()["draining"] == 0
    assert svc.recommend(_codes(new, [4, 5]))["model"]["version"] == 2
    svc.close()


class _CountingLock:
    """The Recommender's lock, counting how often it is taken."""

    def __init__(self, inner: threading.Lock) -> None:
        self._inner = inner
        self.acquired = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._inner.acquire(blocking, timeout)
        self.acquired += got
        return got

    def release(self) -> None:
        self._inner.release()

    def locked(self) -> bool:
        return self._inner.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_a_request_takes_only_the_models_own_lock_once(serving_artifacts: tuple[Path, Path]) -> None:
    model = open_model(serving_artifacts[0], model_id="tiny", version=1)
    counting = _CountingLock(model.recommender.lock)
    model.recommender.lock = counting  # type: ignore[assignment]
    svc = RecommendService()
    svc.swap(model)
    history = _codes(model, [1, 2, 3, 4])
    for _ in range(10):
        svc.recommend(history)
    assert counting.acquired == 10
    svc.recommend(["NOT-A-CODE"])  # the popularity fallback never touches the interpreter
    assert counting.acquired == 10
    # A measurement holding the serving model's lock (paired comparison) makes requests wait.
    done = threading.Event()
    with counting:
        thread = threading.Thread(target=lambda: (svc.recommend(history), done.set()))
        thread.start()
        assert not done.wait(0.2)
    assert done.wait(10)
    thread.join(10)
    svc.close()
    assert model.recommender.closed


def test_a_closed_model_is_refused(serving_artifacts: tuple[Path, Path]) -> None:
    model = open_model(serving_artifacts[0], model_id="tiny", version=1)
    model.close()
    with pytest.raises(ValueError, match=r"tiny v1 is already closed"):
        RecommendService().swap(model)


def test_hot_swap_under_continuous_load_loses_no_request(serving_artifacts: tuple[Path, Path]) -> None:
    fp32, int8 = serving_artifacts
    svc = RecommendService()
    first = open_model(fp32, model_id="tiny", version=1)
    svc.swap(first)
    codes = [c for c, _ in first.items[1:40]]
    stop = threading.Event()
    errors: list[BaseException] = []
    served: list[int] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            history = [codes[i] for i in rng.integers(0, len(codes), size=int(rng.integers(0, 30)))]
            try:
                response = svc.recommend(history, k=5)
                assert len(response["items"]) == 5
                with lock:
                    served.append(response["model"]["version"])
            except BaseException as exc:  # noqa: BLE001 - any failure is what this test counts
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(4)]
    for thread in threads:
        thread.start()
    replaced: list[LoadedModel] = [first]
    try:
        for version in range(2, 14):  # 12 swaps, alternating between the two real models
            path, model_id = (int8, "tiny-int8") if version % 2 == 0 else (fp32, "tiny")
            nxt = open_model(path, model_id=model_id, version=version)
            svc.swap(nxt)
            assert replaced[-1].recommender.closed  # swap returns after the old model drained
            replaced.append(nxt)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # let the load hit every version
                with lock:
                    if served.count(version) >= 20:
                        break
                time.sleep(0.002)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert errors == []
    assert set(range(1, 14)) <= set(served)
    assert all(served.count(v) >= 20 for v in range(2, 14))
    assert svc.stats()["swaps"] == 13 and svc.stats()["draining"] == 0
    svc.close()
    assert all(m.recommender.closed for m in replaced)
