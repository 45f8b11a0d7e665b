from pathlib import Path

import pytest

from testbed.server import ServerProcess

# Tight numbers so that limits can be hit quickly; heartbeats fast so that a dead replica is
# recognised within seconds.
BILLING_CONFIG = """
default_tier: standard
tiers:
  standard: {requests_per_minute: 6000, burst: 1000, max_concurrent: 100}
  tight: {requests_per_minute: 1, burst: 2, max_concurrent: 1}
  eight: {requests_per_minute: 6000, burst: 1000, max_concurrent: 8}
  single: {requests_per_minute: 6000, burst: 1000, max_concurrent: 1}
  unlimited: {requests_per_minute: 1000000, burst: 100000, max_concurrent: 100000}
auth_failures_per_minute: 1
auth_failure_burst: 3
heartbeat_seconds: 0.5
instance_timeout_seconds: 2
"""

# The demo model with a price multiplier of 9, so that a quick 256x256, 28-step euler request
# costs what the documented 768x768 example costs on the standard model: ceil(9 * 1/16 * (28 + 5) / 7) = 3.
PRICE_MULTIPLIER = 9


def write_configs(data_dir: Path, folder: Path, extra_config: str = "") -> tuple[Path, Path]:
    from t2i.models.demo import ensure_demo_model

    folder.mkdir(parents=True, exist_ok=True)
    models = folder / "models.yaml"
    models.write_text(
        "models:\n"
        f"  - id: 1\n    name: demo (priced x{PRICE_MULTIPLIER})\n    path: {ensure_demo_model(data_dir)}\n"
        f"    min_size: 64\n    price_multiplier: {PRICE_MULTIPLIER}\n"
    )
    billing = folder / "billing.yaml"
    billing.write_text(BILLING_CONFIG + extra_config)
    return models, billing


def start_billing_server(
    data_dir: Path, folder: Path, database_url: str, *extra: str, extra_config: str = "", wait: bool = True,
    gate: bool = False, compat: bool = False,
) -> ServerProcess:
    """The service on the demo model with BILLING_CONFIG (plus `extra_config` YAML lines); with
    `gate`, its UNet is behind `server.gate` (testbed/gate.py) for holding requests in flight."""
    models, billing = write_configs(data_dir, folder, extra_config)
    server = ServerProcess(
        data_dir, "--models", str(models), "--billing-config", str(billing), "--database-url", database_url, *extra,
        gate=folder / "gate" if gate else None, compat=compat,
    )
    return server.wait_serving() if wait else server


@pytest.fixture(scope="module")
def billing_db(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'billing.sqlite3'}"


@pytest.fixture(scope="module")
def billed_server(data_dir, billing_db, tmp_path_factory):
    server = start_billing_server(data_dir, tmp_path_factory.mktemp("config"), billing_db, gate=True)
    yield server
    server.kill()


@pytest.fixture(scope="module")
def ledger(billing_db):
    from t2i.billing.database import open_database
    from t2i.billing.ledger import Ledger

    db = open_database(billing_db)
    yield Ledger(db)
    db.dispose()
