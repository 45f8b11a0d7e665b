"""Jobs end to end through `t2i up` (Envoy, the service, billing on SQLite): submit, poll and
fetch over REST and over gRPC, the price reserved at submission and charged once with the job
id in the journal, another key's job not found, cancel while running (stopped, not charged),
DELETE of a finished job's images, listing, and the per-tier cap on queued jobs."""

from __future__ import annotations

import io

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc
from PIL import Image

from t2i import wire

from .test_rest import SMALL, headers, until


def balance(ledger, key: str) -> int:
    return ledger.find_key(key).balance


def journal(ledger, key: str, job_id: str) -> list[str]:
    _, entries, _ = ledger.usage(ledger.find_key(key).id, limit=1000)
    return sorted(e["kind"] for e in entries if e["request_id"] == job_id)


def wait_for(edge, key: str, job_id: str, statuses=("succeeded", "failed", "cancelled", "expired")) -> dict:
    found = {}

    def finished() -> bool:
        reply = edge.request("GET", f"/jobs/{job_id}", headers=headers(key))
        assert reply.status == 200, reply.body
        found.update(reply.json())
        return found["status"] in statuses

    until(finished, f"job {job_id} to reach {statuses}", timeout=120)
    return found


def test_a_job_is_submitted_polled_fetched_and_charged_once(edge, ledger):
    key = edge.demo_key
    before = balance(ledger, key)
    submitted = edge.request("POST", "/text-to-image/jobs", SMALL, headers(key))
    assert submitted.status == 202, submitted.body
    job = submitted.json()
    assert job["id"].startswith("job_") and job["status"] in ("queued", "running") and job["createdAt"].endswith("Z")
    price = int(job["stardustPrice"])
    assert price > 0 and balance(ledger, key) == before - price  # reserved at submission
    done = wait_for(edge, key, job["id"])
    assert done["status"] == "succeeded", done
    assert int(done["stardustUsage"]) == price and int(done["stardustBalance"]) == before - price
    assert done["imageUrls"] == [f"/jobs/{job['id']}/images/0"] and done["attempts"] == 1
    image = edge.request("GET", done["imageUrls"][0], headers=headers(key))
    assert image.status == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.body)).size == (64, 64)
    assert balance(ledger, key) == before - price
    assert journal(ledger, key, job["id"]) == ["commit", "reserve"]
    # The same request made synchronously: the same price and the same image.
    sync = edge.request("POST", "/text-to-image/generate", SMALL, headers(key))
    assert int(sync.json()["stardustUsage"]) == price
    import base64

    assert base64.b64decode(sync.json()["images"][0]) == image.body


def test_another_keys_job_and_unknown_ids_are_not_found(edge, ledger):
    _, other = ledger.create_key("jobs-other", 1000, "standard")
    job = edge.request("POST", "/text-to-image/jobs", SMALL, headers(edge.demo_key)).json()
    for key, job_id in ((other, job["id"]), (edge.demo_key, "job_nope")):
        for method, path in (("GET", f"/jobs/{job_id}"), ("DELETE", f"/jobs/{job_id}"),
                             ("GET", f"/jobs/{job_id}/images/0")):
            reply = edge.request(method, path, headers=headers(key))
            assert reply.status == 404 and reply.json()["error"]["status"] == "NOT_FOUND", (method, path, reply.body)
    assert edge.request("GET", f"/jobs/{job['id']}").status == 401
    wait_for(edge, edge.demo_key, job["id"])


