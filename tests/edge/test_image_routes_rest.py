"""The image routes through real Envoy: POST /image-to-image/generate answers 201 like the
text-to-image route, its stream sends the usual events, and a hires fix on the text-to-image
stream counts both passes; a picture's price is charged once, as the unary answer says."""

import base64
import http.client
import io
import json

import numpy as np
from PIL import Image

from .test_rest import SMALL, headers
from .test_stream_rest import read_events


def png(width: int, height: int) -> str:
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def image_size(encoded: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(encoded))).size


def stream(edge, path: str, body: dict, key: str) -> list[dict]:
    connection = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=120)
    connection.request("POST", path, body=json.dumps(body), headers=headers(key))
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type") == "text/event-stream"
    return [event for _, event in read_events(response)]


def test_image_to_image_answers_201_with_the_pictures_size_and_its_price(edge, ledger):
    body = {**SMALL, "width": 0, "height": 0, "steps": 3, "denoise": 0.5, "initImage": png(70, 66)}
    before = ledger.find_key(edge.demo_key).balance
    reply = edge.request("POST", "/image-to-image/generate", body, headers(edge.demo_key))
    assert reply.status == 201, reply.body
    answer = reply.json()
    # 70x66 cropped about the middle to multiples of 8.
    assert [image_size(i) for i in answer["images"]] == [(64, 64)]
    assert ledger.find_key(edge.demo_key).balance == before - int(answer["stardustUsage"]) == int(answer["stardustBalance"])


def test_the_image_stream_sends_events_and_ends_with_the_unary_answer(edge):
    body = {**SMALL, "width": 0, "height": 0, "steps": 3, "denoise": 0.6, "seed": 8, "initImage": png(64, 64)}
    events = stream(edge, "/image-to-image/generate/stream", body, edge.demo_key)
    kinds = [next(iter(e)) for e in events]
    assert kinds[:2] == ["queued", "started"] and "progress" in kinds and kinds[-1] == "result", kinds
    assert events[-2]["progress"]["step"] == events[-2]["progress"]["totalSteps"] == 3
    unary = edge.request("POST", "/image-to-image/generate", body, headers(edge.demo_key)).json()
    assert events[-1]["result"]["images"] == unary["images"]


def test_a_hires_stream_counts_both_passes_and_ends_at_the_upscaled_size(edge):
    body = {**SMALL, "steps": 3, "seed": 9, "hiresFix": {"scale": 1.5, "steps": 2}}
    events = stream(edge, "/text-to-image/generate/stream", body, edge.demo_key)
    progress = [e["progress"] for e in events if "progress" in e]
    assert progress and {p["totalSteps"] for p in progress} == {5}, progress
    assert progress[-1]["step"] == 5 and progress[-1]["evaluations"] == progress[-1]["totalEvaluations"] == 5
    assert [image_size(i) for i in events[-1]["result"]["images"]] == [(96, 96)]
