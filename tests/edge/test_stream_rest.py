"""POST /text-to-image/generate/stream through real Envoy: server-sent events that arrive while
the image is made, the usual JSON error before the stream starts, the unary answer as the
last event, and a disconnect that stops the work and charges nothing."""

import base64
import http.client
import json
import time

from testbed.metrics import scrape, value
from testbed.up import Reply

from .test_rest import SMALL, assert_error_shape, headers


def open_stream(edge, body: dict, key: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=120)
    connection.request("POST", "/text-to-image/generate/stream", body=json.dumps(body), headers=headers(key))
    return connection.getresponse()


def last(event: dict) -> bool:
    return "result" in event or "error" in event


def read_events(response: http.client.HTTPResponse, stop=last):
    """(seconds since the first byte, event) for each `data:` line, as each arrives (the raw
    chunked stream, read line by line, so that arrival times are real), until `stop`."""
    events, started = [], None
    while True:
        line = response.fp.readline()
        if not line:
            return events
        started = started or time.monotonic()
        if line.startswith(b"data: "):
            event = json.loads(line[6:])
            events.append((time.monotonic() - started, event))
            if stop(event):
                return events


def test_events_arrive_while_the_image_is_made_and_end_with_the_unary_answer(edge, ledger):
    body = {**SMALL, "width": 128, "height": 128, "steps": 30, "seed": 21, "previewEverySteps": 1}
    before = ledger.find_key(edge.demo_key).balance
    with edge.gate:
        response = open_stream(edge, body, edge.demo_key)
        assert response.status == 200 and response.getheader("content-type") == "text/event-stream"
        # Events come as they happen, not all at the end: the first arrives while the request
        # is held in its first UNet forward (edge.gate), through the service and Envoy.
        events = read_events(response, stop=lambda event: "queued" in event)
        edge.gate.wait_held(rows=2)
    events += read_events(response)
    kinds = [next(iter(e)) for _, e in events]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "result", kinds
    # Asked for on every step, but at most one per 500 ms (preview_interval_ms): far fewer than 30,
    # no more than the time the denoising took allows.
    preview_steps = [e["preview"]["step"] for _, e in events if "preview" in e]
    denoising = events[-1][0] - events[1][0]
    assert 1 <= len(preview_steps) <= 1 + denoising / 0.5 and len(preview_steps) < 30, (preview_steps, denoising)
    assert preview_steps == sorted(set(preview_steps)) and "progress" in kinds
    steps = [e["progress"]["step"] for _, e in events if "progress" in e]
    assert steps == sorted(steps) and steps[-1] == 30
    result = events[-1][1]["result"]
    assert int(result["stardustUsage"]) > 0 and int(result["stardustBalance"]) == before - int(result["stardustUsage"])
    unary = edge.request("POST", "/text-to-image/generate", body, headers(edge.demo_key)).json()
    assert result["images"] == unary["images"] and result["seeds"] == unary["seeds"] == ["21"]
    assert result["outputFormat"] == unary["outputFormat"] == "png"
    preview = base64.b64decode(next(e["preview"]["jpeg"] for _, e in events if "preview" in e))
    assert preview[:3] == b"\xff\xd8\xff"  # a JPEG


def test_errors_before_the_stream_starts_are_the_usual_json_error(edge):
    response = open_stream(edge, {**SMALL, "width": 7}, edge.demo_key)
    reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    assert_error_shape(reply, 400, "INVALID_ARGUMENT", "invalid width 7")
    missing = open_stream(edge, SMALL, "ilx_not-a-key-000000000000000000000000")
    assert missing.status == 401 and json.loads(missing.read())["error"]["status"] == "UNAUTHENTICATED"


def test_a_disconnect_stops_the_work_and_charges_nothing(edge, ledger):
    before = ledger.find_key(edge.demo_key).balance
    logged = {msg: len([e for e in edge.service_log() if e.get("msg") == msg])
              for msg in ("request cancelled by the client", "request dropped")}
    with edge.gate:
        response = open_stream(edge, {**SMALL, "width": 256, "height": 256, "steps": 150}, edge.demo_key)
        read_events(response, stop=lambda event: "queued" in event)
        edge.gate.wait_held(rows=2)  # its first evaluation is in the UNet, held
        passed = edge.gate.state()["passed"]
        evaluations = value(scrape(edge.metrics_port), "t2i_unet_evaluations_total", model="1")
        response.close()
        # Envoy passed the disconnect on: the service cancelled the call and queued the abort.
        edge.wait_logged("request cancelled by the client", logged["request cancelled by the client"] + 1)
    # Open again: the held forward ends, and the request goes before its next one.
    edge.wait_logged("request dropped", logged["request dropped"] + 1)
    state = edge.gate.state()
    assert state["held"] == 0 and state["passed"] == passed + 1, state
    assert value(scrape(edge.metrics_port), "t2i_unet_evaluations_total", model="1") == evaluations + 1
    deadline = time.monotonic() + 60  # the release is queued, not awaited; this only guards against a hang
    while ledger.find_key(edge.demo_key).reserved:
        assert time.monotonic() < deadline, "the reservation was never released"
        time.sleep(0.05)
    after = ledger.find_key(edge.demo_key)
    assert (after.balance, after.reserved) == (before, 0)
