"""Jobs: the shared queue of generations submitted now and collected later, and their images.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("request", sa.LargeBinary, nullable=False),
        sa.Column("cost", sa.BigInteger, nullable=False),
        sa.Column("reservation_id", sa.String(36)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("lease_owner", sa.String(200)),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error_status", sa.String(32)),
        sa.Column("error_message", sa.String(2000)),
        sa.Column("usage", sa.BigInteger),
        sa.Column("balance", sa.BigInteger),
        sa.Column("image_count", sa.Integer),
        sa.Column("content_type", sa.String(32)),
        sa.Column("results_expire_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired')",
                           name="ck_jobs_status"),
    )
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"])
    op.create_index("ix_jobs_key_id_created_at", "jobs", ["key_id", "created_at"])
    op.create_table(
        "job_images",
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_images")
    op.drop_table("jobs")
