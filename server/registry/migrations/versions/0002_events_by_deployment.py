"""Index the event log by deployment: `deployments show` and `deploy --wait` read one deployment's events.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("events_deployment", "events", ["deployment_id", "id"], if_not_exists=True)


def downgrade() -> None:
    op.drop_index("events_deployment", table_name="events")
