"""Errors the edge makes before a request reaches the service: every one has a message and a
request id, and a request id that the edge did not accept is never sent back (not in the body,
not in the x-request-id header), however the request was refused."""

import re
import socket

import pytest
import yaml

from t2i import wire
from t2i.edge.envoy_config import CANONICAL, connection_manager
from testbed.up import Reply

from .test_rest import assert_error_shape

SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{16,128}")
JUNK_ID = "j" * 300  # too long to be kept


def raw_request(port: int, request: bytes) -> Reply:
    """Send bytes as they are (http.client would refuse to send most of these, or to read a
    200 KiB header back) and parse the one HTTP/1.1 answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request)
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(body)))
    return Reply(int(status_line.split()[1]), headers, body[:length])


def get(path: str = "/model/list", *header_lines: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"GET {path} {version}", *header_lines, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def test_a_431_for_a_long_request_id_answers_with_a_fresh_id_and_a_small_body(edge):
    sent = "r" * 200_000
    reply = raw_request(edge.http_port, get("/model/list", "Host: edge", f"x-request-id: {sent}"))
    error = assert_error_shape(reply, 431, "INVALID_ARGUMENT", "request headers too large")
    assert SANE_ID.fullmatch(error["requestId"]) and error["requestId"] != sent[: len(error["requestId"])]
    assert "r" * 100 not in reply.body.decode() and "r" * 100 not in str(reply.headers)
    assert len(reply.body) < 1000


@pytest.mark.parametrize(
    "request_lines, status, message",
    [
        # Refused by Envoy's codec or connection manager before any filter ran.
        (("/model/list", "Host: edge", *(f"x-h{i}: v" for i in range(wire.MAX_HEADER_COUNT + 1))), 431,
         f"too many request headers: at most {wire.MAX_HEADER_COUNT} are allowed"),
        (("/model/list#fragment", "Host: edge"), 400, "invalid request path"),
        (("/model/list#fragment", "Host: edge", f"x-request-id: {JUNK_ID}"), 400, "invalid request path"),
        (("/model/list", f"x-request-id: {JUNK_ID}"), 400, "a Host header is required"),
        (("/model/list", "Host: edge", f"x-request-id: {JUNK_ID}", "Upgrade: websocket", "Connection: upgrade"), 403,
         "protocol upgrades"),
    ],
    ids=["too-many-headers", "fragment", "fragment-with-a-bad-id", "no-host", "websocket"],
)
def test_requests_refused_unread_get_a_message_and_a_fresh_request_id(edge, request_lines, status, message):
    reply = raw_request(edge.http_port, get(*request_lines))
    name = "PERMISSION_DENIED" if status == 403 else "INVALID_ARGUMENT"
    error = assert_error_shape(reply, status, name, message)
    assert SANE_ID.fullmatch(error["requestId"]), error
    assert JUNK_ID not in reply.body.decode() and JUNK_ID not in str(reply.headers)


def test_each_refusal_gets_its_own_id(edge):
    ids = {raw_request(edge.http_port, get("/model/list#x", "Host: edge")).json()["error"]["requestId"] for _ in range(3)}
    assert len(ids) == 3


def test_the_header_count_limit_is_the_one_the_messages_state():
    manager = connection_manager(yaml.safe_load(CANONICAL.read_text()))
    assert manager["common_http_protocol_options"]["max_headers_count"] == wire.MAX_HEADER_COUNT
