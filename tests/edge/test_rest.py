"""The documented REST API end to end: client -> real Envoy -> real gRPC service."""

import base64
import io
import json
import os
import signal
import time
from pathlib import Path

import pytest
from PIL import Image

from t2i.edge.launcher import DOCUMENTED_EXAMPLE

from ..lora.factory import KOHYA_SGM, make_lora


def until(condition, what: str, timeout: float = 60):
    """Poll until `condition()` is truthy; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return result


SMALL = {"modelId": 1, "prompt": "1girl", "negativePrompt": "", "width": 64, "height": 64, "steps": 2, "cfgScale": 5,
         "seed": 3, "samplerName": "euler", "scheduler": "normal"}


def headers(key: str | None = None, **extra) -> dict:
    h = {"Content-Type": "application/json", **extra}
    if key is not None:
        h["x-illustrious-api-key"] = key
    return h


def assert_error_shape(reply, status: int, code_name: str, fragment: str = "") -> dict:
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "status", "message", "requestId"}
    assert error["code"] == status and error["status"] == code_name
    assert isinstance(error["message"], str) and error["message"]
    assert error["requestId"] == reply.headers["x-request-id"]
    assert fragment in error["message"], error["message"]
    return error


def png_size(b64: str) -> tuple[int, int]:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image.size


def test_documented_example_is_created_and_charged(edge, ledger):
    key_id = ledger.find_key(edge.demo_key).id
    before = ledger.get_key(key_id).balance
    reply = edge.request("POST", "/text-to-image/generate", DOCUMENTED_EXAMPLE, headers(edge.demo_key))
    assert reply.status == 201, reply.body[:300]
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert set(body) >= {"images", "stardustUsage", "stardustBalance"}
    assert body["stardustUsage"] == "3"  # int64 as a JSON string, like the documented response
    assert isinstance(body["stardustBalance"], str) and int(body["stardustBalance"]) == before - 3
    assert ledger.get_key(key_id).balance == before - 3
    assert png_size(body["images"][0]) == (768, 768)
    assert 0 <= int(body["seeds"][0]) < 2**63


def test_model_list(edge):
    reply = edge.request("GET", "/model/list", headers=headers(edge.demo_key))
    assert reply.status == 200
    (model,) = reply.json()["models"]
    assert model["id"] == 1 and model["demo"] is True and model["minSize"] == 64


@pytest.mark.parametrize("spelling", ["negativePrompt", "negative_prompt"])
def test_both_negative_prompt_spellings_are_applied(edge, spelling):
    base = {k: v for k, v in SMALL.items() if k != "negativePrompt"}
    with_negative = edge.request("POST", "/text-to-image/generate", {**base, spelling: "worst quality"}, headers(edge.demo_key))
    camel = edge.request("POST", "/text-to-image/generate", {**base, "negativePrompt": "worst quality"}, headers(edge.demo_key))
    without = edge.request("POST", "/text-to-image/generate", base, headers(edge.demo_key))
    assert with_negative.status == camel.status == without.status == 201
    assert with_negative.json()["images"] == camel.json()["images"]
    assert with_negative.json()["images"] != without.json()["images"]


def test_request_id_is_kept_and_reaches_the_service_logs(edge):
    reply = edge.request("POST", "/text-to-image/generate", SMALL, headers(edge.demo_key, **{"x-request-id": "rest-test-req-1"}))
    assert reply.status == 201 and reply.headers["x-request-id"] == "rest-test-req-1"

    def generated():
        return [e for e in edge.service_log() if e.get("msg") == "image generated" and e.get("request_id") == "rest-test-req-1"]

    until(generated, "the request id in the service log")  # the log reaches this process a little later
    assert len(generated()) == 1
    fresh = edge.request("GET", "/model/list", headers=headers(edge.demo_key))
    assert len(fresh.headers["x-request-id"]) >= 16  # generated when the client sends none


def test_api_key_never_reaches_the_access_log(edge):
    earlier = len([e for e in edge.access_log() if e["path"] == "/model/list"])
    edge.request("GET", "/model/list", headers=headers(edge.demo_key))
    edge.request("GET", "/model/list", headers=headers("ilx_not-a-key-000000000000000000000000000"))
    # Envoy flushes its access log every 0.5 s: poll until both calls are in it.
    until(lambda: len([e for e in edge.access_log() if e["path"] == "/model/list"]) >= earlier + 2, "the access log")
    log = edge.access_log()
    # Everything Envoy and the service logged (the start-up banner shows the demo key on purpose).
    text = json.dumps(log) + "".join(edge.stderr)
    assert edge.demo_key not in text and "ilx_not-a-key" not in text


def test_idempotency_key_passes_through(edge, ledger):
    key_id = ledger.find_key(edge.demo_key).id
    body = {**SMALL, "seed": -1}
    first = edge.request("POST", "/text-to-image/generate", body, headers(edge.demo_key, **{"Idempotency-Key": "rest-order-7"}))
    balance = ledger.get_key(key_id).balance
    retry = edge.request("POST", "/text-to-image/generate", body, headers(edge.demo_key, **{"Idempotency-Key": "rest-order-7"}))
    assert first.status == retry.status == 201
    assert first.json()["images"] == retry.json()["images"] and first.json()["seeds"] == retry.json()["seeds"]
    assert ledger.get_key(key_id).balance == balance  # the retry was not charged


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"width": 100}, "invalid width 100"),
        ({"steps": 0}, "invalid steps 0"),
        ({"cfgScale": 31}, "invalid cfgScale 31.0"),
        ({"samplerName": "lms"}, "invalid samplerName 'lms'"),
        ({"scheduler": ""}, "invalid scheduler ''"),
        ({"prompt": ""}, "invalid prompt ''"),
        ({"seed": -5}, "invalid seed -5"),
    ],
)
def test_invalid_fields_are_400_and_free(edge, ledger, change, fragment):
    key_id = ledger.find_key(edge.demo_key).id
    before = ledger.get_key(key_id).balance
    reply = edge.request("POST", "/text-to-image/generate", {**SMALL, **change}, headers(edge.demo_key))
    assert_error_shape(reply, 400, "INVALID_ARGUMENT", fragment)
    assert ledger.get_key(key_id).balance == before


@pytest.mark.parametrize(
    "body,fragment",
    [
        ('{"prompt": "x", ', "Unexpected end of string"),
        ('{"steps": "abc"}', "steps"),
        ('{"seed": 1.5}', "seed"),
        ('[1, 2, 3]', ""),
        ('{"width": 9999999999999}', "width"),
    ],
)
def test_malformed_json_is_400_in_the_same_shape(edge, body, fragment):
    reply = edge.request("POST", "/text-to-image/generate", body, headers(edge.demo_key))
    assert_error_shape(reply, 400, "INVALID_ARGUMENT", fragment)


def test_unknown_model_is_404(edge):
    reply = edge.request("POST", "/text-to-image/generate", {**SMALL, "modelId": 5}, headers(edge.demo_key))
    assert_error_shape(reply, 404, "NOT_FOUND", "model 5 does not exist")


def test_unknown_path_and_wrong_method(edge):
    assert_error_shape(edge.request("GET", "/v2/images"), 404, "NOT_FOUND", "no such endpoint")
    reply = edge.request("GET", "/text-to-image/generate")
    assert_error_shape(reply, 405, "UNIMPLEMENTED", "use POST")
    stream = edge.request("GET", "/text-to-image/generate/stream")
    assert_error_shape(stream, 405, "UNIMPLEMENTED", "use POST /text-to-image/generate/stream")
    assert stream.headers["allow"] == "POST"


def test_missing_unknown_and_revoked_keys(edge, ledger):
    assert_error_shape(edge.request("POST", "/text-to-image/generate", SMALL, headers()), 401, "UNAUTHENTICATED", "missing API key")
    assert_error_shape(
        edge.request("POST", "/text-to-image/generate", SMALL, headers("ilx_unknown-0000000000000000000000000")),
        401, "UNAUTHENTICATED", "unknown API key",
    )
    record, key = ledger.create_key("revoked", 10, "standard")
    ledger.revoke(record.id)
    assert_error_shape(edge.request("POST", "/text-to-image/generate", SMALL, headers(key)), 403, "PERMISSION_DENIED", record.id)


def test_insufficient_balance_is_400(edge, ledger):
    record, key = ledger.create_key("poor", 0, "standard")
    reply = edge.request("POST", "/text-to-image/generate", SMALL, headers(key))
    error = assert_error_shape(reply, 400, "FAILED_PRECONDITION")
    assert error["message"] == "insufficient stardust: this request costs 1, balance is 0"


def test_rate_limit_is_429_with_retry_after(edge, ledger):
    record, key = ledger.create_key("tight", 100, "tight")  # burst 1, then 1 per minute
    assert edge.request("POST", "/text-to-image/generate", SMALL, headers(key)).status == 201
    reply = edge.request("POST", "/text-to-image/generate", SMALL, headers(key))
    assert_error_shape(reply, 429, "RESOURCE_EXHAUSTED", "rate limit exceeded")
    assert 1 <= int(reply.headers["retry-after"]) <= 60
    assert reply.headers["x-ratelimit-limit"] == "1" and reply.headers["x-ratelimit-remaining"] == "0"
    assert ledger.get_key(record.id).balance == 99


def test_body_over_the_limit_is_413(edge):
    big = json.dumps({**SMALL, "prompt": "x" * (2 * 1024 * 1024)})
    assert_error_shape(edge.request("POST", "/text-to-image/generate", big, headers(edge.demo_key)), 413, "INVALID_ARGUMENT", "too large")


def test_grpc_clients_use_the_same_listener(edge):
    from t2i.client import Client

    with Client(f"127.0.0.1:{edge.http_port}", api_key=edge.demo_key) as client:
        result = client.generate("1girl", width=64, height=64, steps=2, seed=3)
        assert result.stardust_usage == 1 and len(result.images) == 1
        assert client.list_models()[0].id == 1


def test_loras_through_the_edge(edge, demo_model):
    """GET /lora/list and a generation naming LoRAs, in the documented JSON spelling."""
    make_lora(demo_model, seed=8, rank=4, naming=KOHYA_SGM).save(edge.data_dir / "loras" / "edge_style.safetensors")
    serve = [pid for pid in edge_children(edge.process.pid) if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(serve) == 1
    os.kill(serve[0], signal.SIGHUP)
    deadline = time.monotonic() + 30
    while True:
        listed = edge.request("GET", "/lora/list", headers=headers(edge.demo_key))
        assert listed.status == 200
        loras = listed.json()["loras"]
        if any(lora["name"] == "edge_style" for lora in loras):
            break
        assert time.monotonic() < deadline, loras
        time.sleep(0.2)
    (style,) = [lora for lora in loras if lora["name"] == "edge_style"]
    assert style["modelId"] == 1 and style["rank"] == 4 and style["hasTextEncoder"] is True and len(style["hash"]) == 12
    body = {**SMALL, "loras": [{"name": "edge_style", "strength": 0.8, "strengthClip": 0.5}]}
    assert edge.request("POST", "/text-to-image/generate", body, headers(edge.demo_key)).status == 201
    wrong = edge.request("POST", "/text-to-image/generate", {**SMALL, "loras": [{"name": "edge_stlye"}]}, headers(edge.demo_key))
    error = assert_error_shape(wrong, 400, "INVALID_ARGUMENT", "edge_style")
    assert "loras[0].name" in error["message"]
    assert_error_shape(edge.request("POST", "/lora/list", {}, headers(edge.demo_key)), 405, "UNIMPLEMENTED", "GET /lora/list")


def edge_children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError):
                continue
    return found
