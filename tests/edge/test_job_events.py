"""A job followed as it runs, through `t2i up`: GET /jobs/{id}/events (server-sent events with
ids, resumed with Last-Event-ID), the progress GET /jobs/{id} reports while it runs, WatchJob over
gRPC, and a job whose key was revoked before it started (failed, price released)."""

from __future__ import annotations

import http.client
import json
import time

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from t2i import wire
from t2i.settings import EngineConfig

from .test_jobs import balance, journal, wait_for
from .test_rest import SMALL, headers, until

# The engine reports progress at most every progress_interval_ms (250 ms by default); a held
# step lasts longer than that, so that the step after it is reported.
THROTTLE_SECONDS = 0.3


class EventStream:
    """One GET /jobs/{id}/events, read an event at a time."""

    def __init__(self, edge, job_id: str, key: str, last_event_id: str | None = None) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=120)
        sent = headers(key, **({"Last-Event-ID": last_event_id} if last_event_id is not None else {}))
        self.connection.request("GET", f"/jobs/{job_id}/events", headers=sent)
        self.response = self.connection.getresponse()
        self.status = self.response.status
        self.headers = {k.lower(): v for k, v in self.response.getheaders()}

    def next(self) -> dict | None:
        """The next event as {"id", "data"}, or None at the end of the stream."""
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline()
            if not line:
                return None
            line = line.decode().rstrip("\r\n")
            if line == "":
                if fields:
                    return {"id": fields.get("id"), "event": fields.get("event"), "data": json.loads(fields["data"])}
                continue
            if line.startswith(":"):
                continue  # a keep-alive comment
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")

    def rest(self) -> list[dict]:
        events = []
        while (event := self.next()) is not None:
            events.append(event)
        self.close()
        return events

    def close(self) -> None:
        self.connection.close()


def kind(event: dict) -> str:
    (name,) = [k for k in event["data"] if k != "id"]
    return name


def test_events_stream_progress_and_resume(edge, ledger):
    _, key = ledger.create_key("events-watcher", 1000, "standard")
    gate = edge.gate
    with gate:
        job = edge.request("POST", "/text-to-image/jobs", {**SMALL, "steps": 3}, headers(key)).json()
        held = gate.wait_held()
        time.sleep(THROTTLE_SECONDS)  # the throttle's interval passes while step 1 is held
        gate.let_through(1)
        gate.wait_for(lambda s: s["passed"] > held["passed"] and s["held"] >= 1, what="step 1 done, step 2 held")

        def reports_progress() -> bool:
            found = edge.request("GET", f"/jobs/{job['id']}", headers=headers(key)).json()
            assert found["status"] == "running", found
            return found.get("progress", {}).get("step") == 1

        until(reports_progress, "GET /jobs/{id} to report step 1 while the job runs")
        found = edge.request("GET", f"/jobs/{job['id']}", headers=headers(key)).json()
        assert found["progress"]["totalSteps"] == 3 and found["progress"]["evaluations"] == 1

        stream = EventStream(edge, job["id"], key)
        assert stream.status == 200 and stream.headers["content-type"].startswith("text/event-stream")
        seen = []
        while not any(kind(e) == "progress" for e in seen):
            seen.append(stream.next())
    # The gate is open: the job finishes, and the stream with it.
    seen += stream.rest()
    ids = [int(e["id"]) for e in seen]
    assert ids == list(range(1, len(seen) + 1)), ids
    assert all(int(e["data"]["id"]) == int(e["id"]) for e in seen)
    kinds = [kind(e) for e in seen]
    assert kinds[0] == "queued" and kinds[-1] == "ended" and "started" in kinds, kinds
    assert kinds.index("started") < kinds.index("progress")
    steps = [e["data"]["progress"]["step"] for e in seen if kind(e) == "progress"]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == 3, steps
    ended = seen[-1]["data"]["ended"]
    assert ended["status"] == "succeeded" and ended["imageUrls"] == [f"/jobs/{job['id']}/images/0"]
    assert ended["stardustUsage"] == job["stardustPrice"] and "progress" not in ended

    # Resumed after the second event: the same events from the third on.
    resumed = EventStream(edge, job["id"], key, last_event_id="2")
    assert resumed.status == 200
    assert resumed.rest() == seen[2:]
    # Resumed after the end: nothing more, and the stream closes.
    done = EventStream(edge, job["id"], key, last_event_id=seen[-1]["id"])
    assert done.status == 200 and done.rest() == []


