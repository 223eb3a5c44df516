"""The HTTP/JSON API on a real server and a real tiny model: routes, errors, limits, fuzzing."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import LoadedModel, open_model
from agent.serving import RecommendService
from agent.serving.http import ServerHandle, host_problem, start_http_server

MAX_BODY = 4096
JSON = {"Content-Type": "application/json"}
POST_HEAD = b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="session")
def http_artifact(tiny_artifact: Path) -> Path:
    return tiny_artifact


@pytest.fixture(scope="module")
def model(http_artifact: Path) -> LoadedModel:
    return open_model(http_artifact, model_id="tiny", version=3)


@pytest.fixture(scope="module")
def server(model: LoadedModel) -> ServerHandle:
    service = RecommendService(max_history=100)
    service.swap(model)
    handle = start_http_server(service, port=0, max_body=MAX_BODY, io_timeout_s=1.0)
    yield handle
    handle.stop()
    service.close()


def _request(server: ServerHandle, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw else {}), dict(response.getheaders())
    finally:
        conn.close()


def _post(server: ServerHandle, obj: object) -> tuple[int, dict]:
    status, body, _ = _request(server, "POST", "/recommend", json.dumps(obj).encode(),
                               {"Content-Type": "application/json"})
    return status, body


def _raw(server: ServerHandle, data: bytes) -> bytes:
    """Send raw bytes and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _json_of(raw_response: bytes) -> tuple[int | None, dict]:
    """Status and JSON body of a raw response; status None for an HTTP/0.9 (body only) answer."""
    if not raw_response.startswith(b"HTTP/"):
        return None, json.loads(raw_response)
    head, _, body = raw_response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


# ------------------------------------------------------------------------------ routes
def test_recommend_answers_like_the_in_process_api(server: ServerHandle, model: LoadedModel) -> None:
    history = [model.items[i][0] for i in (3, 1, 4, 1, 5)] + ["nope"]
    status, body = _post(server, {"history": history, "k": 4})
    assert status == 200
    assert len(body["items"]) == 4 and set(body["items"][0]) == {"stock_code", "description", "score"}
    assert body["unknown"] == ["nope"] and body["fallback"] is None and body["truncated"] is False
    assert body["model"] == {"model_id": "tiny", "version": 3}
    status, fallback = _post(server, {"history": []})
    assert status == 200 and fallback["fallback"] == "popularity" and len(fallback["items"]) == model.k


def test_healthz_and_model(server: ServerHandle, model: LoadedModel) -> None:
    status, body, headers = _request(server, "GET", "/healthz")
    assert status == 200 and body == {"status": "ok", "model": {"model_id": "tiny", "version": 3}}
    assert headers["Content-Type"].startswith("application/json")
    status, info, _ = _request(server, "GET", "/model?verbose=1")
    assert status == 200
    assert (info["model_id"], info["version"], info["window"], info["k"]) == ("tiny", 3, model.window, model.k)
    assert info["runtime"] == {"name": model.runtime.name, "version": model.runtime.version}
    assert info["metrics"]["num_items"] == len(model.items) - 1


def test_no_model_gives_503_not_a_crash() -> None:
    service = RecommendService()
    with start_http_server(service) as handle:
        status, body, _ = _request(handle, "GET", "/healthz")
        assert status == 503 and body["status"] == "no_model"
        status, body = _post(handle, {"history": ["85123A"]})
        assert status == 503 and "no model is active" in body["error"]
        status, body, _ = _request(handle, "GET", "/model")
        assert status == 503 and "no model" in body["error"]


@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    ("GET", "/nope", 404, None),
    ("POST", "/healthz", 405, "GET"),
    ("GET", "/recommend", 405, "POST"),
    ("DELETE", "/model", 405, "GET"),
    ("PUT", "/recommend", 405, "POST"),
])
def test_unknown_paths_and_wrong_methods(server: ServerHandle, method: str, path: str, status: int,
                                         allow: str | None) -> None:
    got, body, headers = _request(server, method, path, body=b"{}" if method != "GET" else None)
    assert got == status and body["error"]
    assert headers.get("Allow") == allow


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("body", "pattern"), [
    (b"{", "not valid UTF-8 JSON"),
    (b"\xff\xfe{}", "not valid UTF-8 JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"history": ["a"], "kk": 3}', "unknown keys"),
    (b'{"k": 3}', "missing 'history'"),
    (b'{"history": ["a"], "k": 0}', "k must be in 1.."),
    (b'{"history": ["a"], "k": "5"}', "k must be an integer"),
    (b'{"history": ["a"], "k": 1e999}', "k must be an integer"),
    (b'{"history": "85123A"}', "must be a list"),
    (b'{"history": [1]}', r"history\[0\] must be a stock code string"),
    (b'{"history": [' + b'"a",' * 100 + b'"a"]}', "at most 100"),
])
def test_malformed_requests_get_400_with_a_clear_message(server: ServerHandle, body: bytes, pattern: str) -> None:
    status, got, _ = _request(server, "POST", "/recommend", body, {"Content-Type": "application/json"})
    assert status == 400 and re.search(pattern, got["error"]), got


