"""HTTP/JSON front of `RecommendService` for the shopper's app on the same device.

Routes: `POST /recommend` {"history": [codes], "k": int?}, `GET /healthz`, `GET /model`.
Every answer, errors included, is a JSON object; errors are `{"error": "..."}`. The stdlib
`HTTPServer` with a fixed pool of worker threads is enough for one local app and adds no
dependency: a burst of connections waits in a bounded queue (beyond it: 503 at once) instead of
costing a thread each, which matters on a Pi and leaks memory under qemu emulation. Keep-alive
(HTTP/1.1) spares the client a TCP handshake per request; a worker gives its connection up after
a response whenever other connections are waiting, so keep-alive clients cannot starve new ones.

Browser pages on the same device are the threat: no route changes state (POST /recommend only
computes), the `Host` header must name the bound address or localhost (a DNS-rebinding page
gets 421), POST bodies must be `application/json` (a cross-origin form or `text/plain` fetch
gets 415; a JSON fetch needs a CORS preflight, which gets 405 and no Access-Control headers).
The API has no authentication, so it binds to loopback unless told otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import urlsplit

from agent.serving.hosts import allowed_hosts as _allowed_hosts
from agent.serving.hosts import host_problem, is_loopback
from agent.serving.service import NoModelError, RecommendService, RequestError

__all__ = ["ServerHandle", "host_problem", "start_http_server"]

_LOGGER = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_IO_TIMEOUT_S = 10.0
DEFAULT_WORKERS = 8
DEFAULT_QUEUE = 64
KEEPALIVE_IDLE_S = 5.0
RECOMMEND_KEYS = frozenset({"history", "k"})
_ROUTES: dict[str, frozenset[str]] = {
    "/recommend": frozenset({"POST"}),
    "/healthz": frozenset({"GET"}),
    "/model": frozenset({"GET"}),
}


class _Server(HTTPServer):
    """Accepts on one thread, serves connections on `workers` pooled threads, refuses past `queue_size`."""

    request_queue_size = 128  # listen backlog: a burst is accepted at once, then queued or refused

    def __init__(self, address: tuple[str, int], service: RecommendService, max_body: int,
                 io_timeout_s: float, workers: int, queue_size: int, allowed_hosts: Iterable[str] = ()) -> None:
        self.service = service
        self.max_body = max_body
        self.io_timeout_s = io_timeout_s
        self.keepalive_idle_s = min(io_timeout_s, KEEPALIVE_IDLE_S)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        # Set before binding: a failed bind calls server_close(), which drains these.
        self._jobs: queue.Queue[tuple[Any, Any] | None] = queue.Queue(maxsize=queue_size)
        self._active: set[socket.socket] = set()  # connections being served, closed at shutdown
        self._active_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        super().__init__(address, _Handler)
        self.allowed_hosts = _allowed_hosts(address[0]) | {h.lower() for h in allowed_hosts}
        prefix = f"edgeguide-http-{self.server_address[1]}-worker"
        self._workers = [threading.Thread(target=self._work, name=f"{prefix}-{i}", daemon=True) for i in range(workers)]
        for thread in self._workers:
            thread.start()

    @property
    def busy(self) -> bool:
        """Connections are waiting for a worker: keep-alive connections should be given up."""
        return not self._jobs.empty()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Accept thread: hand the connection to the pool, or refuse it at once when the queue is full."""
        try:
            self._jobs.put_nowait((request, client_address))
        except queue.Full:
            _refuse_busy(request)
            self.shutdown_request(request)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            request, client_address = job
            with self._active_lock:
                self._active.add(request)
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                with self._active_lock:
                    self._active.discard(request)
                self.shutdown_request(request)

    def server_close(self) -> None:
        """Close the socket, drop queued connections, stop the workers."""
        super().server_close()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self.shutdown_request(job[0])
        for _ in self._workers:
            self._jobs.put(None)
        with self._active_lock:  # an idle keep-alive or stalled client must not hold up the stop
            for request in list(self._active):
                with contextlib.suppress(OSError):
                    request.shutdown(socket.SHUT_RDWR)
        for thread in self._workers:
            thread.join(2.0)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The handler already answers 500 for its own failures; this only sees socket trouble.
        _LOGGER.debug("http_connection_error client=%s", client_address, exc_info=True)