def test_the_keep_alive_is_well_inside_the_routes_idle_timeout():
    """Comment lines go out while a job says nothing (a long queue), often enough that the edge's
    idle timeout on the route never closes the stream."""
    from pathlib import Path

    from t2i.compat import job_events_http

    envoy = (Path(__file__).resolve().parents[2] / "edge" / "envoy.yaml").read_text()
    route = envoy.split('safe_regex: {regex: "/jobs/[^/]+/events/?"}', 1)[1].split("retry_policy", 1)[0]
    idle = float(route.split("idle_timeout:", 1)[1].split()[0].rstrip("s"))
    assert job_events_http.KEEP_ALIVE_SECONDS * 2 <= idle


def test_event_stream_refusals(edge, ledger):
    _, key = ledger.create_key("events-refused", 1000, "standard")
    _, other = ledger.create_key("events-other", 1000, "standard")
    job = edge.request("POST", "/text-to-image/jobs", SMALL, headers(key)).json()
    done = wait_for(edge, key, job["id"])
    for sent_key, last, status, needle in (
        (other, None, 404, "no job"),
        (key, "abc", 400, "Last-Event-ID"),
        (key, "99999", 400, "Last-Event-ID"),
        (key, "1" * 40, 400, "Last-Event-ID"),
        (key, "-1", 400, "Last-Event-ID"),
        ("t2i_wrong_000000000000000000", None, 401, ""),
    ):
        stream = EventStream(edge, done["id"], sent_key, last)
        body = stream.response.read()
        stream.close()
        assert stream.status == status, (last, body)
        error = json.loads(body)["error"]
        assert error["code"] == status and needle in error["message"] and error["requestId"], error
    missing = edge.request("GET", "/jobs/job_nope/events", headers=headers(key))
    assert missing.status == 404 and missing.json()["error"]["status"] == "NOT_FOUND"
    wrong = edge.request("POST", f"/jobs/{job['id']}/events", headers=headers(key))
    assert wrong.status == 405 and wrong.json()["error"]["code"] == 405


def test_watch_job_over_grpc(edge, ledger):
    _, key = ledger.create_key("events-grpc", 1000, "standard")
    metadata = ((wire.API_KEY_HEADER, key),)
    request = pb.GenerateImageRequest(model_id=1, prompt="1girl", width=64, height=64, steps=2, cfg_scale=5, seed=3,
                                      sampler_name="euler", scheduler="normal")
    with grpc.insecure_channel(f"127.0.0.1:{edge.grpc_port}") as channel:
        stub = pb_grpc.TextToImageServiceStub(channel)
        job = stub.SubmitJob(request, metadata=metadata)
        events = list(stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=metadata, timeout=120))
        assert [e.id for e in events] == list(range(1, len(events) + 1))
        assert events[0].WhichOneof("event") == "queued" and events[-1].ended.status == "succeeded"
        again = list(stub.WatchJob(pb.WatchJobRequest(id=job.id, after=events[-2].id), metadata=metadata, timeout=60))
        assert again == events[-1:]
        try:
            list(stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=((wire.API_KEY_HEADER, edge.demo_key),)))
            raise AssertionError("another key watched the job")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND


