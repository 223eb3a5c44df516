"""The device's recommendation API, called the way the shopper's app on the device calls it.

Locally that is the agent's port on 127.0.0.1; for a real device it is whatever URL reaches it
(`--hil-device-http`, e.g. an `ssh -L 8700:127.0.0.1:8700 pi` tunnel), or nothing.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

_LOGGER = logging.getLogger(__name__)


class HttpApiError(RuntimeError):
    """The API answered with an error status or not at all; carries the URL, status and body."""

    def __init__(self, url: str, status: int | None, detail: str) -> None:
        super().__init__(f"{url}: {'HTTP ' + str(status) if status else 'no answer'}: {detail[:500]}")
        self.url = url
        self.status = status


class AgentHttp:
    """`POST /recommend`, `GET /model`, `GET /healthz` on one agent."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise HttpApiError(url, exc.code, exc.read().decode(errors="replace")) from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise HttpApiError(url, None, f"{type(exc).__name__}: {exc}") from exc

    def recommend(self, history: list[str], k: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"history": history}
        if k is not None:
            body["k"] = k
        return self._call("POST", "/recommend", body)

    def model(self) -> dict[str, Any]:
        return self._call("GET", "/model")

    def reachable(self) -> str | None:
        """None when `/healthz` answers (even 503 "no model yet"), else why not."""
        try:
            self._call("GET", "/healthz")
        except HttpApiError as exc:
            if exc.status == 503:
                return None
            return str(exc)
        return None
