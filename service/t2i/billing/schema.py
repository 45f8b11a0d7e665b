"""Tables of the billing database (SQLAlchemy Core). Alembic migrations create them.

Money moves only through `ledger_entries`, an append-only journal: credit (top-up), reserve,
commit (charge) and release. `api_keys.balance` (spendable) and `api_keys.reserved` are
running totals of that journal, updated in the same transactions, so every balance can be
recomputed from the entries (see Ledger.verify).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
)

metadata = MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY.
_bigint_id = BigInteger().with_variant(Integer, "sqlite")

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("key_prefix", String(16), nullable=False),
    Column("name", String(200), nullable=False),
    Column("tier", String(50), nullable=False),
    Column("balance", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    CheckConstraint("balance >= 0", name="ck_api_keys_balance_not_negative"),
    CheckConstraint("reserved >= 0", name="ck_api_keys_reserved_not_negative"),
)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("id", _bigint_id, primary_key=True, autoincrement=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("reservation_id", String(36)),
    Column("model_id", Integer),
    Column("request_id", String(128)),
    Column("note", String(200)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("amount > 0", name="ck_ledger_entries_amount_positive"),
    CheckConstraint("kind IN ('credit', 'reserve', 'commit', 'release')", name="ck_ledger_entries_kind"),
    Index("ix_ledger_entries_key_id", "key_id", "id"),
    Index("ix_ledger_entries_reservation_id", "reservation_id"),
    # Nothing reads the new id back; not asking for it saves work on every insert.
    implicit_returning=False,
)

reservations = Table(
    "reservations",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("model_id", Integer),
    Column("request_id", String(128)),
    Column("owner", String(200), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("resolved_at", DateTime(timezone=True)),
    CheckConstraint("state IN ('open', 'committed', 'released')", name="ck_reservations_state"),
    Index("ix_reservations_state_owner", "state", "owner"),
    implicit_returning=False,
)

idempotency_records = Table(
    "idempotency_records",
    metadata,
    Column("key_id", String(32), ForeignKey("api_keys.id"), primary_key=True),
    Column("idempotency_key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reservation_id", String(36)),
    Column("response", LargeBinary),
    Column("usage", BigInteger),
    Column("balance", BigInteger),
    Column("created_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("state IN ('running', 'done', 'failed')", name="ck_idempotency_records_state"),
    Index("ix_idempotency_records_reservation_id", "reservation_id"),
)

instances = Table(
    "instances",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
)

# Jobs (t2i.jobs): generations submitted now and collected later, in the same database as the
# money so that every replica pulls from one queue. `request` is the GenerateImageRequest as
# submitted (protobuf bytes); a running job is leased to one replica until `lease_expires_at`.
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("request", LargeBinary, nullable=False),
    Column("cost", BigInteger, nullable=False),
    Column("reservation_id", String(36)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("lease_owner", String(200)),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False),
    Column("error_status", String(32)),
    Column("error_message", String(2000)),
    Column("usage", BigInteger),
    Column("balance", BigInteger),
    Column("image_count", Integer),
    Column("content_type", String(32)),
    Column("results_expire_at", DateTime(timezone=True)),
    Column("webhook_url", String(2048)),
    Column("webhook_events", String(200)),  # comma-separated
    CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired')",
                    name="ck_jobs_status"),
    Index("ix_jobs_status_created_at", "status", "created_at"),
    Index("ix_jobs_key_id_created_at", "key_id", "created_at"),
)

job_images = Table(
    "job_images",
    metadata,
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

# Webhooks of jobs (t2i.jobs.webhooks): each key's signing secret, and every event to deliver
# with its attempts (the id is the webhook-id header, the same for every retry).
webhook_secrets = Table(
    "webhook_secrets",
    metadata,
    Column("key_id", String(32), ForeignKey("api_keys.id"), primary_key=True),
    Column("secret", String(100), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("event", String(32), nullable=False),
    Column("url", String(2048), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_attempt_at", DateTime(timezone=True)),
    Column("last_status", Integer),
    Column("last_error", String(500)),
    CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="ck_webhook_deliveries_status"),
    Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_job_id", "job_id"),
)

# What a job's watchers see (GET /jobs/{id}/events): the events of its generation as the
# synchronous stream sends them (GenerateImageEvent bytes), numbered per job from 1. `seq` is
# the event id a watcher resumes after; `attempt` tells a restarted job's events apart.
job_events = Table(
    "job_events",
    metadata,
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("attempt", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
