"""Scale-out proof on one machine: two service replicas behind one Envoy, sharing PostgreSQL
and Redis.

    make scaleout        # or: .venv/bin/python -m benchmarks.scaleout

1. spread: concurrent REST traffic reaches both replicas;
2. one balance: a key with money for exactly M images gets exactly M of 3M concurrent requests;
3. one rate limit: a key with a burst of R gets exactly R of 2R quick requests;
4. failover: under load, one replica is killed (SIGKILL); Envoy moves traffic to the survivor,
   the killed replica is restarted, and then no reservation is open, every delivered image is
   charged exactly once, nothing else is, and every balance recomputes from the journal.

The edge is edge/envoy.yaml itself, with the two replicas as its upstream hosts. Writes
docs/scale-out.md; tests/scaleout runs the same proof with less traffic.
"""

from __future__ import annotations

import calendar
import json
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from t2i.billing.database import open_database
from t2i.billing.ledger import Ledger
from t2i.edge.descriptor import write_descriptor
from t2i.edge.envoy_config import EdgeSettings, write
from t2i.edge.launcher import envoy_binary

from testbed.backends import postgres_database, require_redis
from testbed.server import ServerProcess
from testbed.up import free_ports

BILLING_CONFIG = """
default_tier: standard
tiers:
  standard: {requests_per_minute: 6000, burst: 1000, max_concurrent: 100}
  burst5: {requests_per_minute: 1, burst: 5, max_concurrent: 100}
  unlimited: {requests_per_minute: 1000000, burst: 100000, max_concurrent: 100000}
heartbeat_seconds: 1
instance_timeout_seconds: 5
"""
REQUEST = {"modelId": 1, "prompt": "1girl", "negativePrompt": "", "width": 64, "height": 64, "steps": 6, "cfgScale": 5,
           "samplerName": "euler", "scheduler": "normal"}


@dataclass
class Report:
    per_replica: dict[str, int] = field(default_factory=dict)
    balance_served: int = 0
    balance_refused: int = 0
    balance_left: int = -1
    rate_allowed: int = 0
    rate_refused: int = 0
    failover_before: int = 0
    failover_errors: Counter = field(default_factory=Counter)
    failover_after: int = 0
    failover_after_by_replica: dict[str, int] = field(default_factory=dict)
    released_on_restart: int = -1
    released: int = 0
    open_after_restart: int = -1
    delivered_usage: int = 0
    charged: int = 0
    problems: list[str] = field(default_factory=list)


