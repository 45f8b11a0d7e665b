"""Streams are billed exactly like unary calls: charged once, at the result event, which carries
usage and balance; nothing charged for an error event, a disconnect or a revocation.

Streams that must still be running are held at their first UNet forward by the server's gate
(testbed/gate.py)."""

import time

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

from testbed.api import TINY, Api
from testbed.metrics import scrape, value


def stream(api: Api, key: str, **fields):
    request = pb.GenerateImageRequest(**{**TINY, **fields})
    return api.stub.GenerateImageStream(request, metadata=api.metadata(key), timeout=120)


def wait_released(ledger, key_id: str, timeout: float = 60) -> None:
    """Releases are queued, not awaited: poll; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while ledger.get_key(key_id).reserved:
        assert time.monotonic() < deadline, "the reservation was never released"
        time.sleep(0.05)


def test_a_stream_is_charged_once_with_usage_and_balance_in_its_result(billed_server, ledger):
    record, key = ledger.create_key("streamer", 100, "standard")
    api = Api(billed_server.target)
    events = list(stream(api, key, steps=4))
    result = events[-1].result
    assert events[0].WhichOneof("event") == "queued" and events[-1].WhichOneof("event") == "result"
    unary = api.generate(key, steps=4)
    assert result.stardust_usage == unary.response.stardust_usage > 0
    assert result.stardust_balance == 100 - result.stardust_usage
    assert ledger.get_key(record.id).balance == 100 - 2 * result.stardust_usage
    assert ledger.verify() == []
    api.close()


def test_numimages_is_priced_per_image(billed_server, ledger):
    _, key = ledger.create_key("batch", 1000, "standard")
    api = Api(billed_server.target)
    one = api.generate(key, width=256, height=256, steps=28).response
    three = api.generate(key, width=256, height=256, steps=28, num_images=3).response
    assert three.stardust_usage == 3 * one.stardust_usage and len(three.images) == 3
    api.close()


def test_a_stream_refused_before_it_starts_is_a_status(billed_server, ledger):
    _, key = ledger.create_key("poor", 1, "standard")
    api = Api(billed_server.target)
    try:
        list(stream(api, key, width=512, height=512, steps=60))
        raise AssertionError("not refused")
    except grpc.RpcError as error:
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION and "insufficient stardust" in error.details()
    api.close()


def test_a_client_that_disconnects_mid_stream_is_not_charged_and_the_work_stops(billed_server, ledger):
    record, key = ledger.create_key("leaver", 1000, "standard")
    api = Api(billed_server.target)
    server, gate = billed_server, billed_server.gate
    drops, cancels = len(server.logged("request dropped")), len(server.logged("request cancelled by the client"))
    with gate:
        call = stream(api, key, width=256, height=256, steps=150)
        assert next(call).WhichOneof("event") == "queued"
        gate.wait_held(rows=2)  # its first evaluation is in the UNet, held
        passed, held_at = gate.state()["passed"], value(scrape(server.metrics_port), "t2i_unet_evaluations_total", model="1")
        call.cancel()
        server.wait_logged("request cancelled by the client", cancels + 1)  # the engine has the abort
    # Open again: the held forward ends, and the request goes before its next one.
    server.wait_logged("request dropped", drops + 1)
    state = gate.state()
    assert state["held"] == 0 and state["passed"] == passed + 1, state
    assert value(scrape(server.metrics_port), "t2i_unet_evaluations_total", model="1") == held_at + 1
    wait_released(ledger, record.id)
    after = ledger.get_key(record.id)
    assert (after.balance, after.reserved) == (1000, 0)
    assert ledger.verify() == []
    api.close()


def test_an_idempotent_stream_replays_without_a_second_charge(billed_server, ledger):
    record, key = ledger.create_key("replayed", 100, "standard")
    api = Api(billed_server.target)
    request = pb.GenerateImageRequest(**{**TINY, "steps": 3})
    metadata = api.metadata(key, "stream-order-1")
    first = list(api.stub.GenerateImageStream(request, metadata=metadata, timeout=60))[-1].result
    again = list(api.stub.GenerateImageStream(request, metadata=metadata, timeout=60))
    assert [e.WhichOneof("event") for e in again] == ["result"]
    assert again[0].result.images == first.images and again[0].result.stardust_usage == first.stardust_usage
    assert ledger.get_key(record.id).balance == 100 - first.stardust_usage
    api.close()


def test_revoking_the_key_mid_stream_ends_it_with_an_error_event_and_no_charge(billed_server, ledger):
    record, key = ledger.create_key("revoked-mid-stream", 1000, "standard")
    api = Api(billed_server.target)
    kinds = []
    with billed_server.gate:  # held in its first forward until the revocation has ended the stream
        for event in stream(api, key, width=256, height=256, steps=150):
            kinds.append(event.WhichOneof("event"))
            if kinds == ["queued"]:
                billed_server.gate.wait_held(rows=2)
                ledger.revoke(record.id)
            last = event
    assert kinds[-1] == "error" and "result" not in kinds
    assert last.error.status == "PERMISSION_DENIED" and last.error.code == 403
    assert "was revoked while this request was running" in last.error.message
    wait_released(ledger, record.id)
    assert (ledger.get_key(record.id).balance, ledger.get_key(record.id).reserved) == (1000, 0)
    api.close()
