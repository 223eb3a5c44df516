"""The registry's schema version: upgraded with Alembic whenever a registry is opened.

Statements stay plain SQL on `server.db`'s connection; SQLAlchemy Core and Alembic are used
only here, where they pay: versioned, ordered migrations that run the same on SQLite and
PostgreSQL. A registry already at the newest revision is recognised with one query, without
importing either library, so opening one stays cheap for the command line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from server.db import Database
from server.registry.records import RegistryError

_LOGGER = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Every revision in migrations/versions, oldest first (tests check this against Alembic's own list).
REVISIONS = ("0001", "0002")
HEAD = REVISIONS[-1]
VERSION_TABLE = "alembic_version"


def current_revision(db: Database) -> str | None:
    """The revision stamped in the database, or None for a new or an unversioned (pre-migration) one."""
    if db.dialect.name == "sqlite":
        present = db.query("SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = ?",
                           (VERSION_TABLE,))[0]["n"]
    else:
        present = db.query("SELECT to_regclass(?) IS NOT NULL AS n", (VERSION_TABLE,))[0]["n"]
    if not present:
        return None
    rows = db.query(f"SELECT version_num FROM {VERSION_TABLE}")
    return str(rows[0]["version_num"]) if rows else None


def upgrade(db: Database, sqlalchemy_url: str) -> None:
    """Bring the database to HEAD (creating it, or adopting an unversioned one); a no-op when it is there."""
    current = current_revision(db)
    if current == HEAD:
        return
    if current is not None and current not in REVISIONS:
        raise RegistryError(f"the registry database is at schema revision {current!r}, newer than this server "
                            f"knows ({HEAD!r}): run a newer edgeguide on it")
    _LOGGER.info("upgrading the registry schema from %s to %s", current or "unversioned", HEAD)
    _run_alembic(sqlalchemy_url, "head")


def _run_alembic(sqlalchemy_url: str, target: str) -> None:
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    engine = _engine(sa, sqlalchemy_url)
    try:
        with engine.begin() as connection:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            config.attributes["connection"] = connection
            command.upgrade(config, target)
    finally:
        engine.dispose()


def _engine(sa: Any, url: str) -> Any:
    """A one-connection engine; on SQLite each transaction takes the write lock first (BEGIN IMMEDIATE)."""
    if not url.startswith("sqlite"):
        return sa.create_engine(url, poolclass=sa.pool.NullPool)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"timeout": 10.0})

    @sa.event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        # Two processes opening one new file: the second waits here, then finds the schema at HEAD.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
