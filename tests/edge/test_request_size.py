"""Request body caps per route: 1 MiB for text-to-image and everything else, 40 MiB on the image
routes (a picture and a mask in base64 JSON) and for native gRPC; every 413 names the cap of the
route it hit, and a body under the image cap reaches the service, which can receive it."""

import base64
import json
import socket
import threading

import grpc
import pytest
import yaml
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from t2i import wire
from t2i.edge.envoy_config import CANONICAL, connection_manager, http_filter
from testbed.up import Reply

from .test_rest import SMALL, assert_error_shape, headers

MIB = 1024 * 1024
TEXT_CAP = "the limit is 1 MiB (1048576 bytes)"
IMAGE_CAP = "the limit is 40 MiB (41943040 bytes)"
BUFFER = "envoy.filters.http.buffer"


def not_a_picture(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


def body_with_picture(picture_bytes: int) -> bytes:
    return json.dumps({**SMALL, "initImage": base64.b64encode(not_a_picture(picture_bytes)).decode()}).encode()


def post(port: int, path: str, body: bytes, key: str, content_type: str = "application/json") -> Reply:
    """POST over a raw socket that keeps reading while it sends: Envoy answers a body over the
    cap (413) before it has all of it, then resets the connection, which http.client would
    report as a send error instead of the answer."""
    head = (f"POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: {content_type}\r\n"
            f"{wire.API_KEY_HEADER}: {key}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as connection:
        def send() -> None:
            try:
                connection.sendall(head + body)
            except OSError:
                pass  # refused before the end: the answer is already on its way

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        data = b""
        try:
            while chunk := connection.recv(1 << 16):
                data += chunk
        except ConnectionResetError:
            pass  # what was received before the reset is the whole answer
        sender.join(60)
    head_text, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head_text.decode("latin-1").split("\r\n")
    reply_headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    assert "content-length" in reply_headers, (status_line, reply_headers)  # errors are never chunked
    return Reply(int(status_line.split()[1]), reply_headers, rest[: int(reply_headers["content-length"])])


# --- the config agrees with t2i.wire (no Envoy needed) ---------------------------------------

def routes() -> list[dict]:
    return [route for host in connection_manager(yaml.safe_load(CANONICAL.read_text()))["route_config"]["virtual_hosts"]
            for route in host["routes"]]


def test_the_caps_in_the_config_are_the_ones_t2i_wire_states():
    config = yaml.safe_load(CANONICAL.read_text())
    assert http_filter(config, BUFFER)["max_request_bytes"] == wire.MAX_REQUEST_BYTES
    # The transcoder inherits the stream's buffer limit that the buffer filter set per route; a
    # cap of its own would hold on every route.
    assert "max_request_body_size" not in http_filter(config, "envoy.filters.http.grpc_json_transcoder")
    raised = {}
    for route in routes():
        per_route = route.get("typed_per_filter_config", {}).get(BUFFER)
        if per_route is not None:
            key = route["match"].get("path") or route["match"]["prefix"]
            raised[key] = per_route["buffer"]["max_request_bytes"]
    from t2i.compat import ADAPTERS

    adapters = {route.path: route.body_limit for adapter in ADAPTERS for route in adapter.routes
                if route.body_limit > wire.MAX_REQUEST_BYTES}
    assert adapters  # the OpenAI edits route takes pictures
    assert raised == {**{path: wire.MAX_IMAGE_REQUEST_BYTES for path in (*wire.IMAGE_PATHS, f"/{wire.SERVICE}/")}, **adapters}


def test_the_image_paths_are_the_protos_additional_bindings():
    from google.api import annotations_pb2

    bound = [binding.post for method in pb.DESCRIPTOR.services_by_name["TextToImageService"].methods
             for binding in method.GetOptions().Extensions[annotations_pb2.http].additional_bindings]
    assert sorted(bound) == sorted(wire.IMAGE_PATHS)


def test_the_service_and_the_client_take_the_largest_request_the_edge_forwards():
    from t2i.client import CHANNEL_OPTIONS
    from t2i.settings import ServeSettings

    assert ServeSettings().max_receive_message_bytes == wire.MAX_IMAGE_REQUEST_BYTES
    assert dict(CHANNEL_OPTIONS)["grpc.max_send_message_length"] == wire.MAX_IMAGE_REQUEST_BYTES


# --- through the real Envoy and service ------------------------------------------------------

@pytest.mark.parametrize("path", ["/text-to-image/generate", "/text-to-image/generate/stream"])
def test_a_text_to_image_body_over_1_mib_is_413_naming_1_mib(edge, path):
    reply = post(edge.http_port, path, body_with_picture(2 * MIB), edge.demo_key)
    error = assert_error_shape(reply, 413, "INVALID_ARGUMENT", TEXT_CAP)
    assert error["message"] == f"request body too large: {TEXT_CAP}"


@pytest.mark.parametrize("path", ["/image-to-image/generate", "/image-to-image/generate/stream",
                                  "/image-to-image/generate/?note=trailing-slash-and-query"])
def test_a_25_mib_image_request_passes_the_edge_and_the_service_reads_it(edge, ledger, path):
    before = ledger.find_key(edge.demo_key).balance
    picture = len(not_a_picture(19 * MIB))
    body = body_with_picture(picture)  # about 25 MiB of JSON
    assert 24 * MIB < len(body) < wire.MAX_IMAGE_REQUEST_BYTES
    reply = post(edge.http_port, path, body, edge.demo_key)
    # The service's own refusal (the bytes are no picture), not the edge's or gRPC's size limit;
    # the size it names shows that all of the picture arrived.
    assert_error_shape(reply, 400, "INVALID_ARGUMENT", f"invalid initImage <{picture} bytes>: not an image")
    assert len(reply.body) < 2000  # the picture is not echoed back
    assert ledger.find_key(edge.demo_key).balance == before


@pytest.mark.parametrize("path", ["/image-to-image/generate", "/image-to-image/generate/stream",
                                  "/image-to-image/generate/?note=trailing-slash-and-query"])
def test_an_image_request_over_40_mib_is_413_naming_40_mib(edge, path):
    body = body_with_picture(31 * MIB)  # about 41 MiB of JSON
    assert len(body) > wire.MAX_IMAGE_REQUEST_BYTES
    error = assert_error_shape(post(edge.http_port, path, body, edge.demo_key), 413, "INVALID_ARGUMENT", IMAGE_CAP)
    assert error["message"] == f"request body too large: {IMAGE_CAP}"


@pytest.mark.parametrize("sent, path", [
    ("/image-to-image/generate/?steps=1", "/image-to-image/generate"),
    ("/image-to-image/generate/stream//?x=1", "/image-to-image/generate/stream"),
])
def test_a_generate_post_reaches_the_service_on_its_documented_path(edge, sent, path):
    """Lua drops the query string and trailing slashes (which the transcoder ignores) and has the
    route chosen again: the service tells the image routes by that path."""
    reply = edge.request("POST", sent, SMALL, headers(edge.demo_key))
    assert_error_shape(reply, 400, "INVALID_ARGUMENT", f"is required on POST {path}")


def test_the_image_routes_answer_a_wrong_method_with_405(edge):
    for path in wire.IMAGE_PATHS:
        reply = edge.request("GET", path, headers=headers(edge.demo_key))
        assert_error_shape(reply, 405, "UNIMPLEMENTED", f"method not allowed: use POST {path}")
        assert reply.headers["allow"] == "POST"


def test_the_unknown_path_message_lists_every_path(edge):
    error = assert_error_shape(edge.request("GET", "/v2/images"), 404, "NOT_FOUND", "no such endpoint")
    for call in ("POST /text-to-image/generate", "POST /text-to-image/generate/stream", "POST /image-to-image/generate",
                 "POST /image-to-image/generate/stream", "GET /model/list", "GET /lora/list"):
        assert call in error["message"], error["message"]


def test_native_grpc_through_the_edge_takes_a_picture_up_to_40_mib(edge):
    options = [("grpc.max_send_message_length", 64 * MIB)]
    fields = dict(model_id=1, prompt="1girl", width=64, height=64, steps=2, cfg_scale=5, seed=3, sampler_name="euler",
                  scheduler="normal")
    metadata = ((wire.API_KEY_HEADER, edge.demo_key),)
    with grpc.insecure_channel(f"127.0.0.1:{edge.http_port}", options=options) as channel:
        stub = pb_grpc.TextToImageServiceStub(channel)
        with pytest.raises(grpc.RpcError) as reached:
            stub.GenerateImage(pb.GenerateImageRequest(**fields, init_image=not_a_picture(2 * MIB)), metadata=metadata,
                               timeout=60)
        assert reached.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert reached.value.details().startswith(f"invalid initImage <{2 * MIB} bytes>: not an image"), reached.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            stub.GenerateImage(pb.GenerateImageRequest(**fields, init_image=not_a_picture(41 * MIB)), metadata=metadata,
                               timeout=60)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == f"request message too large: {IMAGE_CAP}"


def noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: about 3 bytes a pixel."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def test_a_picture_over_1_mib_makes_an_image_through_rest_and_native_grpc(edge):
    from t2i.client import Client

    from .test_rest import png_size

    picture = noise_png(1024, 1024)
    assert len(picture) > 2 * MIB
    body = {**SMALL, "initImage": base64.b64encode(picture).decode(), "denoise": 0.5, "resizeMode": "crop-and-resize"}
    created = edge.request("POST", "/image-to-image/generate", body, headers(edge.demo_key))
    assert created.status == 201, created.body[:300]
    assert png_size(created.json()["images"][0]) == (64, 64)
    # The Python client through the edge's gRPC listener: the gRPC route has the image cap.
    with Client(f"127.0.0.1:{edge.http_port}", api_key=edge.demo_key) as client:
        result = client.generate("1girl", init_image=picture, denoise=0.5, width=64, height=64, steps=2, seed=3)
    assert len(result.images) == 1


def test_t2i_generate_with_init_image_makes_an_image_of_the_pictures_size(edge, tmp_path):
    from typer.testing import CliRunner

    from t2i import cli

    from .test_rest import png_size

    (tmp_path / "in.png").write_bytes(noise_png(96, 72))
    out = tmp_path / "out.png"
    result = CliRunner().invoke(cli.app, [
        "generate", "--target", f"127.0.0.1:{edge.http_port}", "--api-key", edge.demo_key, "--prompt", "1girl",
        "--init-image", str(tmp_path / "in.png"), "--denoise", "0.6", "--steps", "2", "--seed", "3", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert png_size(base64.b64encode(out.read_bytes()).decode()) == (96, 72)
