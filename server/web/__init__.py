"""The fleet dashboard: `edgeguide-server serve --http HOST:PORT` serves it from the server process.

Pages (fleet, devices, deployments, rollouts, models, the compression search's Pareto chart) read
the registry through its public read methods and the report files on disk; operator actions go
through the running server's deployer and rollout manager. See docs/dashboard.md.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

from server.web.app import DashboardConfig, create_app
from server.web.auth import TokenError, check_token

_LOGGER = logging.getLogger(__name__)

ENV_TOKEN = "EDGEGUIDE_HTTP_TOKEN"

__all__ = ["ENV_TOKEN", "DashboardConfig", "DashboardServer", "TokenError", "create_app", "parse_http",
           "read_token", "start_dashboard"]


def parse_http(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:8080`) -> (host, port); ValueError with the expected form."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http expects HOST:PORT, e.g. 127.0.0.1:8080, got {text!r}")
    return host, int(port)


def read_token(token_file: Path | None) -> str | None:
    """The operator token from `token_file`, else $EDGEGUIDE_HTTP_TOKEN, else None (read-only dashboard).

    Never from a command-line value: that would show in `ps`."""
    if token_file is not None:
        try:
            return check_token(Path(token_file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read the dashboard token file {token_file}: {exc}") from exc
    value = os.environ.get(ENV_TOKEN)
    return check_token(value) if value else None


def _allowed_hosts(host: str, port: int) -> tuple[str, ...]:
    """Host headers to accept: a loopback bind accepts only loopback names (DNS rebinding guard)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        return ("*",)
    return ("127.0.0.1", "localhost", "::1", "[::1]")


class DashboardServer:
    """uvicorn serving the dashboard app on its own thread; `start()` returns once it listens."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise ValueError(f"cannot listen on {host}:{port} for the dashboard: {exc}") from exc
        self._sock.listen(128)
        self.host = host
        self.port = self._sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 15.0) -> DashboardServer:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="edgeguide-dashboard", daemon=True)
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.05)):
            if self._server.started:
                break
            deadline.wait(0.05)
        else:
            raise RuntimeError(f"the dashboard did not start within {timeout:.0f} s")
        _LOGGER.info("dashboard on %s", self.url)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._sock.close()


def start_dashboard(server: Any, http: str, *, token: str | None, search_paths: list[Path] | None = None
                    ) -> DashboardServer:
    """Serve the dashboard of a started EdgeGuideServer on `http` (HOST:PORT); the caller stops it."""
    host, port = parse_http(http)
    if token is None:
        _LOGGER.warning("dashboard: no operator token (set $%s or --http-token-file): read-only", ENV_TOKEN)
    config = DashboardConfig(token=token, search_paths=tuple(search_paths or ()),
                             allowed_hosts=_allowed_hosts(host, port))
    return DashboardServer(create_app(server.registry, server, config), host, port).start()