def test_a_key_follows_at_most_so_many_jobs_at_once(edge, ledger):
    from t2i.jobs.service import MAX_WATCHERS_PER_KEY

    _, key = ledger.create_key("events-many", 1000, "standard")
    metadata = ((wire.API_KEY_HEADER, key),)
    with edge.gate, grpc.insecure_channel(f"127.0.0.1:{edge.grpc_port}") as channel:
        stub = pb_grpc.TextToImageServiceStub(channel)
        job = stub.SubmitJob(pb.GenerateImageRequest(model_id=1, prompt="1girl", width=64, height=64, steps=2,
                                                     cfg_scale=5, seed=3, sampler_name="euler", scheduler="normal"),
                             metadata=metadata)
        edge.gate.wait_held()  # it runs and cannot end: its watchers stay
        watchers = [stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=metadata) for _ in range(MAX_WATCHERS_PER_KEY)]
        for watcher in watchers:
            assert next(watcher).id == 1
        try:
            next(stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=metadata))
            raise AssertionError("one watcher too many was let in")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "follows" in error.details()
        watchers.pop().cancel()

        def one_more() -> bool:
            try:
                extra = stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=metadata)
                next(extra)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return False
            extra.cancel()
            return True

        until(one_more, "a closed watcher's place given back")
        for watcher in watchers:
            watcher.cancel()
    # Ended before the next test holds the gate.
    with grpc.insecure_channel(f"127.0.0.1:{edge.grpc_port}") as channel:
        stub = pb_grpc.TextToImageServiceStub(channel)
        until(lambda: stub.GetJob(pb.GetJobRequest(id=job.id), metadata=metadata).status == "succeeded", "the job done")


def test_a_revoked_keys_queued_job_fails_and_its_price_is_released(edge, ledger):
    """A job that waits while its key is revoked is never run or charged: when a replica takes it,
    it fails as the key's synchronous call would (403), and its price goes back."""
    record, key = ledger.create_key("events-revoked", 1000, "standard")
    gate = edge.gate
    with gate:
        # One job in the engine (held) and a batch of them waiting in the engine's queue: the
        # runner takes no more (engine.wants_work), so the next job stays queued in the database.
        first = edge.request("POST", "/text-to-image/jobs", SMALL, headers(edge.demo_key)).json()
        gate.wait_held()
        waiting = [edge.request("POST", "/text-to-image/jobs", {**SMALL, "seed": 10 + n}, headers(edge.demo_key)).json()
                   for n in range(EngineConfig().max_batch_size)]
        until(lambda: all(edge.request("GET", f"/jobs/{other['id']}", headers=headers(edge.demo_key)).json()["status"]
                          == "running" for other in waiting), "a batch of jobs in the engine's queue")
        job = edge.request("POST", "/text-to-image/jobs", SMALL, headers(key)).json()
        price = int(job["stardustPrice"])
        assert balance(ledger, key) == 1000 - price
        assert edge.request("GET", f"/jobs/{job['id']}", headers=headers(key)).json()["status"] == "queued"
        ledger.revoke(record.id)
    for other in (first, *waiting):
        assert wait_for(edge, edge.demo_key, other["id"])["status"] == "succeeded"
    until(lambda: journal(ledger, key, job["id"]) == ["release", "reserve"], "the revoked key's job released")
    assert balance(ledger, key) == 1000
    from t2i.jobs.store import JobStore

    stored = JobStore(ledger.db).get(job["id"], record.id)
    assert stored.status == "failed" and stored.error_status == "PERMISSION_DENIED" and stored.usage is None


def test_the_cli_submits_watches_and_fetches_a_job(edge, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "T2I_TARGET": f"127.0.0.1:{edge.grpc_port}", "T2I_API_KEY": edge.demo_key}

    def t2i(*args: str) -> str:
        ran = subprocess.run([sys.executable, "-m", "t2i", *args], capture_output=True, text=True, env=env, timeout=300)
        assert ran.returncode == 0, ran.stderr[-2000:]
        return ran.stdout

    job = json.loads(t2i("generate", "--prompt", "1girl", "--job", "--width", "64", "--height", "64", "--steps", "2", "--seed", "5"))
    lines = [json.loads(line) for line in t2i("jobs", "watch", job["id"]).splitlines()]
    assert [int(e["id"]) for e in lines] == list(range(1, len(lines) + 1))
    assert lines[-1]["ended"]["status"] == "succeeded"
    resumed = [json.loads(line) for line in t2i("jobs", "watch", job["id"], "--after", str(len(lines) - 1)).splitlines()]
    assert resumed == lines[-1:]
    written = json.loads(t2i("jobs", "fetch", job["id"], "--out", str(tmp_path)))
    assert written == [str(tmp_path / f"{job['id']}-0.png")]
