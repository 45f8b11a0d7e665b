"""Job webhooks against a real HTTP receiver: signatures verified with the `standardwebhooks`
library, retries after a 500 keeping the webhook-id, no redirect followed, another key's job
never delivered here; and the SSRF rules at submission. Real `t2i serve` with billing on SQLite,
127.0.0.1 allowed only through --webhook-allow."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from t2i import wire
from t2i.billing.setup import open_ledger
from t2i.errors import InvalidArgument
from t2i.jobs.webhooks import AllowList, backoff, check_url
from testbed.server import ServerProcess

from ..edge.test_rest import until


class Receiver:
    """An HTTP server that records every request and answers from a script of statuses."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.script: dict[str, list[int]] = {}  # path -> statuses to answer, in order (then 200)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    receiver.received.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                              "at": time.monotonic()})
                    statuses = receiver.script.get(self.path, [])
                    status = statuses.pop(0) if statuses else 200
                self.send_response(status)
                if status in (301, 302, 307, 308):
                    # This receiver itself: a followed redirect would show up here as /elsewhere.
                    self.send_header("location", f"http://127.0.0.1:{receiver.port}/elsewhere")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def at(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.received if r["path"] == path]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"




@pytest.fixture(scope="module")
def service(data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("webhooks")
    shutil.copytree(data_dir / "models", folder / "models")
    config = folder / "billing.yaml"
    config.write_text("webhook_first_retry_seconds: 0.5\n")
    receiver = Receiver()
    server = ServerProcess(folder, "--webhook-allow", "127.0.0.1", env={"T2I_BILLING_CONFIG": str(config)})
    server.wait_serving()
    ledger = open_ledger(folder, None)
    yield server, receiver, ledger
    server.kill()
    ledger.close()
    receiver.server.shutdown()


def submit(server, key: str, webhook: dict, seed: int = 1) -> pb.Job:
    request = pb.GenerateImageRequest(model_id=1, prompt="1girl", width=64, height=64, steps=2, cfg_scale=5, seed=seed,
                                      sampler_name="euler", scheduler="normal", webhook=pb.JobWebhook(**webhook))
    with grpc.insecure_channel(server.target) as channel:
        return pb_grpc.TextToImageServiceStub(channel).SubmitJob(request, metadata=((wire.API_KEY_HEADER, key),))


def get(server, key: str, job_id: str) -> pb.Job:
    with grpc.insecure_channel(server.target) as channel:
        return pb_grpc.TextToImageServiceStub(channel).GetJob(pb.GetJobRequest(id=job_id),
                                                              metadata=((wire.API_KEY_HEADER, key),))


def secret_of(server, key_id: str) -> str:
    import subprocess
    import sys

    ran = subprocess.run([sys.executable, "-m", "t2i", "keys", "webhook-secret", key_id, "--json", "--data-dir",
                          str(server.data_dir)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)["secret"]


def test_signed_delivery_retried_after_a_500_with_the_same_id(service):
    server, receiver, ledger = service
    record, key = ledger.create_key("hooks", 1000, "standard")
    receiver.script["/retry"] = [500, 500]
    job = submit(server, key, {"url": receiver.url("/retry")})
    until(lambda: len(receiver.at("/retry")) == 3, "the third attempt")
    attempts = receiver.at("/retry")
    ids = {a["headers"]["webhook-id"] for a in attempts}
    assert len(ids) == 1  # every retry of one event keeps its webhook-id
    secret = secret_of(server, record.id)
    for attempt in attempts:
        payload = Webhook(secret).verify(attempt["body"], attempt["headers"])
        assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job.id
        assert payload["data"]["status"] == "succeeded" and payload["data"]["imageUrls"]
    with pytest.raises(WebhookVerificationError, match="signature"):
        Webhook(secret).verify(attempts[0]["body"] + b" ", attempts[0]["headers"])  # tampered: refused
    # Retries wait: the first within a minute (here the ladder is scaled to a 0.5 s first gap).
    assert attempts[1]["at"] - attempts[0]["at"] >= backoff(1, 0.5) * 0.9
    until(lambda: get(server, key, job.id).webhook_deliveries[0].status == "delivered", "the attempts recorded")
    (delivery,) = get(server, key, job.id).webhook_deliveries
    assert (delivery.event, delivery.attempts, delivery.last_status) == ("job.succeeded", 3, 200)


def test_a_redirect_is_not_followed_and_another_keys_job_never_arrives(service):
    server, receiver, ledger = service
    _, key = ledger.create_key("hooks-redirect", 1000, "standard")
    _, other = ledger.create_key("hooks-other", 1000, "standard")
    receiver.script["/moved"] = [302]
    mine = submit(server, key, {"url": receiver.url("/moved"), "events": ["job.succeeded"]}, seed=2)
    theirs = submit(server, other, {"url": receiver.url("/theirs")}, seed=3)
    until(lambda: len(receiver.at("/moved")) == 2, "a retry after the redirect")
    assert not receiver.at("/elsewhere")  # the Location was never visited
    # The 302 counted as a failed attempt, and the retry (answered 200) delivered it.
    until(lambda: get(server, key, mine.id).webhook_deliveries[0].status == "delivered", "the retry recorded")
    (delivery,) = get(server, key, mine.id).webhook_deliveries
    assert (delivery.attempts, delivery.last_status) == (2, 200)
    until(lambda: len(receiver.at("/theirs")) == 1, "the other key's own webhook")
    assert all(json.loads(r["body"])["data"]["id"] == theirs.id for r in receiver.at("/theirs"))
    assert all(json.loads(r["body"])["data"]["id"] == mine.id for r in receiver.at("/moved"))


@pytest.mark.parametrize("url", [
    "http://127.0.0.2:8080/hook",  # loopback, not allowed (only 127.0.0.1 is)
    "http://localhost:8080/hook",  # a name that resolves to loopback
    "http://10.1.2.3/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/hook",
    "ftp://example.com/hook",
    "http://user:pass@127.0.0.1/hook",
])
def test_ssrf_refusals_at_submission(service, url):
    server, _, ledger = service
    record, key = ledger.create_key(f"hooks-ssrf-{abs(hash(url))}", 1000, "standard")
    with pytest.raises(grpc.RpcError) as refused:
        submit(server, key, {"url": url})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "webhook.url" in refused.value.details()
    assert ledger.get_key(record.id).balance == 1000  # nothing reserved


def test_the_allow_list_and_public_addresses():
    allow = AllowList.parse("127.0.0.1, hooks.internal, 10.9.0.0/16")
    check_url("http://127.0.0.1:5000/x", allow)
    check_url("http://10.9.1.1/x", allow)
    with pytest.raises(InvalidArgument, match="not a public address"):
        check_url("http://localhost/x", allow)  # resolves to 127.0.0.1, but a name is allowed only by name
    check_url("http://localhost/x", AllowList.parse("localhost"))
    for url in ("http://127.0.0.2/x", "http://10.8.1.1/x", "http://169.254.169.254/x", "http://100.64.0.1/x",
                "http://[fe80::1]/x", "http://0.0.0.0/x", "http://[::ffff:127.0.0.1]/x"):
        with pytest.raises(InvalidArgument):
            check_url(url, AllowList())


def test_a_webhook_on_a_synchronous_call_is_refused(service):
    server, receiver, ledger = service
    _, key = ledger.create_key("hooks-sync", 1000, "standard")
    request = pb.GenerateImageRequest(model_id=1, prompt="1girl", width=64, height=64, steps=2, cfg_scale=5, seed=1,
                                      sampler_name="euler", scheduler="normal",
                                      webhook=pb.JobWebhook(url=receiver.url("/sync")))
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.TextToImageServiceStub(channel).GenerateImage(request, metadata=((wire.API_KEY_HEADER, key),))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "webhook" in refused.value.details()


def test_the_readme_verification_snippet_verifies_a_signed_delivery():
    """The README's "Webhooks" snippet, as printed, accepts a delivery signed as the service
    signs it and refuses a tampered one."""
    import datetime as dt
    import re
    from pathlib import Path

    from t2i.jobs.webhooks import new_secret, signed_headers

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("#### Webhooks", 1)[1].split("\n### ", 1)[0]
    namespace: dict = {}
    exec(re.search(r"```python\n(.*?)```", section, re.S)[1], namespace)
    secret, body = new_secret(), b'{"type":"job.succeeded","data":{"id":"job_x"}}'
    headers = signed_headers(secret, "msg_1", dt.datetime.now(dt.UTC), body)
    assert namespace["verified"](secret, body, headers)["data"]["id"] == "job_x"
    with pytest.raises(WebhookVerificationError, match="signature"):
        namespace["verified"](secret, body.replace(b"job_x", b"job_y"), headers)
