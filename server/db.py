"""A small database adapter so the registry's SQL stays portable: SQLite by default, PostgreSQL by URL.

Queries are written once with `?` placeholders and ANSI types; the dialect rewrites the
placeholder and the auto-increment key type in one place. One connection is shared by the
server's threads behind a lock: the registry's writes are few and tiny. PostgreSQL (psycopg 3,
the `postgres` extra) lets several server processes on several hosts share one registry.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from protocol.redact import redact_url

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dialect:
    """What differs between SQL engines for the registry's statements."""

    name: str
    placeholder: str
    serial_pk: str

    def adapt(self, sql: str) -> str:
        """Rewrite a `?`-placeholder statement for this engine (and its `{serial_pk}` type)."""
        sql = sql.replace("{serial_pk}", self.serial_pk)
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)


SQLITE = Dialect("sqlite", "?", "INTEGER PRIMARY KEY AUTOINCREMENT")
POSTGRES = Dialect("postgres", "%s", "BIGSERIAL PRIMARY KEY")


class Database(Protocol):
    """The registry's view of a database: run statements, fetch dict rows, group writes."""

    dialect: Dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the affected row count."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of a SELECT as dicts."""

    def transaction(self) -> Any:
        """Context manager grouping statements atomically."""

    def close(self) -> None:
        """Release the connection."""

    def sqlalchemy_url(self) -> str:
        """The same database as a SQLAlchemy URL (schema migrations open their own connection)."""


class _LockedConnection:
    """execute/query over one DB-API connection, serialised by a lock (connections are not thread safe)."""

    dialect: Dialect
    _conn: Any
    _lock: threading.RLock

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            cur = self._conn.execute(self.dialect.adapt(sql), tuple(params))
            return cur.rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._conn.execute(self.dialect.adapt(sql), tuple(params))
            return [dict(row) for row in cur.fetchall()]


class SqliteDatabase(_LockedConnection):
    """SQLite file in WAL mode, shared by threads, safe alongside a CLI process on the same file."""

    dialect = SQLITE

    def __init__(self, path: Path, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so a transaction spans statements.
        self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                     check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._depth = 0
        with self._lock:
            self._set_wal(busy_timeout_s)
            # WAL + NORMAL: commits stay atomic and survive a killed process; only a power cut can
            # lose the last ones (devices re-send their state and reports). FULL fsynced every event
            # row, which waits behind any other process's pending writes on ext4 (~5 ms per commit
            # while an agent on the same host stages a model).
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
        _LOGGER.debug("opened sqlite registry %s", self.path)

    def _set_wal(self, timeout_s: float) -> None:
        """Switch to WAL. On a new file opened by several processes at once SQLite answers this pragma
        "database is locked" at once, without waiting on the busy timeout: so wait here, as long."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def sqlalchemy_url(self) -> str:
        return f"sqlite:///{self.path.resolve()}"

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; nested uses join the outer transaction."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            # IMMEDIATE takes the write lock up front, so read-then-write (next version) cannot race
            # another process.
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
            finally:
                self._depth = 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class DatabaseConnectError(RuntimeError):
    """The registry database named by a URL cannot be reached; the message names it (password redacted)."""


class DatabaseUnavailable(RuntimeError):  # noqa: N818 - reads as a state, like ConnectionRefused
    """The registry database dropped the connection (restart, failover); the statement did not run.

    The connection is re-opened on the next call; the caller retries its whole unit of work.
    """


class DatabaseConflict(DatabaseUnavailable):  # noqa: N818 - a kind of the state above
    """The database aborted the transaction to resolve a conflict with another one (a deadlock, a
    serialization failure, a lock it could not take); nothing of it was written, and retrying the
    whole unit of work is the fix, as after a lost connection."""


class PostgresDatabase(_LockedConnection):
    """PostgreSQL through psycopg 3 in autocommit mode; `transaction()` groups statements (nested = savepoint)."""

    dialect = POSTGRES

    def __init__(self, url: str, connect_timeout_s: float = 10.0) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError as exc:  # the optional dependency is missing, say how to get it
            raise RuntimeError(f"PostgreSQL registry {_redact(url)!r} needs psycopg 3: "
                               "pip install 'edgeguide[postgres]' (or psycopg[binary])") from exc
        self.url = url
        try:
            self._conn = psycopg.connect(url, autocommit=True, row_factory=dict_row,
                                         connect_timeout=max(1, int(connect_timeout_s)))
        except psycopg.OperationalError as exc:
            raise DatabaseConnectError(f"cannot connect to the PostgreSQL registry {_redact(url)}: "
                                       f"{str(exc).strip()}") from exc
        self._lock = threading.RLock()
        self._connect_timeout_s = connect_timeout_s
        _LOGGER.debug("opened postgres registry %s", _redact(url))

    def sqlalchemy_url(self) -> str:
        """psycopg 3 through SQLAlchemy's `postgresql+psycopg` dialect."""
        return "postgresql+psycopg://" + self.url.split("://", 1)[1]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            self._reopen_if_lost()
            try:
                return super().execute(sql, params)
            except self._psycopg.OperationalError as exc:
                raise self._lost(exc) from exc

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            self._reopen_if_lost()
            try:
                return super().query(sql, params)
            except self._psycopg.OperationalError as exc:
                raise self._lost(exc) from exc

    @property
    def _psycopg(self) -> Any:
        import psycopg
        return psycopg

    def _lost(self, exc: Exception) -> Exception:
        if not (self._conn.closed or self._conn.broken):
            # SQLSTATE class 40 (transaction rollback: deadlock, serialization) and 55P03 (lock not available).
            state = getattr(exc, "sqlstate", None) or ""
            if state.startswith("40") or state == "55P03":
                return DatabaseConflict(f"PostgreSQL registry {_redact(self.url)}: transaction aborted by a "
                                        f"conflict, to be retried: {str(exc).strip()}")
            return exc  # another statement error reported as operational: not ours to hide
        _LOGGER.warning("PostgreSQL registry %s: connection lost (%s); re-opening on the next call",
                        _redact(self.url), str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
        return DatabaseUnavailable(f"PostgreSQL registry {_redact(self.url)} unavailable: {str(exc).strip()}")

    def _reopen_if_lost(self) -> None:
        """A new connection after a restart of the database; DatabaseUnavailable while it is still down."""
        if not (self._conn.closed or self._conn.broken):
            return
        from psycopg.rows import dict_row
        try:
            self._conn = self._psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                                               connect_timeout=max(1, int(self._connect_timeout_s)))
        except self._psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"PostgreSQL registry {_redact(self.url)} unavailable: "
                                      f"{str(exc).strip()}") from exc
        _LOGGER.warning("PostgreSQL registry %s: connection re-opened", _redact(self.url))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT; a nested use becomes a savepoint inside the outer transaction."""
        with self._lock:
            self._reopen_if_lost()
            try:
                with self._conn.transaction():
                    yield
            except self._psycopg.OperationalError as exc:
                raise self._lost(exc) from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    return redact_url(url)


def is_database_url(text: str) -> bool:
    """True for a `postgresql://` / `postgres://` URL (anything else is a SQLite file path)."""
    return str(text).startswith(("postgres://", "postgresql://"))


def open_database(url_or_path: str | Path) -> Database:
    """Open the registry database: `postgresql://...` (psycopg 3) or a file path (SQLite)."""
    text = str(url_or_path)
    if is_database_url(text):
        return PostgresDatabase(text)
    return SqliteDatabase(Path(text))