def test_submit_and_fetch_over_grpc(edge, ledger):
    metadata = ((wire.API_KEY_HEADER, edge.demo_key),)
    request = pb.GenerateImageRequest(model_id=1, prompt="1girl", width=64, height=64, steps=2, cfg_scale=5, seed=9,
                                      sampler_name="euler", scheduler="normal")
    with grpc.insecure_channel(f"127.0.0.1:{edge.grpc_port}") as channel:
        stub = pb_grpc.TextToImageServiceStub(channel)
        job = stub.SubmitJob(request, metadata=metadata)
        assert job.status in ("queued", "running") and job.stardust_price > 0

        def succeeded() -> bool:
            return stub.GetJob(pb.GetJobRequest(id=job.id), metadata=metadata).status == "succeeded"

        until(succeeded, "the job over gRPC", timeout=120)
        body = stub.GetJobImage(pb.GetJobImageRequest(id=job.id, index=0), metadata=metadata)
        assert body.content_type == "image/png" and Image.open(io.BytesIO(body.data)).size == (64, 64)
        listed = stub.ListJobs(pb.ListJobsRequest(status="succeeded", page_size=100), metadata=metadata)
        assert job.id in [j.id for j in listed.jobs]
        try:
            stub.GetJob(pb.GetJobRequest(id=job.id), metadata=((wire.API_KEY_HEADER, "t2i_wrong_000000000000000000"),))
            raise AssertionError("an unknown key read a job")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cancel_while_running_stops_it_uncharged_and_delete_drops_images(edge, ledger):
    key = edge.demo_key
    before = balance(ledger, key)
    with edge.gate:
        job = edge.request("POST", "/text-to-image/jobs", {**SMALL, "steps": 3}, headers(key)).json()
        edge.gate.wait_held(rows=2)
        assert edge.request("GET", f"/jobs/{job['id']}", headers=headers(key)).json()["status"] == "running"
        cancelled = edge.request("DELETE", f"/jobs/{job['id']}", headers=headers(key))
        assert cancelled.status == 200 and cancelled.json()["status"] == "cancelled"
    until(lambda: balance(ledger, key) == before, "the price released")
    edge.wait_logged("job stopped: cancelled or taken over")
    assert journal(ledger, key, job["id"]) == ["release", "reserve"]
    final = edge.request("GET", f"/jobs/{job['id']}", headers=headers(key)).json()
    assert final["status"] == "cancelled" and final["imageUrls"] == [] and final["stardustUsage"] == "0"
    # A finished job: DELETE removes its images, the charge stays.
    done = wait_for(edge, key, edge.request("POST", "/text-to-image/jobs", SMALL, headers(key)).json()["id"])
    charged = balance(ledger, key)
    deleted = edge.request("DELETE", f"/jobs/{done['id']}", headers=headers(key))
    assert deleted.status == 200 and deleted.json()["imageUrls"] == [] and deleted.json()["status"] == "succeeded"
    assert edge.request("GET", f"/jobs/{done['id']}/images/0", headers=headers(key)).status == 404
    assert balance(ledger, key) == charged


def test_listing_pages_newest_first(edge, ledger):
    _, key = ledger.create_key("jobs-lister", 1000, "standard")
    ids = [edge.request("POST", "/text-to-image/jobs", SMALL, headers(key)).json()["id"] for _ in range(3)]
    for job_id in ids:
        wait_for(edge, key, job_id)
    first = edge.request("GET", "/jobs?pageSize=2", headers=headers(key)).json()
    second = edge.request("GET", f"/jobs?pageSize=2&cursor={first['nextCursor']}", headers=headers(key)).json()
    assert [j["id"] for j in first["jobs"] + second["jobs"]] == ids[::-1] and second["nextCursor"] == ""
    assert edge.request("GET", "/jobs?status=queued", headers=headers(key)).json()["jobs"] == []
    bad = edge.request("GET", "/jobs?status=done", headers=headers(key))
    assert bad.status == 400 and "status" in bad.json()["error"]["message"]


