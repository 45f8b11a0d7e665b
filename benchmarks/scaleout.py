"""Scale-out proof on one machine (the proof itself is testbed/scaleout.py, which
tests/scaleout runs with less traffic): writes docs/scale-out.md.

    make scaleout        # or: .venv/bin/python -m benchmarks.scaleout
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from testbed.scaleout import Report, run_proof

def markdown(report: Report, command: str) -> str:
    errors = ", ".join(f"{count} x {status or 'connection error'}" for status, count in sorted(report.failover_errors.items())) or "none"
    return "\n".join([
        "# Scale-out proof",
        "",
        f"Command: `{command}`. Two `t2i serve` replicas (demo model, CPU) sharing PostgreSQL and Redis, "
        "one Envoy running edge/envoy.yaml with both replicas as upstream hosts, REST clients in a closed loop.",
        "",
        "| check | result |",
        "| --- | --- |",
        f"| requests per replica (both up) | {', '.join(f'{k}: {v}' for k, v in sorted(report.per_replica.items()))} |",
        f"| one balance: money for {report.balance_served + report.balance_left} images, "
        f"{report.balance_served + report.balance_refused} concurrent requests | {report.balance_served} served, "
        f"{report.balance_refused} refused (400 insufficient), balance left {report.balance_left} |",
        f"| one rate limit: burst 5, 10 quick requests | {report.rate_allowed} served, {report.rate_refused} refused (429) |",
        f"| images before the kill | {report.failover_before} |",
        f"| errors during failover (replica-a SIGKILLed under load) | {errors} |",
        f"| images after the kill (from 1 s on) | {report.failover_after}, by replica: "
        f"{', '.join(f'{k}: {v}' for k, v in sorted(report.failover_after_by_replica.items())) or '-'} |",
        f"| stardust released for the requests lost with replica-a | {report.released} "
        f"({report.released_on_restart} reservations by its restart, the rest by the survivor's sweep) |",
        f"| open reservations after the restart | {report.open_after_restart} |",
        f"| stardust of delivered images / charged | {report.delivered_usage} / {report.charged} "
        f"({report.charged - report.delivered_usage} charged for images lost in flight, see below) |",
        f"| ledger invariant (balances recomputed from the journal) | {'holds' if not report.problems else report.problems} |",
        "",
        "Failed requests during failover are those in flight on the killed replica: Envoy does not retry them, because "
        "a billed generation may have run; their reservations are released when the replica restarts (or by the "
        "survivor once the dead replica's heartbeat is 5 s old here, 60 s by default). New requests go to the "
        "survivor at once: a refused connection is retried on the other host.",
        "",
        "No committed charge is ever lost: the charge is committed before the image is sent. The price of that order "
        "is a window of a few milliseconds between the commit and the response leaving the process: a replica killed "
        "inside it has charged for an image the caller never received. The edge answers such a request with 503 "
        "\"the request may have been processed, retry with the same Idempotency-Key\"; a caller that sent an "
        "Idempotency-Key gets the stored image on the retry without a second charge. Any charge beyond the delivered "
        "images in the table is this case.",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--failover-seconds", type=float, default=12.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    report = run_proof(Path(tempfile.mkdtemp(prefix="t2i-scaleout-")), clients=args.clients,
                       spread_requests=96, balance_images=10, failover_seconds=args.failover_seconds)
    text = markdown(report, f"make scaleout (python -m benchmarks.scaleout --clients {args.clients} "
                            f"--failover-seconds {args.failover_seconds:g})")
    print(text)
    if not args.no_write:
        (Path(__file__).resolve().parent.parent / "docs" / "scale-out.md").write_text(text)


if __name__ == "__main__":
    main()
