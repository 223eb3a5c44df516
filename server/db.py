"""A small database adapter so the registry's SQL stays portable (SQLite now, PostgreSQL later).

Queries are written once with `?` placeholders and ANSI types; the dialect rewrites the
placeholder and the auto-increment key type in one place. One connection is shared by the
server's threads behind a lock: the registry's writes are few and tiny.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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


class SqliteDatabase:
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
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
        _LOGGER.debug("opened sqlite registry %s", self.path)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            cur = self._conn.execute(self.dialect.adapt(sql), tuple(params))
            return cur.rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._conn.execute(self.dialect.adapt(sql), tuple(params))
            return [dict(row) for row in cur.fetchall()]

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


def open_database(url_or_path: str | Path) -> Database:
    """Open the registry database: a file path (SQLite) today; `postgresql://` is for issue 5."""
    text = str(url_or_path)
    if text.startswith(("postgres://", "postgresql://")):
        raise NotImplementedError(f"PostgreSQL registry not available yet ({text!r}): use a SQLite path")
    return SqliteDatabase(Path(text))