_BUSY = json.dumps({"error": "the recommendation API is busy; retry in a moment"}).encode()


def _refuse_busy(request: socket.socket) -> None:
    """A short 503 written from the accept thread (bounded by a 1 s timeout), then the connection closes."""
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(_BUSY)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
    try:
        request.settimeout(1.0)
        request.sendall(head + _BUSY)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # HTTP/0.9 answers carry no status line: a garbage request line (also one following a request
    # on a keep-alive connection) must still get a parsable 400.
    default_request_version = "HTTP/1.0"
    server_version = "edgeguide-agent"
    error_content_type = "application/json"
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms per request on a keep-alive connection).
    disable_nagle_algorithm = True

    def setup(self) -> None:
        self.timeout = self.server.io_timeout_s  # type: ignore[misc]  # a stalled client ties up one pooled worker, at most this long
        super().setup()

    def handle(self) -> None:
        """Requests of one connection; between them the wait for the next is short (keep-alive idle)."""
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.connection.settimeout(self.server.keepalive_idle_s)
            self.handle_one_request()

    def parse_request(self) -> bool:
        self.connection.settimeout(self.server.io_timeout_s)  # the request line arrived: the normal bound again
        return super().parse_request()

    # ------------------------------------------------------------------ dispatch
    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        problem = self._host_problem()
        if problem is not None:
            self.close_connection = True  # a request for another host: nothing more on this connection
            self._send(HTTPStatus.BAD_REQUEST if "required" in problem else HTTPStatus.MISDIRECTED_REQUEST,
                       {"error": problem})
            return
        methods = _ROUTES.get(path)
        if methods is None:
            self._discard_body()
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {path!r:.100}; use POST /recommend, "
                                                       f"GET /healthz or GET /model"})
            return
        if self.command not in methods:
            self._discard_body()
            allowed = ", ".join(sorted(methods))
            self._send(HTTPStatus.METHOD_NOT_ALLOWED,
                       {"error": f"{self.command} is not allowed on {path}; use {allowed}"},
                       headers={"Allow": allowed})
            return
        try:
            if path == "/recommend":
                self._recommend()
            elif path == "/healthz":
                self._healthz()
            else:
                self._model()
        except Exception:  # nothing a request does may take the server down
            _LOGGER.exception("http_internal_error method=%s path=%s", self.command, path)
            self.close_connection = True
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the agent log"})

    # ------------------------------------------------------------------ routes
    def _host_problem(self) -> str | None:
        header = self.headers.get("Host")
        if header is None and self.request_version == "HTTP/1.0":
            return None  # no browser omits Host: nothing to rebind
        server = self.server
        wildcard = server.server_address[0] in {"0.0.0.0", "::"}
        return host_problem(header, server.allowed_hosts, int(server.server_address[1]), wildcard)

    def _recommend(self) -> None:
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            self._discard_body()
            self._send(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                       {"error": f"POST bodies must be sent as Content-Type: application/json, got "
                                 f"{content_type or 'none'!r:.60}"})
            return
        body = self._read_body()
        if body is None:
            return
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"body is not valid UTF-8 JSON: {_short(exc)}"})
            return
        except ValueError as exc:  # e.g. an integer literal longer than Python's digit limit
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"body is not acceptable JSON: {_short(exc)}"})
            return
        if not isinstance(request, dict):
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"body must be a JSON object like "
                                                         f'{{"history": ["85123A"], "k": 10}}, '
                                                         f"got {type(request).__name__}"})
            return
        extra = sorted(set(request) - RECOMMEND_KEYS)
        if extra:
            self._send(HTTPStatus.BAD_REQUEST,
                       {"error": f"unknown keys {extra!r:.200}; accepted: {sorted(RECOMMEND_KEYS)}"})
            return
        if "history" not in request:
            self._send(HTTPStatus.BAD_REQUEST, {"error": "missing 'history' (a list of stock codes, may be empty)"})
            return
        try:
            result = self.server.service.recommend(request["history"], request.get("k"))
        except RequestError as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except NoModelError as exc:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
        else:
            self._send(HTTPStatus.OK, result)

    def _healthz(self) -> None:
        info = self.server.service.model_info()
        if info is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "no_model", "model": None})
        else:
            self._send(HTTPStatus.OK, {"status": "ok",
                                       "model": {"model_id": info["model_id"], "version": info["version"]}})

    def _model(self) -> None:
        info = self.server.service.model_info()
        if info is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": NoModelError().args[0]})
        else:
            self._send(HTTPStatus.OK, info)

    # ------------------------------------------------------------------ plumbing
    def _content_length(self) -> int | None:
        """The declared body length; answers the error itself and returns None when unusable."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send(HTTPStatus.LENGTH_REQUIRED, {"error": "chunked bodies are not accepted; send Content-Length"})
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True
            self._send(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length header is required"})
            return None
        try:
            length = int(raw.strip())
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"Content-Length {raw!r:.40} is not a byte count"})
            return None
        return length

    def _read_body(self) -> bytes | None:
        length = self._content_length()
        if length is None:
            return None
        if length > self.server.max_body:
            # The unread body would be parsed as the next request: drop the connection instead.
            self.close_connection = True
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       {"error": f"body of {length} bytes exceeds the limit of {self.server.max_body} bytes"})
            return None
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            self._send(HTTPStatus.REQUEST_TIMEOUT,
                       {"error": f"body not received within {self.server.io_timeout_s:g} s"})
            return None
        if len(body) != length:
            self.close_connection = True  # the client went away mid-body; nobody is left to answer
            _LOGGER.debug("http_short_body expected=%d got=%d", length, len(body))
            return None
        return body

    def _discard_body(self) -> None:
        """Consume a small body sent to a route that ignores it, so keep-alive stays in sync."""
        raw = self.headers.get("Content-Length")
        if raw is None and "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return
        try:
            length = int(raw) if raw is not None else -1
        except ValueError:
            length = -1
        if 0 <= length <= self.server.max_body:
            if length:
                self.rfile.read(length)
        else:
            self.close_connection = True

    def _send(self, status: HTTPStatus, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if not self.close_connection and self.server.busy:
            self.close_connection = True  # others wait for a worker: this keep-alive connection yields
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors (bad request line, 414, 431, unknown method) as JSON too."""
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        self.close_connection = True
        text = message or status.phrase
        if explain:
            text = f"{text}: {explain}"
        self.log_error("code %d, message %s", code, message)
        self._send(status, {"error": text})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        _LOGGER.debug("http %s " + format, self.address_string(), *args)

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        _LOGGER.info("http_error %s " + format, self.address_string(), *args)


