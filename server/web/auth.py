"""Operator sessions for the dashboard: a token configured on the server, a session cookie, CSRF tokens.

Why this shape: the dashboard is read-only for everyone; only a person who types the operator
token gets a session. The session id lives in an HttpOnly, SameSite=Strict cookie (a page on
another site cannot make the browser send it with a POST), and every action form also carries
the session's CSRF token, compared in constant time; a POST whose Origin is another site is
refused too. Sessions are in memory: a server restart logs everyone out, which is the safe
failure. The token itself is never stored in a cookie, rendered or logged.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

_LOGGER = logging.getLogger(__name__)

SESSION_COOKIE = "edgeguide_session"
SESSION_TTL_S = 8 * 3600.0
MIN_TOKEN_CHARS = 16
# Failed logins allowed per client address per window before it must wait.
MAX_FAILURES = 5
FAILURE_WINDOW_S = 60.0


class TokenError(ValueError):
    """The configured operator token is unusable (too short to resist guessing)."""


def check_token(token: str) -> str:
    """The token stripped of surrounding whitespace; TokenError if it is too short."""
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"the dashboard operator token must have at least {MIN_TOKEN_CHARS} characters "
                         f"(got {len(token)}); e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(24))'`")
    return token


@dataclass
class Session:
    """One logged-in browser: its CSRF token and when it expires."""

    csrf: str
    expires: float
    flash: str = ""


class Sessions:
    """Login, lookup and CSRF checks; `token=None` means no operator can log in (read-only dashboard)."""

    def __init__(self, token: str | None) -> None:
        self._token = check_token(token) if token is not None else None
        self._sessions: dict[str, Session] = {}
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def throttled(self, client: str) -> bool:
        """True while `client` has used up its failed logins in the current window."""
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(client, []) if now - t < FAILURE_WINDOW_S]
            self._failures[client] = recent
            return len(recent) >= MAX_FAILURES

    def login(self, offered: str, client: str) -> str | None:
        """A new session id if `offered` is the token, else None (and the failure is counted)."""
        if self._token is None or not hmac.compare_digest(offered.strip().encode(), self._token.encode()):
            with self._lock:
                self._failures.setdefault(client, []).append(time.monotonic())
            _LOGGER.warning("dashboard: failed operator login from %s", client)
            return None
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            self._expire()
            self._sessions[session_id] = Session(csrf=secrets.token_urlsafe(32), expires=time.time() + SESSION_TTL_S)
        _LOGGER.info("dashboard: operator logged in from %s", client)
        return session_id

    def logout(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    def get(self, session_id: str | None) -> Session | None:
        """The live session for a cookie value, or None."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires < time.time():
                del self._sessions[session_id]
                return None
            return session

    def _expire(self) -> None:
        now = time.time()
        for key in [k for k, s in self._sessions.items() if s.expires < now]:
            del self._sessions[key]


def csrf_ok(session: Session | None, offered: object) -> bool:
    """The form's CSRF token matches the session's (constant-time)."""
    return session is not None and bool(offered) and hmac.compare_digest(str(offered).encode(),
                                                                          session.csrf.encode())


def same_origin(origin: str | None, referer: str | None, host: str | None) -> bool:
    """A POST from this dashboard's own pages: Origin (or, without it, Referer) names our Host.

    Browsers send Origin with every POST; a request with neither header (a script, curl) is
    accepted here and still needs the session cookie and the CSRF token."""
    source = origin if origin and origin != "null" else referer
    if not source:
        return origin is None
    return bool(host) and urlsplit(source).netloc == host
