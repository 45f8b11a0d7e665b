"""Links to stored job images (the OpenAI adapter's response_format url): --public-url when the
operator sets it, else the scheme and host the caller used; a bad --public-url stops the start."""

from __future__ import annotations

import dataclasses

from starlette.requests import Request

from t2i.compat.app import configuration_error
from t2i.compat.openai_http import link_base
from t2i.settings import ServeSettings


def request(headers: dict[str, str]) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v1/images/generations", "scheme": "http",
                    "server": ("127.0.0.1", 8090), "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})


def test_links_start_with_the_public_url_or_what_the_caller_used():
    sent = {"host": "api.example.com", "x-forwarded-proto": "https"}
    assert link_base(request(sent), "") == "https://api.example.com"
    assert link_base(request({"host": "127.0.0.1:8080"}), "") == "http://127.0.0.1:8080"
    assert link_base(request({"host": "h", "x-forwarded-proto": "https, http"}), "") == "https://h"
    assert link_base(request({"host": "h", "x-forwarded-proto": "javascript"}), "") == "http://h"
    assert link_base(request(sent), "https://images.example.org") == "https://images.example.org"


def test_a_bad_public_url_is_a_configuration_error():
    for bad in ("api.example.com", "ftp://api.example.com", "https://", "https://api.example.com/?x=1",
                "https://api.example.com/#top"):
        problem = configuration_error(dataclasses.replace(ServeSettings(), public_url=bad))
        assert problem is not None and "--public-url" in problem and repr(bad) in problem, (bad, problem)
    for good in ("", "https://api.example.com", "http://10.0.0.5:8080/", "https://example.com/t2i"):
        assert configuration_error(dataclasses.replace(ServeSettings(), public_url=good)) is None, good