@pytest.mark.parametrize(("body", "pattern"), [
    (b"[" * 100_000 + b"]" * 100_000, "not valid UTF-8 JSON"),  # RecursionError inside the parser
    (b'{"history": [], "k": ' + b"9" * 5000 + b"}", "not acceptable JSON"),  # beyond int digit limit
])
def test_pathological_json_is_a_400_not_a_crash(model: LoadedModel, body: bytes, pattern: str) -> None:
    service = RecommendService()
    service.swap(open_model(model.path, model_id="tiny", version=4))
    with start_http_server(service, max_body=len(body)) as handle:
        status, got, _ = _request(handle, "POST", "/recommend", body, {"Content-Type": "application/json"})
        assert status == 400 and re.search(pattern, got["error"]), got
        assert _request(handle, "GET", "/healthz")[0] == 200
    service.close()


def test_huge_body_is_refused_with_413_and_the_server_keeps_serving(server: ServerHandle) -> None:
    huge = b'{"history": [' + b'"85123A",' * 2000 + b'"x"]}'
    assert len(huge) > MAX_BODY
    status, body, headers = _request(server, "POST", "/recommend", huge, JSON)
    assert status == 413 and f"limit of {MAX_BODY} bytes" in body["error"]
    assert headers.get("Connection") == "close"
    # Declared but never sent: the server must answer from the header alone.
    raw = _raw(server, POST_HEAD + b"Content-Length: 999999999\r\n\r\n")
    assert _json_of(raw)[0] == 413
    assert _request(server, "GET", "/healthz")[0] == 200


@pytest.mark.parametrize(("raw", "status"), [
    (POST_HEAD + b"\r\n", 411),
    (POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (POST_HEAD + b"Content-Length: -5\r\n\r\n", 400),
    (POST_HEAD + b"Content-Length: lots\r\n\r\n", 400),
    (b"GET /a b HTTP/1.1\r\n\r\n", 400),
    (b"GET /healthz HTTP/x.y\r\n\r\n", 400),  # unparsable version: still a status line, never HTTP/0.9
    (b"GARBAGE\r\n\r\n", 400),
    (b"BREW /coffee HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 501),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
])
def test_protocol_errors_are_json_and_harmless(server: ServerHandle, raw: bytes, status: int) -> None:
    got_status, body = _json_of(_raw(server, raw))
    assert got_status == status and body["error"]
    assert _request(server, "GET", "/healthz")[0] == 200


def test_keep_alive_serves_many_requests_on_one_connection(server: ServerHandle, model: LoadedModel) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for i in range(1, 30):
            conn.request("POST", "/recommend", body=json.dumps({"history": [model.items[i][0]], "k": 2}),
                         headers=JSON)
            response = conn.getresponse()
            assert response.status == 200 and len(json.loads(response.read())["items"]) == 2
            # errors keep the connection usable too (the body was fully read)
            conn.request("POST", "/recommend", body=b'{"history": 5}', headers=JSON)
            response = conn.getresponse()
            assert response.status == 400
            response.read()
    finally:
        conn.close()


def test_a_stalled_client_does_not_block_others(server: ServerHandle) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as stalled:
        stalled.sendall(POST_HEAD + b"Content-Length: 100\r\n\r\n{")
        started = time.monotonic()
        assert _request(server, "GET", "/healthz")[0] == 200
        assert time.monotonic() - started < 1.0
        # after io_timeout_s (1 s) the server answers 408 and hangs up
        answer = b""
        while chunk := stalled.recv(4096):
            answer += chunk
        assert _json_of(answer)[0] == 408


def test_head_gets_headers_only(server: ServerHandle) -> None:
    status, body, headers = _request(server, "HEAD", "/healthz")
    assert status == 405 and body == {} and headers["Allow"] == "GET"


# ------------------------------------------------------------------------------ fuzzing
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def _bodies(draw: st.DrawFn, codes: list[str]) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "request"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(_JSON)).encode()
    request = {"history": draw(st.lists(st.sampled_from(codes) | st.text(max_size=8) | _JSON, max_size=30))}
    if draw(st.booleans()):
        request["k"] = draw(st.integers(-2, 25) | _JSON)
    return json.dumps(request).encode()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bodies_get_200_or_400_and_the_server_survives(server: ServerHandle, model: LoadedModel,
                                                             data: st.DataObject) -> None:
    body = data.draw(_bodies([c for c, _ in model.items[1:50]]), label="body")
    status, answer, headers = _request(server, "POST", "/recommend", body, JSON)
    assert headers["Content-Type"].startswith("application/json")
    if status == 200:
        assert {"items", "unknown", "truncated", "fallback", "model"} == set(answer)
    else:
        assert status == 400 and isinstance(answer["error"], str) and answer["error"]
    assert _request(server, "GET", "/healthz")[0] == 200


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.sampled_from([b"POST /recommend HTTP/1.1\r\n", b"GET /healthz HTTP/1.1\r\n", b""]),
       junk=st.binary(max_size=400))
