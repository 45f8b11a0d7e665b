"""Initial billing schema: keys, the ledger journal, reservations, idempotency, instances.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_bigint_id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("key_prefix", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("tier", sa.String(50), nullable=False),
        sa.Column("balance", sa.BigInteger, nullable=False),
        sa.Column("reserved", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("balance >= 0", name="ck_api_keys_balance_not_negative"),
        sa.CheckConstraint("reserved >= 0", name="ck_api_keys_reserved_not_negative"),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", _bigint_id, primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("reservation_id", sa.String(36)),
        sa.Column("model_id", sa.Integer),
        sa.Column("request_id", sa.String(128)),
        sa.Column("note", sa.String(200)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount > 0", name="ck_ledger_entries_amount_positive"),
        sa.CheckConstraint("kind IN ('credit', 'reserve', 'commit', 'release')", name="ck_ledger_entries_kind"),
    )
    op.create_index("ix_ledger_entries_key_id", "ledger_entries", ["key_id", "id"])
    op.create_index("ix_ledger_entries_reservation_id", "ledger_entries", ["reservation_id"])
    op.create_table(
        "reservations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("model_id", sa.Integer),
        sa.Column("request_id", sa.String(128)),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("state IN ('open', 'committed', 'released')", name="ck_reservations_state"),
    )
    op.create_index("ix_reservations_state_owner", "reservations", ["state", "owner"])
    op.create_table(
        "idempotency_records",
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), primary_key=True),
        sa.Column("idempotency_key", sa.String(255), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reservation_id", sa.String(36)),
        sa.Column("response", sa.LargeBinary),
        sa.Column("usage", sa.BigInteger),
        sa.Column("balance", sa.BigInteger),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("state IN ('running', 'done', 'failed')", name="ck_idempotency_records_state"),
    )
    op.create_index("ix_idempotency_records_reservation_id", "idempotency_records", ["reservation_id"])
    op.create_table(
        "instances",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in ("instances", "idempotency_records", "reservations", "ledger_entries", "api_keys"):
        op.drop_table(table)
