"""Alembic's entry point for the registry: runs on the connection `server.registry.schema` hands it.

Concurrent openers are serialised before the current revision is read: PostgreSQL by a
transaction-scoped advisory lock, SQLite by the BEGIN IMMEDIATE the schema module's engine issues.
"""

from __future__ import annotations

import logging

from alembic import context

_LOGGER = logging.getLogger(__name__)

# Any fixed 64-bit number, the same in every server process: "the registry schema is being upgraded".
ADVISORY_LOCK_KEY = 0x45475F5343484D41

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})")
    context.run_migrations()
