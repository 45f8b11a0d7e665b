import pytest

from testbed.up import UpProcess

BILLING_CONFIG = """
default_tier: standard
tiers:
  standard: {requests_per_minute: 6000, burst: 1000, max_concurrent: 100}
  tight: {requests_per_minute: 1, burst: 1, max_concurrent: 1}
  solo: {requests_per_minute: 6000, burst: 1000, max_concurrent: 1}
  unlimited: {requests_per_minute: 1000000, burst: 100000, max_concurrent: 100000}
  nojobs: {requests_per_minute: 6000, burst: 1000, max_concurrent: 100, max_queued_jobs: 0}
auth_failures_per_minute: 6000
auth_failure_burst: 1000
"""


def billing_env(folder, config: str = BILLING_CONFIG) -> dict[str, str]:
    path = folder / "billing.yaml"
    path.write_text(config)
    return {"T2I_BILLING_CONFIG": str(path)}


@pytest.fixture(scope="package")
def edge(data_dir, tmp_path_factory):
    """The service and real Envoy via `t2i up`, with billing and a demo key; its UNet is behind
    `edge.gate` (testbed/gate.py, open unless a test closes it) for holding requests in flight."""
    folder = tmp_path_factory.mktemp("edge")
    up = UpProcess(data_dir, folder / "data", env=billing_env(folder), gate=folder / "gate").wait_ready()
    yield up
    up.kill()


@pytest.fixture(scope="package")
def ledger(edge):
    from t2i.billing.setup import open_ledger

    ledger = open_ledger(edge.data_dir, None)
    yield ledger
    ledger.close()
