"""The OpenAI Images API end to end: the official `openai` SDK -> real Envoy -> the adapters'
port of the real service -> its own GenerateImage over gRPC -> billing on SQLite."""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import io
import json
import threading
import time
import uuid

import openai
import pytest
from openai import OpenAI
from PIL import Image, ImageDraw

from .test_rest import SMALL, headers, until

PROMPT = "1girl, masterpiece"
# The documented route's SMALL, in OpenAI's terms (size, n) and ours (extra_body).
OURS = {"negative_prompt": "", "steps": 2, "cfg_scale": 5, "seed": 3, "sampler": "euler", "scheduler": "normal"}


def client(edge, key: str, max_retries: int = 0) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{edge.http_port}/v1", api_key=key, max_retries=max_retries, timeout=120)


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def marker() -> str:
    return f"openai-{uuid.uuid4().hex[:16]}"


def logged(edge, request_id: str) -> list[dict]:
    """The access log's entries for `request_id`, once Envoy has flushed every entry written
    before now: a marker request is sent after them and waited for (the log is in order)."""
    fence = marker()
    edge.request("GET", "/v1/models", headers={"x-request-id": fence})
    until(lambda: any(e["requestId"] == fence for e in edge.access_log()), "the access log")
    return [e for e in edge.access_log() if e["requestId"] == request_id]


def entries_of(ledger, key_id: str, request_id: str) -> list[str]:
    _, entries, _ = ledger.usage(key_id, limit=1000)
    return sorted(e["kind"] for e in entries if e["request_id"] == request_id)


def test_generate_returns_decodable_images_of_the_requested_size(edge, ledger):
    key_id = ledger.find_key(edge.demo_key).id
    before = ledger.get_key(key_id).balance
    raw = client(edge, edge.demo_key).images.with_raw_response.generate(
        model="1", prompt=PROMPT, size="96x64", n=2, extra_body=OURS)
    result = raw.parse()
    assert len(result.data) == 2 and result.size == "96x64" and result.output_format == "png"
    for item in result.data:
        image = decoded(item.b64_json)
        assert image.format == "PNG" and image.size == (96, 64)
        assert item.revised_prompt == PROMPT and item.url is None
    assert result.data[0].b64_json != result.data[1].b64_json  # two images of one batch
    charge, balance = int(raw.headers["x-stardust-usage"]), int(raw.headers["x-stardust-balance"])
    assert charge > 0 and balance == before - charge == ledger.get_key(key_id).balance
    assert raw.headers["x-seeds"] == "3,3"  # one noise draw for the batch, as numImages
    assert "x-ratelimit-remaining" in raw.headers
    assert abs(result.created - time.time()) < 300


def test_our_parameters_reach_the_engine(edge):
    images = client(edge, edge.demo_key).images

    def one(**ours) -> str:
        return images.generate(model="1", prompt=PROMPT, size="64x64", extra_body={**OURS, **ours}).data[0].b64_json

    first, again, other = one(seed=7, sampler="euler_ancestral"), one(seed=7, sampler="euler_ancestral"), one(seed=8)
    assert first == again and first != other  # the seed decides the image
    recipe = decoded(first).info["parameters"]
    assert "Sampler: Euler a" in recipe and "Seed: 7" in recipe and "Steps: 2" in recipe and "CFG scale: 5" in recipe
    negative = decoded(one(negative_prompt="worst quality")).info["parameters"]
    assert "Negative prompt: worst quality" in negative
    jpeg = images.generate(model="1", prompt=PROMPT, size="64x64", output_format="jpeg", output_compression=80,
                           extra_body=OURS)
    assert decoded(jpeg.data[0].b64_json).format == "JPEG" and jpeg.output_format == "jpeg"


def test_auto_size_is_the_models_default(edge):
    # The demo model allows 64 to 2880 per side: `auto` is 1024x1024.
    result = client(edge, edge.demo_key).images.generate(prompt=PROMPT, size="auto", extra_body={**OURS, "steps": 1})
    assert decoded(result.data[0].b64_json).size == (1024, 1024) and result.size == "1024x1024"


