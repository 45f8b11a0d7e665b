"""Billing configuration: pricing, rate-limit tiers and failure policies (YAML, all optional).

    # billing.yaml
    megapixel_evaluations_per_stardust: 7
    tiers:
      standard: {requests_per_minute: 60, burst: 20, max_concurrent: 8, weight: 1}
    default_tier: standard
    redis_failure_policy: fail-closed
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: float = Field(gt=0)
    burst: int = Field(ge=1)
    max_concurrent: int = Field(ge=1)
    # Shares of the engine when keys compete (engine/batching.py): a key of weight 2 gets twice
    # the work done of a key of weight 1 while both wait; nobody starves.
    weight: float = Field(default=1.0, gt=0)
    # Jobs (t2i.jobs) a key may have queued at once; one more is refused with 429.
    max_queued_jobs: int = Field(default=100, ge=0)


DEFAULT_TIERS = {
    "free": Tier(requests_per_minute=10, burst=5, max_concurrent=2, weight=0.5, max_queued_jobs=10),
    "standard": Tier(requests_per_minute=60, burst=20, max_concurrent=8, weight=1.0, max_queued_jobs=100),
    "pro": Tier(requests_per_minute=600, burst=100, max_concurrent=32, weight=2.0, max_queued_jobs=1000),
    # For internal callers and load tests: limits high enough never to bind, and priority.
    "unlimited": Tier(requests_per_minute=1_000_000, burst=100_000, max_concurrent=100_000, weight=4.0,
                      max_queued_jobs=100_000),
}


class BillingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Stardust per this many megapixel-evaluations of work (t2i.cost); see pricing.py.
    megapixel_evaluations_per_stardust: float = Field(default=7.0, gt=0)
    minimum_price: int = Field(default=1, ge=0)
    tiers: dict[str, Tier] = Field(default_factory=lambda: dict(DEFAULT_TIERS))
    default_tier: str = "standard"
    # Failed authentications per client address.
    auth_failures_per_minute: float = Field(default=20, gt=0)
    auth_failure_burst: int = Field(default=10, ge=1)
    # What to do when Redis (the shared rate limiter) cannot be reached.
    redis_failure_policy: Literal["fail-closed", "fail-open"] = "fail-closed"
    # A reservation older than this is released by the sweeper even if its owner seems alive.
    reservation_ttl_seconds: float = Field(default=1800, gt=0)
    # An instance that has not heartbeated for this long is dead: its reservations are released.
    instance_timeout_seconds: float = Field(default=60, gt=0)
    heartbeat_seconds: float = Field(default=10, gt=0)
    idempotency_ttl_seconds: float = Field(default=24 * 3600, gt=0)
    # A concurrency slot lives this long unless the request holding it renews it (every third
    # of this): a slot never outlives its request by more, whatever happened to its release.
    concurrency_slot_lease_seconds: float = Field(default=15, gt=0)
    # Start-up waits this long for an unreachable ledger database, then fails.
    database_startup_timeout_seconds: float = Field(default=120, gt=0)
    # How often every replica looks for keys revoked elsewhere (their queued and running
    # requests are then stopped, released and not charged).
    revocation_poll_seconds: float = Field(default=1.0, gt=0)
    # Jobs (t2i.jobs): a queued job not started within this long expires (its price is
    # released); its reservation lives this long plus the run allowance.
    job_queue_ttl_seconds: float = Field(default=24 * 3600, gt=0)
    # A job's images are kept this long after it succeeded, then deleted.
    job_results_ttl_seconds: float = Field(default=24 * 3600, ge=0)
    # A running job is leased to its replica this long, renewed every third of it; a replica
    # that stops renewing (it died) loses the job to another after at most this long.
    job_lease_seconds: float = Field(default=30, gt=0)
    # The first retry of a job's webhook comes this long after a failed delivery; later ones
    # wait longer, in proportion (t2i.jobs.webhooks.BACKOFF_SECONDS), for up to 24 hours.
    webhook_first_retry_seconds: float = Field(default=10, gt=0, le=60)

    @model_validator(mode="after")
    def _default_tier_exists(self) -> BillingSettings:
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not one of the tiers: {', '.join(self.tiers)}")
        return self


def load_billing_settings(path: Path | None) -> BillingSettings:
    if path is None:
        return BillingSettings()
    try:
        return BillingSettings.model_validate(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError, ValidationError) as error:
        raise ValueError(f"billing config {path}: {error}") from error
