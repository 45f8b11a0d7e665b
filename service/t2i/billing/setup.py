"""Assemble billing from settings: the ledger database, the limiter and the interceptor."""

from __future__ import annotations

import logging
from pathlib import Path

from ..server.catalog import ModelCatalog
from .database import default_url, open_database, redact
from .interceptor import BillingInterceptor
from .ledger import Ledger
from .ratelimit import create_limiter
from .settings import BillingSettings, load_billing_settings

log = logging.getLogger(__name__)


def open_ledger(data_dir: Path, database_url: str | None, settings: BillingSettings | None = None) -> Ledger:
    settings = settings or BillingSettings()
    url = database_url or default_url(data_dir)
    try:
        engine = open_database(url)
    except Exception as error:
        raise RuntimeError(f"cannot open the billing database {redact(url)}: {error}") from error
    log.info("billing database ready", extra={"database": redact(url)})
    return Ledger(engine, reservation_ttl=settings.reservation_ttl_seconds, idempotency_ttl=settings.idempotency_ttl_seconds)


def build_billing(
    *, data_dir: Path, database_url: str | None, redis_url: str | None, config_file: Path | None, catalog: ModelCatalog
) -> BillingInterceptor:
    settings = load_billing_settings(config_file)
    ledger = open_ledger(data_dir, database_url, settings)
    limiter = create_limiter(redis_url, settings)
    log.info("rate limits", extra={"backend": "redis" if redis_url else "in-process", "policy": settings.redis_failure_policy})
    return BillingInterceptor(ledger, limiter, settings, catalog)
