"""What a caller who reaches the service directly, or sends odd headers, cannot do: dodge or
abuse per-address limits with x-forwarded-for, send more than the edge would let through,
break other tenants' requests with a bad x-request-id, or keep spending a revoked key."""

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from t2i import wire
from t2i.billing.database import open_database
from t2i.billing.ledger import Ledger
from testbed.api import Api

from .conftest import start_billing_server

WRONG = "ilx_wrong-guess-00000000000000000000000"


@pytest.fixture(scope="module")
def untrusting(data_dir, tmp_path_factory):
    """A server that trusts no peer's x-forwarded-for (as for callers that bypass the edge)."""
    folder = tmp_path_factory.mktemp("untrusting")
    database = f"sqlite:///{folder / 'ledger.sqlite3'}"
    server = start_billing_server(data_dir, folder, database, "--trusted-proxies", "192.0.2.254/32")
    ledger = Ledger(open_database(database))
    yield server, ledger
    server.kill()
    ledger.close()


def test_rotating_x_forwarded_for_does_not_dodge_the_failed_key_limit(untrusting):
    server, _ = untrusting
    codes = []
    for i in range(6):
        api = Api(server.target, address=f"203.0.113.{i}")  # a new forged address every time
        codes.append(api.generate(WRONG).code)
        api.close()
    # The burst is 3 for the real address (the peer), whatever the header says.
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3


class Call:
    """What client_address reads of a call: its peer and its metadata."""

    def __init__(self, peer: str, forwarded: str | None) -> None:
        self._peer, self._metadata = peer, ((wire.FORWARDED_FOR_HEADER, forwarded),) if forwarded else ()

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self):
        return self._metadata


@pytest.mark.parametrize("peer,forwarded,trusted,expected", [
    # The edge (a trusted proxy) appends the client it saw: the last hop is the client.
    ("ipv4:10.1.2.3:5555", "6.6.6.6, 198.51.100.7", "10.0.0.0/8", "198.51.100.7"),
    ("ipv6:[fd00::5]:5555", "2001:db8::1", "fd00::/8", "2001:db8::1"),
    # Anyone else is the client themselves, whatever they claim (no forging a victim's address).
    ("ipv4:203.0.113.9:4444", "127.0.0.1", "10.0.0.0/8", "203.0.113.9"),
    ("ipv4:127.0.0.1:4444", "198.51.100.7", "192.0.2.254/32", "127.0.0.1"),
    ("ipv6:[::1]:4444", "198.51.100.7", "127.0.0.1/32", "::1"),
    ("ipv4:10.1.2.3:5555", None, "10.0.0.0/8", "10.1.2.3"),
])
def test_x_forwarded_for_counts_only_from_a_trusted_proxy(peer, forwarded, trusted, expected):
    from t2i.billing.addresses import client_address, parse_networks

    assert client_address(Call(peer, forwarded), parse_networks(trusted)) == expected


def test_trusted_proxies_must_be_addresses_or_networks():
    from t2i.billing.addresses import parse_networks

    with pytest.raises(ValueError, match="trusted_proxies: 'edge.local' is not an IP address or CIDR network"):
        parse_networks("10.0.0.0/8, edge.local")


def test_the_service_refuses_messages_larger_than_the_edge_allows(billed_server, ledger):
    _, key = ledger.create_key("big", 100, "standard")
    api = Api(billed_server.target)
    # The edge's largest cap (the image routes' and native gRPC's) is the service's limit too.
    outcome = api.generate(key, prompt="x" * (wire.MAX_IMAGE_REQUEST_BYTES + 1024))
    assert outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in outcome.details
    assert ledger.open_reservations() == [] and ledger.verify() == []
    api.close()


def test_a_bad_request_id_breaks_nothing_for_anyone(data_dir, tmp_path, database_url):
    """An over-long x-request-id once failed 29 of 30 other tenants' group-committed reserves on
    PostgreSQL. Now it is replaced, and everybody is served."""
    server = start_billing_server(data_dir, tmp_path, database_url)
    ledger = Ledger(open_database(database_url))
    try:
        _, odd = ledger.create_key("odd", 100, "standard")
        _, other = ledger.create_key("other", 1000, "unlimited")
        api = Api(server.target)
        weird = [("x-request-id", "r" * 500), ("x-request-id", "bad id with spaces and <brackets>"), ("x-request-id", "")]

        def call(i: int):
            if i % 10 == 0:
                return api.generate(odd, seed=i, metadata=[weird[(i // 10) % len(weird)]])
            return api.generate(other, seed=i)

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(call, range(40)))
        assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * 40, {o.details for o in outcomes}
        assert any(e.get("msg") == "invalid x-request-id replaced" for e in server.logs)
        assert ledger.verify() == []
        api.close()
    finally:
        server.kill()
        ledger.close()


def test_revoking_a_key_stops_its_queued_and_running_work_everywhere(data_dir, tmp_path):
    database = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    server = start_billing_server(data_dir, tmp_path, database, "--max-batch-size", "2", gate=True)
    ledger = Ledger(open_database(database))
    try:
        record, key = ledger.create_key("revoked-soon", 10_000, "standard")
        _, bystander = ledger.create_key("bystander", 10_000, "standard")
        api = Api(server.target)
        with server.gate:  # nothing can finish: whatever ends the doomed requests is the revocation
            # One running (held in its first forward), then three queued behind it, and the bystander.
            doomed = [api.generate_future(key, width=256, height=256, steps=60, seed=0)]
            server.gate.wait_held(rows=2)
            doomed += [api.generate_future(key, width=256, height=256, steps=60, seed=i) for i in range(1, 4)]
            other = api.generate_future(bystander, width=64, height=64, steps=20)
            deadline = time.monotonic() + 60  # only guards against a hang
            while len(ledger.open_reservations()) < 5:
                assert time.monotonic() < deadline, ledger.open_reservations()
                time.sleep(0.05)
            ledger.revoke(record.id)  # as `t2i keys revoke` does, from another process
            errors = [f.exception(timeout=60) for f in doomed]
            # Stopped while the gate was still closed: by the revocation, not after their work.
            assert server.gate.state()["held"] == 1
        assert all(e is not None and e.code() is grpc.StatusCode.PERMISSION_DENIED for e in errors), errors
        assert all("was revoked while this request was running; it was stopped and not charged" in e.details() for e in errors)
        assert other.result(timeout=60).stardust_usage > 0  # the bystander is served
        deadline = time.monotonic() + 60  # releases are queued, not awaited
        while ledger.get_key(record.id).reserved:
            assert time.monotonic() < deadline, ledger.get_key(record.id)
            time.sleep(0.05)
        after = ledger.get_key(record.id)
        assert (after.balance, after.reserved) == (10_000, 0)
        assert api.list_models(key).code is grpc.StatusCode.PERMISSION_DENIED
        assert ledger.verify() == []
        api.close()
    finally:
        server.kill()
        ledger.close()