def test_a_bad_key_raises_authentication_error(edge):
    with pytest.raises(openai.AuthenticationError) as raised:
        client(edge, "ilx_not-a-key-000000000000000000000000").images.generate(prompt=PROMPT, size="64x64", extra_body=OURS)
    error = raised.value
    assert error.status_code == 401 and error.code == "invalid_api_key" and error.type == "invalid_request_error"
    assert error.body["message"] == "unknown API key"
    with pytest.raises(openai.AuthenticationError):
        client(edge, "ilx_not-a-key-000000000000000000000000").models.list()


def test_no_balance_raises_rate_limit_error_once_without_retries(edge, ledger):
    record, key = ledger.create_key("openai-poor", 0, "standard")
    request_id = marker()
    with pytest.raises(openai.RateLimitError) as raised:
        client(edge, key, max_retries=3).images.generate(
            model="1", prompt=PROMPT, size="64x64", extra_body=OURS, extra_headers={"x-request-id": request_id})
    error = raised.value
    assert error.status_code == 429 and error.code == "insufficient_quota" and error.type == "insufficient_quota"
    assert "insufficient stardust: this request costs" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    # OpenAI's own answer to an exhausted quota, and the SDK takes it as final: one attempt, not four.
    attempts = logged(edge, request_id)
    assert [e["status"] for e in attempts] == [429] and attempts[0]["api"] == "openai"
    assert ledger.get_key(record.id).balance == 0 and ledger.get_key(record.id).reserved == 0


def test_a_rate_limit_raises_rate_limit_error_after_the_sdks_retries(edge, ledger):
    """A key of tier `solo` (one request in flight) holds one in the UNet: each of the SDK's
    attempts is refused with retry-after 1, which it waits for before the next; after its
    retries it raises RateLimitError."""
    record, key = ledger.create_key("openai-solo", 1000, "solo")
    holder: dict = {}
    with edge.gate:
        thread = threading.Thread(target=lambda: holder.setdefault(
            "reply", edge.request("POST", "/text-to-image/generate", SMALL, headers(key))))
        thread.start()
        edge.gate.wait_held(rows=2)
        request_id = marker()
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as raised:
            client(edge, key, max_retries=2).images.generate(
                model="1", prompt=PROMPT, size="64x64", extra_body=OURS, extra_headers={"x-request-id": request_id})
        elapsed = time.monotonic() - started
    thread.join(120)
    assert holder["reply"].status == 201  # the one in flight was never disturbed
    error = raised.value
    assert error.code == "rate_limit_exceeded" and error.type == "requests"
    assert error.response.headers["retry-after"] == "1" and error.response.headers["x-should-retry"] == "true"
    assert "already has 1 requests in flight" in error.message
    attempts = logged(edge, request_id)
    assert [e["status"] for e in attempts] == [429] * 3  # the first try and max_retries retries
    starts = [dt.datetime.fromisoformat(e["time"]) for e in attempts]
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:])]
    assert all(gap >= 0.95 for gap in gaps), gaps  # retry-after honoured, not the SDK's shorter backoff
    assert elapsed >= 1.9
    assert ledger.get_key(record.id).balance == 1000 - int(holder["reply"].json()["stardustUsage"])


def test_models_list_and_retrieve(edge):
    api = client(edge, edge.demo_key)
    (model,) = api.models.list().data
    from t2i.models.demo import DEMO_NAME

    assert model.id == DEMO_NAME and model.object == "model" and model.owned_by == "illustrious"
    assert api.models.retrieve(model.id).id == model.id == api.models.retrieve("1").id
    with pytest.raises(openai.NotFoundError) as raised:
        api.models.retrieve("dall-e-3")
    assert raised.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        api.images.generate(model="dall-e-3", prompt=PROMPT, size="64x64", extra_body=OURS)
    by_name = api.images.generate(model=model.id, prompt=PROMPT, size="64x64", extra_body=OURS)
    by_id = api.images.generate(model="1", prompt=PROMPT, size="64x64", extra_body=OURS)
    assert by_name.data[0].b64_json == by_id.data[0].b64_json


