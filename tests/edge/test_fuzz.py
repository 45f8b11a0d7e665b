"""5,000+ malformed or hostile requests through real Envoy: never a 5xx, always the documented
error shape, never a charge, and the service stays healthy."""

import json
import random
import select
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from testbed.up import Reply
from .test_rest import SMALL, headers

VALID = {**SMALL, "steps": 1}
INT_FIELDS = ["modelId", "height", "width", "steps", "seed"]
STRING_FIELDS = ["prompt", "negativePrompt", "samplerName", "scheduler"]
# Values that are invalid for the field whatever else the body holds.
INVALID_VALUES = {
    "modelId": [0, -1, 99, 2**31 - 1, "999"],
    "height": [0, -8, 7, 100, 2888, 100000, 2**31 - 1, -(2**31)],
    "width": [1, 63, 65, 2896, 10**9],
    "steps": [0, -1, 151, 10**6, 2**31 - 1],
    "seed": [-2, -(2**63), "-9223372036854775808"],
    "cfgScale": [-0.001, 30.0001, 1e308, -1e308, "NaN", "Infinity", "-Infinity"],
    "cfgRescale": [-0.001, 1.0001, 1e308, "NaN", "-Infinity"],
    "samplerName": ["", "EULER", "euler ", "dpmpp_2m", "euler\u0000", "\u202eeuler", "'; DROP TABLE api_keys;--"],
    "scheduler": ["", "Normal", "linear", "karras\n", "${jndi:ldap://x}"],
    "prompt": ["", "x" * 3001],
    "negativePrompt": ["n" * 3001],
}
WRONG_TYPES = [{"a": 1}, [1, 2], True, "not-a-number", [], {}]
NUMBERS = ["1e400", "-1e400", "9223372036854775808", "18446744073709551616", "1.5", "0x10", "01", "+1", ".5", "1e", "-"]


