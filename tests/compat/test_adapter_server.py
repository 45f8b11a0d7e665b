"""The adapters' port of a real `t2i serve` (no edge): who the caller is, and its health."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.billing.conftest import start_billing_server

WRONG = "ilx_wrong-guess-00000000000000000000000"


@pytest.fixture(scope="module")
def served(data_dir, tmp_path_factory):
    """Billing with 3 failed keys per address (tests/billing/conftest.py), trusting only
    127.0.0.1 as a proxy: the edge, and the adapters' own loopback calls."""
    folder = tmp_path_factory.mktemp("compat")
    server = start_billing_server(data_dir, folder, f"sqlite:///{folder / 'ledger.sqlite3'}", "--trusted-proxies",
                                  "127.0.0.1/32", compat=True)
    yield server
    server.kill()


def call(server, method: str, path: str, source: str, headers: dict) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.compat_port, timeout=60, source_address=(source, 0))
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def test_a_forged_x_forwarded_for_does_not_dodge_the_failed_key_limit(served):
    """From an untrusted peer (127.0.0.2) the header is ignored: the peer is the caller, and its
    fourth wrong key is refused as a rate limit, whatever address each call claims."""
    statuses = []
    for i in range(5):
        status, _, body = call(served, "GET", "/v1/models", "127.0.0.2",
                               {"Authorization": f"Bearer {WRONG}", "X-Forwarded-For": f"203.0.113.{i}"})
        statuses.append((status, body["error"]["code"]))
    assert statuses == [(401, "invalid_api_key")] * 3 + [(429, "rate_limit_exceeded")] * 2
    # From the trusted proxy the header names the caller: other addresses are not blocked.
    for i in range(3):
        status, _, body = call(served, "GET", "/v1/models", "127.0.0.1",
                               {"Authorization": f"Bearer {WRONG}", "X-Forwarded-For": f"198.51.100.{i}"})
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")


def test_health_follows_the_service(served):
    status, _, body = call(served, "GET", "/healthz", "127.0.0.1", {})
    assert (status, body) == (200, {"serving": True})
