"""Baseline: the registry schema as it was before it had a version (tables created on open).

Revision ID: 0001
Revises:
Every table and index is created only if missing, so a registry created by the unversioned
code (which may lack the rollout tables when no rollout ran) is adopted as it is, rows untouched.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_REAL: sa.types.TypeEngine[float] = sa.DOUBLE_PRECISION()
_SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: INTEGER PRIMARY KEY is the rowid


def _text_key(name: str) -> sa.Column:
    # The unversioned schema declared `TEXT PRIMARY KEY` without NOT NULL (PostgreSQL implies it).
    return sa.Column(name, sa.Text(), primary_key=True, nullable=True)


def upgrade() -> None:
    op.create_table(
        "artifacts", _text_key("id"),
        sa.Column("model_id", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False, unique=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("packed_path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.Text(), nullable=False),
        sa.Column("created", _REAL, nullable=False),
        if_not_exists=True)
    op.create_table(
        "devices", _text_key("device_id"),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("active_model_id", sa.Text()),
        sa.Column("active_version", sa.Integer()),
        sa.Column("runtime", sa.Text()),
        sa.Column("agent_version", sa.Text()),
        sa.Column("first_seen", _REAL, nullable=False),
        sa.Column("last_seen", _REAL, nullable=False),
        sa.Column("uptime_s", _REAL),
        sa.Column("last_error", sa.Text()),
        if_not_exists=True)
    op.create_table(
        "deployments", _text_key("deployment_id"),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("artifact_id", sa.Text(), sa.ForeignKey("artifacts.id"), nullable=False),
        sa.Column("model_id", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("policy", sa.Text()),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("report", sa.Text()),
        sa.Column("verdict", sa.Text()),
        sa.Column("resends", sa.Text(), nullable=False, server_default=sa.text("'{}'")),
        sa.Column("forced", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("created", _REAL, nullable=False),
        sa.Column("updated", _REAL, nullable=False),
        sa.Column("deadline", _REAL, nullable=False),
        if_not_exists=True)
    op.create_index("deployments_status", "deployments", ["status"], if_not_exists=True)
    op.create_table(
        "events",
        sa.Column("id", _SERIAL, primary_key=True, autoincrement=True, nullable=True),
        sa.Column("ts", _REAL, nullable=False),
        sa.Column("device_id", sa.Text()),
        sa.Column("deployment_id", sa.Text()),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False, server_default=sa.text("''")),
        sqlite_autoincrement=True, if_not_exists=True)
    op.create_index("events_device", "events", ["device_id", "id"], if_not_exists=True)
    op.create_index("events_ts", "events", ["ts"], if_not_exists=True)
    op.create_table(
        "withdrawn_artifacts", _text_key("id"),
        sa.Column("ts", _REAL, nullable=False),
        if_not_exists=True)
    op.create_table(
        "servers", _text_key("client_id"),
        sa.Column("last_seen", _REAL, nullable=False),
        if_not_exists=True)
    op.create_table(
        "rollouts", _text_key("rollout_id"),
        sa.Column("model_id", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("plan", sa.Text(), nullable=False),
        sa.Column("policy", sa.Text()),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column("created", _REAL, nullable=False),
        sa.Column("updated", _REAL, nullable=False),
        if_not_exists=True)
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.Text(), sa.ForeignKey("rollouts.rollout_id"), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.Text()),
        sa.Column("outcome", sa.Text()),
        sa.Column("detail", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
        if_not_exists=True)


def downgrade() -> None:
    for table in ("rollout_devices", "rollouts", "servers", "withdrawn_artifacts", "events", "deployments",
                  "devices", "artifacts"):
        op.drop_table(table)