def cases(rng: random.Random):
    """(method, path, body bytes, headers) tuples, every one a request the API must refuse.
    "{key}" in a header stands for the demo key."""

    def body(obj) -> bytes:
        return json.dumps(obj).encode()

    for i in range(5200):
        kind = i % 13
        h = {"Content-Type": "application/json", "x-illustrious-api-key": "{key}"}
        path = "/text-to-image/generate"
        if kind == 0:  # one invalid value
            field = rng.choice(list(INVALID_VALUES))
            data = body({**VALID, field: rng.choice(INVALID_VALUES[field]), "prompt": VALID["prompt"] if field != "prompt" else rng.choice(INVALID_VALUES["prompt"])})
        elif kind == 1:  # a wrong type (a string is fine for a string field, so never that)
            field = rng.choice(INT_FIELDS + STRING_FIELDS + ["cfgScale"])
            wrong = [v for v in WRONG_TYPES if not isinstance(v, str)] if field in STRING_FIELDS else WRONG_TYPES
            data = body({**VALID, field: rng.choice(wrong)})
        elif kind == 2:  # a number JSON cannot hold, or no JSON number at all
            field = rng.choice(INT_FIELDS)
            data = json.dumps(VALID).replace(f'"{field}": {json.dumps(VALID[field])}', f'"{field}": {rng.choice(NUMBERS)}').encode()
        elif kind == 3:  # NaN and Infinity tokens (not JSON)
            data = json.dumps(VALID).replace('"cfgScale": 5', f'"cfgScale": {rng.choice(["NaN", "Infinity", "-Infinity", "nan"])}').encode()
        elif kind == 4:  # truncated JSON
            full = body(VALID)
            data = full[: rng.randrange(1, len(full) - 1)]
        elif kind == 5:  # random bytes, invalid UTF-8 included
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        elif kind == 6:  # invalid UTF-8 inside a string
            data = body(VALID).replace(b'"1girl"', b'"1girl \xff\xfe\xc0\x80 end"')
        elif kind == 7:  # deep nesting
            depth = rng.choice([100, 1000, 5000, 20000])
            data = ('{"prompt": ' + "[" * depth + "]" * depth + ', "width": 64}').encode()
        elif kind == 8:  # fields missing (the rest default to invalid zero values)
            keep = rng.sample(sorted(VALID), rng.randrange(0, 4))
            data = body({k: VALID[k] for k in keep if k != "steps"} | {"steps": 0})
        elif kind == 9:  # hostile headers and keys on a valid body
            data = body(VALID)
            h["x-illustrious-api-key"] = rng.choice(["", "ilx_", "ilx_" + "a" * 4000, "Bearer ilx_x", "ilx_\u00e9".encode().decode("latin-1"),
                                                     "' OR 1=1 --", "ilx_../../etc/passwd"])
        elif kind == 10:  # wrong or missing content type, wrong method, odd paths
            data = body({**VALID, "steps": 0})
            choice = rng.randrange(5)
            if choice == 0:
                h["Content-Type"] = rng.choice(["text/plain", "application/xml", "multipart/form-data; boundary=x"])
            elif choice == 1:
                del h["Content-Type"]
            elif choice == 2:
                path = rng.choice(["/text-to-image/generate/", "/TEXT-TO-IMAGE/GENERATE", "/text-to-image/../model/list",
                                   "/text-to-image/generate%00", "/" + "a" * 2000, "/text-to-image/generate?x=" + "y" * 1000])
            elif choice == 3:
                yield ("PUT", path, data, h)
                continue
            else:
                yield ("DELETE", "/model/list", None, h)
                continue
        elif kind == 11:  # unknown fields never make an invalid request valid
            data = body({**VALID, "width": 100, "__proto__": {"admin": True}, "constructor": 1, "stardustUsage": -5})
        else:  # long, strange strings in an otherwise invalid request
            data = body({**VALID, "prompt": "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(200)), "height": 0})
        yield ("POST", path, data, h)
    for _ in range(8):  # 10 MB bodies
        yield ("POST", "/text-to-image/generate", b'{"prompt": "' + b"x" * (10 * 1024 * 1024) + b'"}',
               {"Content-Type": "application/json", "x-illustrious-api-key": "{key}"})


def send_streaming(port: int, method: str, path: str, data: bytes, hdrs: dict) -> Reply:
    """Send a large body in pieces and stop as soon as the server answers, as a browser or
    curl does, so an early 413 is read rather than lost to a reset."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(data)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "Connection: close\r\n\r\n"
        sock.sendall(head.encode("latin-1"))
        for offset in range(0, len(data), 65536):
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(data[offset : offset + 65536])
            except (BrokenPipeError, ConnectionResetError):
                break
        raw = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            raw += chunk
    finally:
        sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers_ = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Reply(status, headers_, body)


def test_fuzzed_requests_are_refused_cleanly(edge, ledger):
    rng = random.Random(20261124)
    key_id = ledger.find_key(edge.demo_key).id
    before = ledger.get_key(key_id)
    requests = [(m, p, b, {k: (v.replace("{key}", edge.demo_key) if isinstance(v, str) else v) for k, v in h.items()})
                for m, p, b, h in cases(rng)]
    assert len(requests) >= 5000
    problems, statuses = [], {}
    lock = threading.Lock()

    def send(request):
        method, path, data, hdrs = request
        try:
            if data is not None and len(data) > 1024 * 1024:
                reply: Reply = send_streaming(edge.http_port, method, path, data, hdrs)
            else:
                reply = edge.request(method, path, data, hdrs, timeout=60)
        except Exception as error:  # a dropped connection is a failure too
            with lock:
                problems.append(f"{method} {path[:60]}: {error!r}")
            return
        with lock:
            statuses[reply.status] = statuses.get(reply.status, 0) + 1
        issue = None
        if reply.status >= 500 or reply.status < 400:
            issue = f"status {reply.status}"
        else:
            try:
                error = json.loads(reply.body)["error"]
                if set(error) != {"code", "status", "message", "requestId"} or error["code"] != reply.status:
                    issue = f"bad shape {error}"
                elif not error["message"] or error["requestId"] != reply.headers.get("x-request-id"):
                    issue = f"no message or request id {error}"
                elif reply.headers.get("content-type") != "application/json":
                    issue = f"content-type {reply.headers.get('content-type')}"
            except (ValueError, KeyError, TypeError) as exc:
                issue = f"not the error shape ({exc}): {reply.body[:120]!r}"
        if issue:
            with lock:
                problems.append(f"{method} {path[:60]} {(data or b'')[:80]!r}: {issue}")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(send, requests))
    assert not problems, f"{len(problems)} bad replies, e.g. {problems[:5]}; statuses {statuses}"
    assert set(statuses) <= {400, 401, 404, 405, 413, 429}, statuses
    assert statuses.get(413, 0) >= 8 and statuses.get(400, 0) > 2500, statuses
    after = ledger.get_key(key_id)
    assert (after.balance, after.reserved) == (before.balance, before.reserved)
    assert ledger.verify() == []
    healthy = edge.request("POST", "/text-to-image/generate", VALID, headers(edge.demo_key))
    assert healthy.status == 201