def test_fuzzed_raw_requests_never_take_the_server_down(server: ServerHandle, head: bytes, junk: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + junk + b"\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)  # EOF: the server must not wait for more
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if answer.startswith(b"HTTP/1.1 "):
        status = int(answer[9:12])
        assert 200 <= status < 600
        # every complete answer carries a JSON object body
        body = answer.partition(b"\r\n\r\n")[2]
        if status != 200 and body:
            assert isinstance(json.loads(body.split(b"HTTP/1.1 ")[0]), dict)
    assert _request(server, "GET", "/healthz")[0] == 200


# ------------------------------------------------------------------------------ browsers and bursts
@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}",
                                  "10.1.2.3:{port}", "127.0.0.1:1", "localhost.:{port}"])
def test_a_foreign_host_header_is_refused(server: ServerHandle, host: str) -> None:
    """DNS rebinding: a page on evil.example, re-pointed at 127.0.0.1, must not read /model."""
    for method, path, body in (("GET", "/model", None), ("POST", "/recommend", b'{"history": []}')):
        status, got, _ = _request(server, method, path, body, {"Host": host.format(port=server.port),
                                                                "Content-Type": "application/json"})
        assert status == 421 and "Host" in got["error"], (method, status, got)
        assert "model_id" not in got


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "127.0.0.1", "LOCALHOST:{port}"])
def test_the_bound_address_and_localhost_are_accepted_hosts(server: ServerHandle, host: str) -> None:
    status, got, _ = _request(server, "GET", "/model", None, {"Host": host.format(port=server.port)})
    assert status == 200 and got["model_id"] == "tiny"


def test_http_1_1_without_host_is_a_400(server: ServerHandle) -> None:
    status, body = _json_of(_raw(server, b"GET /model HTTP/1.1\r\nConnection: close\r\n\r\n"))
    assert status == 400 and "Host" in body["error"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
def test_a_post_that_a_browser_form_could_send_is_refused(server: ServerHandle, content_type: str | None) -> None:
    """CSRF: only `application/json` (which a cross-origin page cannot send without a preflight) is read."""
    headers = {"Content-Type": content_type} if content_type else {}
    status, got, _ = _request(server, "POST", "/recommend", b'{"history": []}', headers)
    assert status == 415 and "application/json" in got["error"], got
    ok, _, _ = _request(server, "POST", "/recommend", b'{"history": []}',
                        {"Content-Type": "Application/JSON; charset=utf-8"})
    assert ok == 200


def test_a_preflight_gets_no_cors_permission(server: ServerHandle) -> None:
    status, _, headers = _request(server, "OPTIONS", "/recommend", None,
                                  {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 405 and not any(h.lower().startswith("access-control-") for h in headers)


def _server_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("edgeguide-http") or "process_request" in t.name)


def test_a_burst_of_connections_does_not_grow_threads_past_the_pool(model: LoadedModel) -> None:
    service = RecommendService()
    service.swap(open_model(model.path, model_id="tiny", version=5))
    workers, backlog, clients = 4, 8, 60
    base = _server_threads()  # other servers of this module
    with start_http_server(service, workers=workers, queue_size=backlog, io_timeout_s=2.0) as handle:
        # Every worker first holds a half-sent request until its 2 s I/O timeout, so the burst meets a busy
        # pool however fast this machine answers /healthz (otherwise a loaded machine drains the queue
        # while the burst is still being sent, and fewer clients see the 503 the test is about).
        stalled = [socket.create_connection(("127.0.0.1", handle.port), timeout=15) for _ in range(workers)]
        for sock in stalled:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.3)
        socks = [socket.create_connection(("127.0.0.1", handle.port), timeout=15) for _ in range(clients)]
        try:
            request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{handle.port}\r\n\r\n".encode()
            peak = base
            for sock in socks:  # every connection open and asking at once, none closed by the client
                sock.sendall(request)
                peak = max(peak, _server_threads())
            time.sleep(0.3)
            peak = max(peak, _server_threads())
            answers = []
            for sock in socks:
                raw = b""
                while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < _content_length(raw):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    raw += chunk
                answers.append(_json_of(raw))
                peak = max(peak, _server_threads())
        finally:
            for sock in socks + stalled:
                sock.close()
        peak -= base
        assert peak <= workers + 1, f"{peak} server threads for {clients} connections (pool of {workers})"
        statuses = [status for status, _ in answers]
        assert set(statuses) <= {200, 503}, statuses
        # The queue's worth is served once the stalled requests time out; the rest were told 503 at once
        # instead of each costing a thread (a little slack for a worker freed while the burst arrives).
        assert statuses.count(200) >= backlog and statuses.count(503) >= clients - backlog - workers, statuses
        assert all(body.get("error") for status, body in answers if status == 503)
        assert _request(handle, "GET", "/healthz")[0] == 200
    service.close()


def _content_length(raw: bytes) -> int:
    for line in raw.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


_HEADER_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40)