def test_refusals_cost_nothing_and_a_full_queue_is_429(edge, ledger):
    key = edge.demo_key
    before = balance(ledger, key)
    bad = edge.request("POST", "/text-to-image/jobs", {**SMALL, "steps": 0}, headers(key))
    assert bad.status == 400 and "steps" in bad.json()["error"]["message"]
    picture = edge.request("POST", "/image-to-image/jobs", SMALL, headers(key))
    assert picture.status == 400 and "initImage" in picture.json()["error"]["message"]
    record, capped = ledger.create_key("jobs-capped", 1000, "nojobs")
    full = edge.request("POST", "/text-to-image/jobs", SMALL, headers(capped))
    assert full.status == 429 and full.headers["retry-after"] == "10", full.body
    assert "queued" in full.json()["error"]["message"]
    assert balance(ledger, key) == before and ledger.get_key(record.id).balance == 1000  # nothing was reserved
    assert all(r["key_id"] != record.id for r in ledger.open_reservations())


def test_an_idempotency_key_makes_a_retry_find_its_job(edge, ledger):
    _, key = ledger.create_key("jobs-retry", 1000, "standard")
    first = edge.request("POST", "/text-to-image/jobs", SMALL, headers(key, **{"Idempotency-Key": "job-retry-1"}))
    again = edge.request("POST", "/text-to-image/jobs", SMALL, headers(key, **{"Idempotency-Key": "job-retry-1"}))
    assert first.status == again.status == 202 and first.json()["id"] == again.json()["id"]
    assert ledger.find_key(key).balance == 1000 - int(first.json()["stardustPrice"])  # reserved once
    other = edge.request("POST", "/text-to-image/jobs", {**SMALL, "seed": 4}, headers(key, **{"Idempotency-Key": "job-retry-1"}))
    assert other.status == 400 and "different request" in other.json()["error"]["message"]
    done = wait_for(edge, key, first.json()["id"])
    assert ledger.find_key(key).balance == 1000 - int(done["stardustUsage"])
    assert journal(ledger, key, first.json()["id"]) == ["commit", "reserve"]


def test_the_readme_snippet_works(edge, tmp_path):
    """The README's "Jobs" shell example, as printed, against this edge."""
    import json
    import re
    import subprocess
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Jobs: submit now, collect later", 1)[1].split("\n### ", 1)[0]
    shell = re.search(r"```sh\n(.*?)```", section, re.S)[1].replace("localhost:8080", f"127.0.0.1:{edge.http_port}")
    shell = shell.replace("my-job-1", f"readme-{tmp_path.name}")  # a key of its own on every run
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo-api-key").write_text(edge.demo_key)
    ran = subprocess.run(["bash", "-c", "set -e\n" + shell], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin"})
    assert ran.returncode == 0, ran.stderr[-3000:]
    replies = [json.loads(line) for line in ran.stdout.replace("}{", "}\n{").splitlines() if line.strip()]
    job, listed, deleted = replies
    assert job["status"] == "succeeded" and job["imageUrls"] and int(job["stardustUsage"]) > 0
    assert Image.open(tmp_path / "job.png").size == (256, 256)
    assert job["id"] in [j["id"] for j in listed["jobs"]]
    assert deleted["id"] == job["id"] and deleted["imageUrls"] == []


def test_an_image_job_takes_a_picture_over_the_text_routes_cap(edge, ledger):
    """/image-to-image/jobs has the image routes' 40 MiB cap: a 1.5 MiB picture goes through."""
    import base64

    import numpy as np

    noise = np.random.default_rng(5).integers(0, 256, (720, 720, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, format="PNG", compress_level=0)
    assert out.tell() > 1024 * 1024
    body = {**SMALL, "initImage": base64.b64encode(out.getvalue()).decode(), "denoise": 0.5}
    submitted = edge.request("POST", "/image-to-image/jobs", body, headers(edge.demo_key))
    assert submitted.status == 202, submitted.body[:300]
    done = wait_for(edge, edge.demo_key, submitted.json()["id"])
    assert done["status"] == "succeeded", done
    image = edge.request("GET", done["imageUrls"][0], headers=headers(edge.demo_key))
    assert Image.open(io.BytesIO(image.body)).size == (64, 64)
    wrong = edge.request("GET", "/image-to-image/jobs", headers=headers(edge.demo_key))
    assert wrong.status == 405 and wrong.headers["allow"] == "POST"