class Edge:
    """Envoy with the canonical config and the replicas as upstream hosts; access log kept."""

    def __init__(self, folder: Path, replicas: list[int]) -> None:
        self.port, self.admin = free_ports(2)
        config = write(
            EdgeSettings(http_port=self.port, admin_port=self.admin, upstreams=[("127.0.0.1", p) for p in replicas],
                         descriptor=write_descriptor(folder / "text_to_image.pb")),
            folder / "envoy.yaml",
        )
        self.log = folder / "access.log"
        self.process = subprocess.Popen(
            [envoy_binary(), "-c", str(config), "--log-level", "error", "--file-flush-interval-msec", "200",
             "--disable-hot-restart"],
            stdout=self.log.open("w"), stderr=subprocess.DEVNULL,
        )

    def post(self, body: dict, key: str, timeout: float = 120) -> tuple[int, dict]:
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("POST", "/text-to-image/generate", json.dumps(body),
                               {"Content-Type": "application/json", "x-illustrious-api-key": key})
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            connection.close()

    def wait_ready(self, replicas: int) -> None:
        """Until Envoy's health checks passed on every replica."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/clusters", timeout=2) as r:
                    text = r.read().decode()
                healthy = sum(1 for line in text.splitlines() if line.startswith("t2i_grpc::") and "::health_flags::healthy" in line)
                if healthy >= replicas:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("Envoy never saw the replicas healthy")

    def upstreams(self, since: float = 0.0, served: int = 0) -> Counter:
        """201 answers per upstream among the access log entries that started at `since` (wall
        time) or later, once the log holds at least `served` 201 answers in all: Envoy flushes it
        every 0.5 s, so the test polls for what it knows was answered."""
        deadline = time.monotonic() + 60  # only guards against a hang
        while len(entries := self._served()) < served:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the access log holds {len(entries)} answers of {served}")
            time.sleep(0.05)
        return Counter(host for started, host in entries if started >= since)

    def _served(self) -> list[tuple[float, str]]:
        """(start time, whole seconds; upstream) of every 201 in the access log."""
        served = []
        for line in self.log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("status") == "201" or entry.get("status") == 201:
                started = calendar.timegm(time.strptime(entry["time"][:19], "%Y-%m-%dT%H:%M:%S"))
                served.append((started, str(entry.get("upstreamHost"))))
        return served

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def _load_until(condition, at_least: float, timeout: float = 120) -> None:
    """Keep the load on for `at_least` seconds (the proof's window) and until `condition()`
    holds; `timeout` more only guards against a hang."""
    start = time.monotonic()
    while time.monotonic() - start < at_least or not condition():
        if time.monotonic() - start > at_least + timeout:
            raise TimeoutError("the load never showed what this phase must")
        time.sleep(0.05)


def start_replica(data_dir: Path, folder: Path, name: str, port: int, pg: str, redis: str) -> ServerProcess:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "billing.yaml"
    config.write_text(BILLING_CONFIG)
    return ServerProcess(
        data_dir, "--grpc-port", str(port), "--database-url", pg, "--redis-url", redis, "--instance-id", name,
        "--billing-config", str(config), "--max-batch-size", "8",
    ).wait_serving()


def run_proof(folder: Path, clients: int = 6, spread_requests: int = 48, balance_images: int = 5,
              failover_seconds: float = 8.0) -> Report:
    from t2i.models.demo import ensure_demo_model

    data_dir = folder / "data"
    ensure_demo_model(data_dir)
    pg, drop = postgres_database()
    redis = require_redis()
    db = open_database(pg)
    ledger = Ledger(db)
    ports = free_ports(2)
    names = ["replica-a", "replica-b"]
    replicas = [start_replica(data_dir, folder / n, n, p, pg, redis) for n, p in zip(names, ports)]
    host_name = {f"127.0.0.1:{p}": n for n, p in zip(names, ports)}
    edge = Edge(folder, ports)
    report = Report()
    try:
        record, key = ledger.create_key("scale-out", 10**6, "unlimited")
        edge.wait_ready(2)

        # 1. Both replicas receive work.
        with ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(lambda i: edge.post({**REQUEST, "seed": i}, key)[0], range(spread_requests)))
        if statuses.count(201) != spread_requests:
            report.problems.append(f"spread: {Counter(statuses)}")
        served = statuses.count(201)  # 201 answers so far, which the access log must come to hold
        report.per_replica = {host_name.get(h, h): c for h, c in edge.upstreams(served=served).items()}

        # 2. One balance.
        exact, exact_key = ledger.create_key("exact", balance_images, "unlimited")
        with ThreadPoolExecutor(3 * balance_images) as pool:
            statuses = list(pool.map(lambda i: edge.post({**REQUEST, "seed": i}, exact_key)[0], range(3 * balance_images)))
        report.balance_served, report.balance_refused = statuses.count(201), statuses.count(400)
        served += report.balance_served
        report.balance_left = ledger.get_key(exact.id).balance

        # 3. One rate limit (burst 5, then 1 per minute, whichever replica answers).
        _, burst_key = ledger.create_key("burst", 1000, "burst5")
        statuses = [edge.post({**REQUEST, "seed": i}, burst_key)[0] for i in range(10)]
        report.rate_allowed, report.rate_refused = statuses.count(201), statuses.count(429)
        served += report.rate_allowed

        # 4. Failover under load.
        stop = threading.Event()
        outcomes: list[tuple[float, float, int, int]] = []  # (started at, finished at, status, usage)
        lock = threading.Lock()

        def client(index: int) -> None:
            seed = 0
            while not stop.is_set():
                seed += 1
                started = time.monotonic()
                try:
                    status, body = edge.post({**REQUEST, "seed": index * 10000 + seed}, key)
                except OSError:
                    status, body = 0, {}
                usage = int(body.get("stardustUsage", 0)) if status == 201 else 0
                with lock:
                    outcomes.append((started, time.monotonic(), status, usage))

        def served_where(where) -> bool:
            with lock:
                return any(status == 201 and where(started, finished) for started, finished, status, _ in outcomes)

        before = ledger.usage(record.id)[2]
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        # Each half lasts failover_seconds / 2 and until it has shown what it must: images served
        # before the kill, and by requests that started after it.
        _load_until(lambda: served_where(lambda started, finished: True), failover_seconds / 2)
        kill_wall = time.time()
        killed_at = time.monotonic()
        replicas[0].process.send_signal(signal.SIGKILL)
        replicas[0].process.wait(30)
        _load_until(lambda: served_where(lambda started, finished: started > killed_at), failover_seconds / 2)
        stop.set()
        for t in threads:
            t.join()
        for started, finished, status, usage in outcomes:
            if finished < killed_at:
                report.failover_before += status == 201
            elif status != 201:
                report.failover_errors[status] += 1
            # Started after the kill: only the survivor can have served it.
            if started > killed_at and status == 201:
                report.failover_after += 1
        served += sum(status == 201 for _, _, status, _ in outcomes)
        # Entries that started in a whole second at or after the kill started after it.
        after = edge.upstreams(since=kill_wall, served=served)
        report.failover_after_by_replica = {host_name.get(h, h): c for h, c in after.items()}

        # Restart the killed replica: it releases what it left open.
        replicas[0] = start_replica(data_dir, folder / "restart", names[0], ports[0], pg, redis)
        report.released_on_restart = replicas[0].logged("billing ready")[0]["released_reservations"]
        report.open_after_restart = len(ledger.open_reservations())
        report.delivered_usage = sum(usage for _, _, _, usage in outcomes)
        totals = ledger.usage(record.id)[2]
        report.charged = totals.get("commit", 0) - before.get("commit", 0)
        report.released = totals.get("release", 0) - before.get("release", 0)
        report.problems += ledger.verify()
    finally:
        edge.stop()
        for replica in replicas:
            replica.kill()
        db.dispose()
        drop()
    return report
