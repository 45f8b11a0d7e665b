"""The scale-out proof (testbed/scaleout.py) with less traffic: two replicas, one Envoy,
shared PostgreSQL and Redis, one replica killed under load."""

from testbed.scaleout import run_proof


def test_two_replicas_behind_one_edge(tmp_path):
    report = run_proof(tmp_path, clients=4, spread_requests=24, balance_images=4, failover_seconds=8)
    assert not report.problems, report.problems
    assert set(report.per_replica) == {"replica-a", "replica-b"} and min(report.per_replica.values()) >= 3, report.per_replica
    assert (report.balance_served, report.balance_refused, report.balance_left) == (4, 8, 0)
    assert (report.rate_allowed, report.rate_refused) == (5, 5)
    assert report.failover_before > 0 and report.failover_after > 0
    assert set(report.failover_after_by_replica) == {"replica-b"}, report.failover_after_by_replica
    assert sum(report.failover_errors.values()) <= 4 and set(report.failover_errors) <= {503}, report.failover_errors
    assert report.open_after_restart == 0
    # Every delivered image is charged; a request killed between its commit and its response
    # (a few milliseconds) may be charged without being delivered: at most the failed ones.
    assert report.delivered_usage <= report.charged <= report.delivered_usage + sum(report.failover_errors.values())