def test_edit_with_a_picture_and_a_mask_has_the_pictures_size(edge, ledger):
    picture = Image.new("RGB", (96, 72), (200, 40, 40))
    ImageDraw.Draw(picture).ellipse((20, 10, 70, 60), fill=(40, 40, 200))
    # OpenAI's kind of mask: the transparent left half is re-drawn.
    mask = Image.new("RGBA", (96, 72), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle((0, 0, 47, 71), fill=(0, 0, 0, 0))
    api = client(edge, edge.demo_key)
    raw = api.images.with_raw_response.edit(
        model="1", image=("picture.png", png(picture), "image/png"), mask=("mask.png", png(mask), "image/png"),
        prompt="1girl, hat", n=2, extra_body={"steps": 2, "seed": 4, "denoise": 0.9})
    result = raw.parse()
    assert [decoded(item.b64_json).size for item in result.data] == [(96, 72)] * 2 and result.size == "96x72"
    assert int(raw.headers["x-stardust-usage"]) > 0
    recipe = decoded(result.data[0].b64_json).info["parameters"]
    assert "Denoising strength: 0.9" in recipe  # extra_body reached the engine
    default = api.images.edit(model="1", image=("picture.png", png(picture), "image/png"), prompt="1girl",
                              extra_body={"steps": 2})
    assert "Denoising strength: 0.75" in decoded(default.data[0].b64_json).info["parameters"]  # /edits' default
    resized = api.images.edit(model="1", image=("picture.png", png(picture), "image/png"), prompt="1girl", size="64x64",
                              extra_body={"steps": 2, "resize_mode": "crop-and-resize"})
    assert decoded(resized.data[0].b64_json).size == (64, 64)
    small_mask = Image.new("L", (32, 32), 255)
    with pytest.raises(openai.BadRequestError) as raised:
        api.images.edit(model="1", image=("picture.png", png(picture), "image/png"),
                        mask=("mask.png", png(small_mask), "image/png"), prompt="1girl", extra_body={"steps": 2})
    assert raised.value.param == "mask" and "32x32" in raised.value.message


def test_the_same_request_costs_the_same_on_both_routes_with_one_charge_each(edge, ledger):
    record, key = ledger.create_key("openai-parity", 1000, "standard")
    documented_id, openai_id = marker(), marker()
    documented = edge.request("POST", "/text-to-image/generate", {**SMALL, "prompt": PROMPT},
                              headers(key, **{"x-request-id": documented_id}))
    assert documented.status == 201, documented.body[:300]
    raw = client(edge, key).images.with_raw_response.generate(
        model="1", prompt=PROMPT, size="64x64", extra_body=OURS, extra_headers={"x-request-id": openai_id})
    charge = int(documented.json()["stardustUsage"])
    assert int(raw.headers["x-stardust-usage"]) == charge > 0
    assert int(raw.headers["x-stardust-balance"]) == 1000 - 2 * charge == ledger.get_key(record.id).balance
    # One reservation and one charge each, in the ledger under the caller's request id.
    assert entries_of(ledger, record.id, documented_id) == entries_of(ledger, record.id, openai_id) == ["commit", "reserve"]
    # The same request: the same image, byte for byte.
    assert raw.parse().data[0].b64_json == documented.json()["images"][0]


def test_an_idempotency_key_is_honoured(edge, ledger):
    record, key = ledger.create_key("openai-idempotent", 1000, "standard")
    api = client(edge, key)
    retry = {"extra_headers": {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}}
    first = api.images.with_raw_response.generate(model="1", prompt=PROMPT, size="64x64",
                                                   extra_body={**OURS, "seed": -1}, **retry)
    second = api.images.with_raw_response.generate(model="1", prompt=PROMPT, size="64x64",
                                                    extra_body={**OURS, "seed": -1}, **retry)
    assert first.parse().data[0].b64_json == second.parse().data[0].b64_json
    assert ledger.get_key(record.id).balance == 1000 - int(first.headers["x-stardust-usage"])


def test_bearer_works_on_the_documented_route(edge):
    bearer = {"Authorization": f"Bearer {edge.demo_key}"}
    assert edge.request("POST", "/text-to-image/generate", SMALL, headers(**bearer)).status == 201
    assert edge.request("GET", "/model/list", headers=bearer).status == 200
    both = edge.request("POST", "/text-to-image/generate", SMALL, headers(edge.demo_key, **bearer))
    assert both.status == 201
    other = edge.request("POST", "/text-to-image/generate", SMALL,
                         headers("ilx_another-key-000000000000000000000000", **bearer))
    assert other.status == 401 and "two different API keys" in other.json()["error"]["message"]
    basic = edge.request("POST", "/text-to-image/generate", SMALL, headers(Authorization="Basic dXNlcjpwYXNz"))
    assert basic.status == 401 and "unsupported Authorization header (scheme 'Basic')" in basic.json()["error"]["message"]


def test_response_format_url_links_the_jobs_stored_images(edge, ledger):
    """`url`: the generation runs as a job (one reserve, one commit, under the job's id) and each
    URL is its stored image, fetched with the same key as a Bearer token: the image the same
    settings give inline."""
    _, key = ledger.create_key("openai-urls", 1000, "standard")
    key_id = ledger.find_key(key).id
    raw = client(edge, key).images.with_raw_response.generate(
        model="1", prompt=PROMPT, size="64x64", n=2, response_format="url", extra_body=OURS)
    result = raw.parse()
    assert len(result.data) == 2 and all(item.b64_json is None for item in result.data)
    base = f"http://127.0.0.1:{edge.http_port}/jobs/"
    urls = [item.url for item in result.data]
    assert all(url.startswith(base) for url in urls), urls
    job_id = urls[0].removeprefix(base).split("/")[0]
    assert urls == [f"{base}{job_id}/images/{n}" for n in range(2)]
    usage = int(raw.headers["x-stardust-usage"])
    assert usage > 0 and ledger.get_key(key_id).balance == 1000 - usage == int(raw.headers["x-stardust-balance"])
    assert entries_of(ledger, key_id, job_id) == ["commit", "reserve"]
    fetched = []
    for url in urls:
        reply = edge.request("GET", url.removeprefix(f"http://127.0.0.1:{edge.http_port}"),
                             headers={"Authorization": f"Bearer {key}"})
        assert reply.status == 200 and reply.headers["content-type"] == "image/png"
        fetched.append(reply.body)
    inline = client(edge, key).images.generate(model="1", prompt=PROMPT, size="64x64", n=2, extra_body=OURS)
    assert [png(decoded(item.b64_json)) for item in inline.data] == [png(Image.open(io.BytesIO(b))) for b in fetched]
    # Another key cannot fetch them.
    assert edge.request("GET", urls[0].removeprefix(f"http://127.0.0.1:{edge.http_port}"),
                        headers={"Authorization": f"Bearer {edge.demo_key}"}).status == 404


def test_a_url_call_whose_caller_goes_away_cancels_its_job_uncharged(edge, ledger):
    record, key = ledger.create_key("openai-urls-gone", 1000, "standard")
    body = {"model": "1", "prompt": PROMPT, "size": "64x64", "response_format": "url", **OURS}
    with edge.gate:
        connection = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=120)
        connection.request("POST", "/v1/images/generations", body=json.dumps(body),
                           headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        edge.gate.wait_held()

        def job() -> dict:
            (found,) = edge.request("GET", "/jobs", headers=headers(key)).json()["jobs"]
            return found

        assert job()["status"] == "running"
        connection.close()  # the caller goes away while its job runs
        until(lambda: job()["status"] == "cancelled", "the job cancelled")
    until(lambda: entries_of(ledger, record.id, job()["id"]) == ["release", "reserve"], "its price released")
    assert ledger.get_key(record.id).balance == 1000


@pytest.mark.parametrize("arguments,param,code,fragment", [
    ({"n": 9}, "n", "invalid_value", "invalid n (numImages) 9: must be 1 to 8"),
    ({"size": "100x64"}, "size", "invalid_value", "invalid size (width) 100: must be a multiple of 8"),
    ({"size": "64*64"}, "size", "invalid_value", "must be `auto` or WIDTHxHEIGHT"),
    ({"background": "transparent"}, "background", "invalid_value", "use auto or opaque"),
    ({"output_format": "gif"}, "output_format", "invalid_value", "must be one of png, webp, jpeg"),
    ({"quality": "ultra"}, "quality", "invalid_value", "must be one of low, medium"),
    ({"extra_body": {**OURS, "sampler": "lms"}}, "sampler", "invalid_value", "invalid sampler (samplerName) 'lms'"),
    ({"extra_body": {**OURS, "steps": "2"}}, "steps", "invalid_type", "must be an integer"),
    ({"extra_body": {**OURS, "negativ_prompt": "x"}}, "negativ_prompt", "unknown_parameter", "unknown parameter"),
    ({"extra_body": {**OURS, "hires_fix": {"scale": 9}}}, "hires_fix.scale", "invalid_value", "more than 1 and at most 4"),
    ({"extra_body": {**OURS, "loras": [{"name": "nope"}]}}, "loras[0].name", "invalid_value", "no LoRA of that name"),
    ({"extra_body": {**OURS, "resize_mode": "just-resize"}}, "resize_mode", "unknown_parameter", "/v1/images/edits"),
])
def test_refusals_are_openai_shaped_and_name_the_parameter(edge, ledger, arguments, param, code, fragment):
    key_id = ledger.find_key(edge.demo_key).id
    before = ledger.get_key(key_id).balance
    arguments = {"model": "1", "prompt": PROMPT, "size": "64x64", "extra_body": OURS, **arguments}
    with pytest.raises(openai.BadRequestError) as raised:
        client(edge, edge.demo_key, max_retries=2).images.generate(**arguments)
    error = raised.value
    assert (error.param, error.code, error.type) == (param, code, "invalid_request_error"), error.body
    assert fragment in error.message, error.message
    assert set(error.body) == {"message", "type", "param", "code"}
    assert ledger.get_key(key_id).balance == before


def test_request_ids_and_the_access_log(edge):
    request_id = marker()
    raw = client(edge, edge.demo_key).images.with_raw_response.generate(
        model="1", prompt=PROMPT, size="64x64", extra_body=OURS, extra_headers={"x-request-id": request_id})
    assert raw.headers["x-request-id"] == request_id
    (entry,) = logged(edge, request_id)
    assert entry["path"] == "/v1/images/generations" and entry["status"] == 200 and entry["api"] == "openai"
    assert entry["rest"] in ("", "-", None)
    until(lambda: [e for e in edge.service_log() if e.get("msg") == "image generated" and e.get("request_id") == request_id],
          "the request id in the service log")
    text = json.dumps(edge.access_log()) + "".join(edge.stderr)
    assert f"Bearer {edge.demo_key}" not in text and edge.demo_key not in json.dumps(edge.access_log())


def test_the_edges_own_replies_on_v1_are_openai_shaped(edge):
    unknown = edge.request("GET", "/v1/images/variations", headers={"Authorization": f"Bearer {edge.demo_key}"})
    assert unknown.status == 404 and unknown.json()["error"]["code"] == "unknown_url"
    wrong = edge.request("GET", "/v1/images/generations")
    assert wrong.status == 405 and wrong.json()["error"]["type"] == "invalid_request_error"
    big = edge.request("POST", "/v1/images/generations", b"x" * (1024 * 1024 + 1), {"Content-Type": "application/json"})
    error = big.json()["error"]
    assert big.status == 413 and error["type"] == "invalid_request_error" and "the limit is 1 MiB" in error["message"]
    assert set(error) == {"message", "type", "param", "code"} and big.headers["x-request-id"]
    form = edge.request("POST", "/v1/images/generations", b"prompt=x", {"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 400 and "takes a JSON body" in form.json()["error"]["message"]


def test_a_caller_that_goes_away_is_not_charged(edge, ledger):
    record, key = ledger.create_key("openai-leaver", 1000, "standard")
    counts = {msg: len([e for e in edge.service_log() if e.get("msg") == msg])
              for msg in ("request cancelled by the client", "request dropped")}
    body = json.dumps({"model": "1", "prompt": PROMPT, "size": "128x128", **OURS, "steps": 150})
    with edge.gate:
        connection = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=60)
        connection.request("POST", "/v1/images/generations", body=body,
                           headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        edge.gate.wait_held(rows=2)
        connection.close()  # the edge passes the disconnect on; the adapter cancels its gRPC call
        edge.wait_logged("request cancelled by the client", counts["request cancelled by the client"] + 1)
    edge.wait_logged("request dropped", counts["request dropped"] + 1)
    until(lambda: ledger.get_key(record.id).reserved == 0, "the reservation released")
    assert ledger.get_key(record.id).balance == 1000


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
              f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_an_edit_of_25_mib_reaches_the_adapter_and_one_over_40_mib_is_413(edge, ledger):
    from .test_request_size import IMAGE_CAP, MIB, not_a_picture, post

    before = ledger.find_key(edge.demo_key).balance
    picture = not_a_picture(25 * MIB)
    body, content_type = multipart({"prompt": "1girl", "steps": "2"}, {"image": picture})
    reply = post(edge.http_port, "/v1/images/edits", body, edge.demo_key, content_type)
    error = reply.json()["error"]
    # The service's own refusal (the bytes are no picture): all of them arrived.
    assert reply.status == 400 and error["param"] == "image", error
    assert f"invalid image (initImage) <{len(picture)} bytes>: not an image" in error["message"]
    body, content_type = multipart({"prompt": "1girl"}, {"image": not_a_picture(41 * MIB)})
    reply = post(edge.http_port, "/v1/images/edits", body, edge.demo_key, content_type)
    assert reply.status == 413 and reply.json()["error"]["message"] == f"request body too large: {IMAGE_CAP}"
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert ledger.find_key(edge.demo_key).balance == before


def test_the_readme_snippets_work(edge, tmp_path):
    """The README's "From OpenAI-compatible tools" examples, as printed, against this edge."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### From OpenAI-compatible tools", 1)[1].split("\n## ", 1)[0]
    python = re.search(r"```python\n(.*?)```", section, re.S)[1]
    shell = re.search(r"```sh\n(.*?)```", section, re.S)[1]
    base = f"127.0.0.1:{edge.http_port}"
    # The pictures the README made earlier: first.png (256x256) and mask.png (white top half).
    Image.new("RGB", (256, 256), (120, 90, 200)).save(tmp_path / "first.png")
    mask = Image.new("L", (256, 256))
    ImageDraw.Draw(mask).rectangle((0, 0, 255, 127), fill=255)
    mask.save(tmp_path / "mask.png")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo-api-key").write_text(edge.demo_key)
    ran = subprocess.run([sys.executable, "-c", python.replace("localhost:8080", base)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert Image.open(tmp_path / "image.png").size == (512, 512)
    usage, balance, seeds = ran.stdout.strip().splitlines()[-1].split()
    assert int(usage) > 0 and int(balance) >= 0 and int(seeds) >= 0
    ran = subprocess.run(["bash", "-c", shell.replace("localhost:8080", base)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "KEY": edge.demo_key})
    assert ran.returncode == 0, ran.stderr[-3000:]
    replies = [json.loads(line) for line in ran.stdout.replace("}{", "}\n{").splitlines() if line.strip()]
    assert [decoded(reply["data"][0]["b64_json"]).size for reply in replies] == [(256, 256), (256, 256)]