@settings(max_examples=120, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(host=_HEADER_TEXT | st.sampled_from(["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "127.0.0.1",
                                             "evil.example:{port}", "127.0.0.1:{port}:{port}", "[::1", ""]),
       content_type=_HEADER_TEXT | st.sampled_from(["application/json", "application/json; charset=utf-8",
                                                    "text/plain", "APPLICATION/JSON"]))
def test_fuzzed_host_and_content_type_headers(server: ServerHandle, host: str, content_type: str) -> None:
    """Only the bound address or localhost, and only JSON bodies, ever reach the model."""
    host = host.format(port=server.port) if "{port}" in host else host
    head = f"POST /recommend HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
    body = b'{"history": []}'
    raw = _raw(server, head.encode("utf-8") + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
               + body)
    status, answer = _json_of(raw)
    expected_host = host_problem(host, server._server.allowed_hosts, server.port, False) is None
    expected_json = content_type.split(";", 1)[0].strip().lower() == "application/json"
    if status == 200:
        assert expected_host and expected_json, (host, content_type, answer)
    else:
        assert status in {400, 415, 421} and answer["error"], (status, answer)
        assert not (expected_host and expected_json) or status == 400, (host, content_type, status, answer)


def test_extra_host_names_can_be_allowed(model: LoadedModel) -> None:
    """A LAN bind reached as pi-01.local: the operator names it, every other name stays refused."""
    service = RecommendService()
    service.swap(open_model(model.path, model_id="tiny", version=6))
    with start_http_server(service, allowed_hosts=["Pi-01.local"]) as handle:
        assert _request(handle, "GET", "/model", None, {"Host": f"pi-01.local:{handle.port}"})[0] == 200
        assert _request(handle, "GET", "/model", None, {"Host": f"pi-02.local:{handle.port}"})[0] == 421
    service.close()


def test_stop_does_not_wait_for_idle_keep_alive_clients(model: LoadedModel) -> None:
    service = RecommendService()
    service.swap(open_model(model.path, model_id="tiny", version=7))
    handle = start_http_server(service, io_timeout_s=30.0)
    conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().read()  # the connection stays open, its worker waits for more
        started = time.monotonic()
        handle.stop()
        assert time.monotonic() - started < 3.0
        left = [t.name for t in threading.enumerate() if t.name.startswith(f"edgeguide-http-{handle.port}")]
        assert not left, left  # the accept thread and every worker ended
    finally:
        conn.close()
        service.close()


@pytest.mark.parametrize("raw", [b"POST /recommend HTTP/1.1\r\n\n\x00\r\n\r\n", b"\x00\r\n\r\n",
                                 b"GET /model HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\x00\r\n\r\n"])
def test_every_answer_has_a_status_line_even_after_a_garbage_line(server: ServerHandle, raw: bytes) -> None:
    """Found by fuzzing: a 400 kept the connection open, and the garbage line after it was
    answered HTTP/0.9-style, a bare body with no status line."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 ")
    # each answer is a status line, headers and a JSON object: nothing in between
    for part in answer.split(b"HTTP/1.1 ")[1:]:
        head, _, body = part.partition(b"\r\n\r\n")
        assert int(head[:3]) in (200, 400), head
        assert isinstance(json.loads(body), dict)