@dataclass
class ServerHandle:
    """A running HTTP server: where it listens and how to stop it."""

    host: str
    port: int
    _server: _Server
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the socket and wait for the accept loop to end (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout)
        self._server.server_close()
        _LOGGER.info("http_stopped url=%s", self.url)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_http_server(service: RecommendService, host: str = "127.0.0.1", port: int = 0,
                      max_body: int = DEFAULT_MAX_BODY, *, io_timeout_s: float = DEFAULT_IO_TIMEOUT_S,
                      workers: int = DEFAULT_WORKERS, queue_size: int = DEFAULT_QUEUE,
                      allowed_hosts: Iterable[str] = ()) -> ServerHandle:
    """Serve `service` on host:port (0 = any free port) and return its handle.

    One accept thread plus `workers` pooled threads, whatever the number of connections; at most
    `queue_size` connections wait for a worker, more are answered 503 at once. The Host header
    must name `host`, localhost or one of `allowed_hosts` (421 otherwise).
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    if max_body < 2:
        raise ValueError(f"max_body must be at least 2 bytes (an empty JSON object), got {max_body}")
    if io_timeout_s <= 0:
        raise ValueError(f"io_timeout_s must be > 0, got {io_timeout_s}")
    if workers < 1 or queue_size < 1:
        raise ValueError(f"workers and queue_size must be >= 1, got {workers} and {queue_size}")
    if not is_loopback(host):
        _LOGGER.warning("http_public_bind host=%s: the recommendation API has no authentication", host)
    try:
        server = _Server((host, port), service, max_body, io_timeout_s, workers, queue_size, allowed_hosts)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    bound_port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"edgeguide-http-{bound_port}", daemon=True)
    thread.start()
    handle = ServerHandle(host=host, port=bound_port, _server=server, _thread=thread)
    _LOGGER.info("http_listening url=%s max_body=%d workers=%d queue=%d", handle.url, max_body, workers, queue_size)
    return handle


def _short(exc: Exception) -> str:
    return str(exc)[:200]
