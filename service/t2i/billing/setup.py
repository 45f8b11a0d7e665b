"""Assemble billing from settings: the ledger database, the limiter and the interceptor."""

from __future__ import annotations

import logging
from pathlib import Path

from ..server.catalog import ModelCatalog
from ..settings import ServeSettings
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
        engine = open_database(url, startup_timeout=settings.database_startup_timeout_seconds)
    except Exception as error:
        raise RuntimeError(f"cannot open the billing database {redact(url)}: {error}") from error
    log.info("billing database ready", extra={"database": redact(url)})
    return Ledger(engine, reservation_ttl=settings.reservation_ttl_seconds, idempotency_ttl=settings.idempotency_ttl_seconds)


def build_billing(serve: ServeSettings, catalog: ModelCatalog) -> BillingInterceptor:
    settings = load_billing_settings(serve.billing_config)
    ledger = open_ledger(serve.data_dir, serve.database_url, settings)
    limiter = create_limiter(serve.redis_url, settings)
    log.info("rate limits", extra={"backend": "redis" if serve.redis_url else "in-process", "policy": settings.redis_failure_policy})
    return BillingInterceptor(ledger, limiter, settings, catalog, trusted_proxies=serve.trusted_proxies,
                              webhook_allow=serve.webhook_allow)
