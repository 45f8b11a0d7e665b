"""Render the copies of facts that live outside Python from their one source.

    python scripts/render.py          rewrite every generated block in place
    python scripts/render.py --check  fail (exit 1) if any generated block is stale

A generated block sits between a line containing `BEGIN GENERATED: <name>` and one containing
`END GENERATED: <name>` (in a YAML/Lua comment or a Markdown HTML comment); the lines between
are replaced, indented like the BEGIN line. Sources:
- the error table, t2i.errors.ERROR_KINDS: the Envoy Lua tables and local-reply mappers in
  edge/envoy.yaml (with t2i.wire's limits, also the reply to requests Envoy refused unread and
  the 413 replies naming the body cap of the route hit),
  the error tables of README.md and edge/README.md (and, through
  scripts/openapi.py, the OpenAPI error responses);
- the serving settings, t2i.settings (via t2i.cli_options): the `t2i serve` flag table of README.md;
- the adapters, t2i.compat: their routes, local replies and the Lua prefix table in
  edge/envoy.yaml; the OpenAI mapping and error tables (t2i.compat.openai_images) in README.md;
- the replies to upstream faults (FAULT_REPLIES below), for the documented API and the adapters;
- the sampler and scheduler names (t2i.sampling.names), the API key header (t2i.wire) and the
  request limits (t2i.validation): the playground's constants in edge/playground/playground.js.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from t2i import wire
from t2i.cli_options import options_of
from t2i.errors import ERROR_KINDS
from t2i.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]


# --- the error table -----------------------------------------------------------------------

def grpc_numbers() -> dict[str, int]:
    return {code.name: code.value[0] for code in grpc.StatusCode}


def http_names() -> dict[int, str]:
    """HTTP status -> status name, for replies that carry no gRPC code (the first row wins)."""
    names: dict[int, str] = {}
    for kind in ERROR_KINDS:
        names.setdefault(kind.http, kind.status)
    return dict(sorted(names.items()))


def grpc_http() -> dict[int, int]:
    """gRPC code -> HTTP status of the statuses the service sends."""
    numbers, table = grpc_numbers(), {}
    for kind in ERROR_KINDS:
        if kind.from_service:
            table.setdefault(numbers[kind.status], kind.http)
    return dict(sorted(table.items()))


def lua_table(name: str, entries: dict, quote: bool) -> list[str]:
    items = [f'[{k}] = "{v}"' if quote else f"[{k}] = {v}" for k, v in entries.items()]
    lines, line = [f"local {name} = {{"], "  "
    for item in items:
        if len(line) + len(item) > 96:
            lines.append(line.rstrip())
            line = "  "
        line += item + ", "
    lines.append(line.rstrip())
    lines.append("}")
    return lines


def envoy_lua_tables() -> list[str]:
    names = {number: name for name, number in grpc_numbers().items()}
    return [
        "-- Limits (t2i.wire).",
        f"local MAX_HEADER_BYTES = {wire.MAX_HEADER_BYTES}",
        f"local MAX_REQUEST_ID = {wire.MAX_REQUEST_ID}",
        "-- gRPC code -> name (all of gRPC's codes).",
        *lua_table("GRPC_NAMES", dict(sorted(names.items())), quote=True),
        "-- gRPC code -> HTTP status of the codes the service sends; others answer 500.",
        *lua_table("GRPC_HTTP", grpc_http(), quote=False),
        "-- HTTP status -> name, for bodies that carry no gRPC code.",
        *lua_table("HTTP_NAMES", http_names(), quote=True),
    ]


# Statuses whose local reply has a mapper of its own, with a fixed message, earlier in the list.
DEDICATED_LOCAL_REPLIES = {413}


def envoy_local_replies() -> list[str]:
    lines = []
    for http, name in http_names().items():
        if http in DEDICATED_LOCAL_REPLIES:
            continue
        lines += [
            f"- filter: {{status_code_filter: {{comparison: {{op: EQ, value: {{default_value: {http}, runtime_key: edge.lr.{http}}}}}}}}}",
            "  body_format_override:",
            "    content_type: application/json",
            "    json_format:",
            f'      error: {{code: {http}, status: {name}, message: "%LOCAL_REPLY_BODY%", requestId: "%REQ(X-REQUEST-ID)%"}}',
        ]
    return lines


# Messages for the replies Envoy makes before the Lua filter has read a request (its codec or
# connection manager refused it), by Envoy's response code details; their own bodies are empty
# or only a reason phrase. Anything else names the details.
UNREAD_MESSAGES = {
    "http1.too_many_headers": f"too many request headers: at most {wire.MAX_HEADER_COUNT} are allowed",
    "http1.headers_too_large": f"request headers too large: the limit is {wire.MAX_HEADER_BYTES} bytes",
    "path_normalization_failed": "invalid request path: a path may not hold a #fragment or malformed characters",
    "missing_host_header": "a Host header is required",
    "low_version": "HTTP/1.0 is not supported: use HTTP/1.1 or HTTP/2",
    "upgrade_failed": "protocol upgrades (WebSocket and others) are not supported",
    "overload": "the API edge is overloaded; retry later",
}


def cel_literal(value: int | str) -> str:
    if isinstance(value, int):
        return str(value)
    # Inside a double-quoted YAML string and an Envoy %CEL(...)% command: keep it plain.
    if any(c in value for c in "'\"\\%"):
        raise ValueError(f"{value!r}: quotes, backslashes and % are not rendered into CEL")
    return f"'{value}'"


def cel_choice(subject: str, cases: dict, default: str) -> str:
    """A CEL expression: the value of the first case equal to `subject`, else `default`."""
    return "".join(f"{subject} == {cel_literal(k)} ? {cel_literal(v)} : " for k, v in cases.items()) + default


def envoy_unread_reply() -> list[str]:
    """The local-reply mapper for requests the Lua filter never saw (it records request_id in
    dynamic metadata for every request it reads). Their x-request-id, if any, was never
    checked, so it is not echoed: the reply gets a fresh id, in the header and the body."""
    status = cel_choice("response.code", {http: name for http, name in http_names().items()},
                        "(response.code >= 500 ? 'INTERNAL' : 'INVALID_ARGUMENT')")
    message = cel_choice("response.code_details", UNREAD_MESSAGES,
                         "'the request is malformed and was not read (' + response.code_details + ')'")
    return [
        "- filter:",
        "    metadata_filter:",
        "      matcher: {filter: illustrious.edge, path: [{key: request_id}], value: {present_match: false}}",
        "      match_if_key_not_found: true",
        "  headers_to_add:",
        '  - header: {key: x-request-id, value: "%UNIQUE_ID%"}',
        "    append_action: OVERWRITE_IF_EXISTS_OR_ADD",
        "  body_format_override:",
        "    content_type: application/json",
        "    json_format:",
        "      error:",
        '        code: "%RESPONSE_CODE%"',
        f'        status: "%CEL({status})%"',
        f'        message: "%CEL({message})%"',
        '        requestId: "%RESP(X-REQUEST-ID)%"',
    ]


# Request body caps: the buffer filter's, 1 MiB, raised per route (BufferPerRoute) on the image
# routes and the service's gRPC route. Their 413 replies name the cap of the route hit; each
# mapper below matches exactly the requests those routes match (tests/edge/test_request_size.py
# checks the routes' values against t2i.wire, and sends bodies just over each cap).
GRPC_ROUTE_PREFIX = f"/{wire.SERVICE}/"
# Envoy's `grpc: {}` route match: application/grpc, +proto or ;params (not grpc-web).
GRPC_CONTENT_TYPE = r"application/grpc([+;].*)?"


def size_limit(limit: int) -> str:
    return f"{limit // 1024 // 1024} MiB ({limit} bytes)"


def image_paths_regex() -> str:
    """The image routes' exact paths with any query string (a route's `path` ignores it), as
    RE2 that Envoy's StringMatcher matches whole."""
    for path in wire.IMAGE_PATHS:
        # Characters that mean nothing to RE2 and need no escape in a YAML double-quoted string.
        if not re.fullmatch(r"[a-z0-9/-]+", path):
            raise ValueError(f"{path!r}: only lower-case letters, digits, / and - are rendered into the regex")
    return f"({'|'.join(wire.IMAGE_PATHS)})([?].*)?"


def envoy_grpc_size_replies() -> list[str]:
    """Native gRPC callers (what the other gRPC mappers call so: content-type application/grpc...,
    not transcoded): trailers-only INVALID_ARGUMENT (Envoy's default for a 413 is UNKNOWN) naming
    the cap of the route hit. The image cap holds on the service's gRPC route (what its `grpc: {}`
    match takes) and on the image routes' paths (whatever the content-type); else 1 MiB."""
    image_routes = [
        "- or_filter:",
        "    filters:",
        "    - and_filter:",
        "        filters:",
        "        - header_filter:",
        f'            header: {{name: content-type, string_match: {{safe_regex: {{regex: "{GRPC_CONTENT_TYPE}"}}}}}}',
        "        - header_filter:",
        f'            header: {{name: ":path", string_match: {{prefix: {GRPC_ROUTE_PREFIX}}}}}',
        "    - header_filter:",
        f'        header: {{name: ":path", string_match: {{safe_regex: {{regex: "{image_paths_regex()}"}}}}}}',
    ]
    lines = []
    for runtime_key, route_filter, limit in (
        ("grpc413image", image_routes, wire.MAX_IMAGE_REQUEST_BYTES), ("grpc413", [], wire.MAX_REQUEST_BYTES),
    ):
        lines += [
            "- filter:",
            "    and_filter:",
            "      filters:",
            "      - header_filter:",
            "          header: {name: content-type, string_match: {prefix: application/grpc}}",
            "      - header_filter:",
            "          header: {name: x-envoy-original-path, present_match: false}",
            f"      - status_code_filter: {{comparison: {{op: EQ, value: {{default_value: 413, runtime_key: edge.lr.{runtime_key}}}}}}}",
            *("      " + line for line in route_filter),
            "  headers_to_add:",
            '  - header: {key: grpc-status, value: "3"}',
            "    append_action: OVERWRITE_IF_EXISTS_OR_ADD",
            "  body_format_override:",
            f'    text_format_source: {{inline_string: "request message too large: the limit is {size_limit(limit)}"}}',
        ]
    return lines


def envoy_size_replies() -> list[str]:
    """REST callers: the shared error shape, naming the cap of the route the REST path hit."""
    lines = []
    for runtime_key, path_filter, limit in (
        ("413image", [
            "- header_filter:",
            f'    header: {{name: ":path", string_match: {{safe_regex: {{regex: "{image_paths_regex()}"}}}}}}',
        ], wire.MAX_IMAGE_REQUEST_BYTES),
        ("413", [], wire.MAX_REQUEST_BYTES),
    ):
        status = f"status_code_filter: {{comparison: {{op: EQ, value: {{default_value: 413, runtime_key: edge.lr.{runtime_key}}}}}}}"
        lines += [
            *(["- filter:", "    and_filter:", "      filters:", f"      - {status}", *("      " + line for line in path_filter)]
              if path_filter else [f"- filter: {{{status}}}"]),
            "  body_format_override:",
            "    content_type: application/json",
            "    json_format:",
            "      error:",
            "        code: 413",
            "        status: INVALID_ARGUMENT",
            f'        message: "request body too large: the limit is {size_limit(limit)}"',
            '        requestId: "%REQ(X-REQUEST-ID)%"',
        ]
    return lines


# Replies Envoy makes when the upstream fails it, by response flag: (flags, comment, HTTP code
# or None for Envoy's own, status name, message). Rendered for the documented API's paths and,
# in their own shapes, for the adapters'.
FAULT_REPLIES = (
    (("UH",), None, 503, "UNAVAILABLE", "no healthy image service replica is available; retry later"),
    (("UO", "OM"), None, 503, "UNAVAILABLE", "the API edge is overloaded; retry later"),
    (("UF", "URX"), "Connection could not be made (retried on other replicas first): nothing ran.", None, "UNAVAILABLE",
     "the image service could not be reached; retry later"),
    (("UC", "UR", "LR"), "The connection broke after the request was sent: it may have run (not retried).", None,
     "UNAVAILABLE", "the connection to the image service was lost before it answered; the request may have been "
     "processed, retry with the same Idempotency-Key"),
    (("UT", "SI"), None, 504, "DEADLINE_EXCEEDED", "the image service did not answer within the edge's request timeout"),
)


def envoy_fault_replies() -> list[str]:
    lines = []
    for flags, comment, code, status, message in FAULT_REPLIES:
        if comment:
            lines.append(f"# {comment}")
        lines += [
            f"- filter: {{response_flag_filter: {{flags: [{', '.join(flags)}]}}}}",
            "  body_format_override:",
            "    content_type: application/json",
            "    json_format:",
            "      error:",
            f"        code: {code if code is not None else chr(34) + '%RESPONSE_CODE%' + chr(34)}",
            f"        status: {status}",
            f'        message: "{message}"',
            '        requestId: "%REQ(X-REQUEST-ID)%"',
        ]
    return lines


# --- the adapters (t2i.compat) -------------------------------------------------------------------

def _yaml_lines(value: dict, indent: str) -> list[str]:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=False, sort_keys=False, width=10_000, allow_unicode=False)
    return [indent + line for line in text.rstrip("\n").split("\n")]


def _path_regex(paths) -> str:
    for path in paths:
        if not re.fullmatch(r"[a-z0-9/-]+", path):
            raise ValueError(f"{path!r}: only lower-case letters, digits, / and - are rendered into the regex")
    return f"({'|'.join(paths)})([?].*)?"


def envoy_compat_replies() -> list[str]:
    """Every local reply on an adapter's paths, in its API's error shape (first match wins, so
    these come before the documented API's mappers)."""
    from t2i.compat import ADAPTERS

    lines = []
    for adapter in ADAPTERS:
        prefix = f"- header_filter: {{header: {{name: \":path\", string_match: {{prefix: {adapter.prefix}}}}}}}"
        large = adapter.large_body_paths(wire.MAX_REQUEST_BYTES)

        def mapper(filters: list[str], message: str) -> list[str]:
            where = (["    and_filter:", "      filters:", *("      " + f for f in filters)] if len(filters) > 1
                     else ["    " + filters[0].removeprefix("- ")])
            return ["- filter:", *where, "  body_format_override:", "    content_type: application/json",
                    "    json_format:", *_yaml_lines(adapter.edge_error(message), "      ")]

        status_413 = "- status_code_filter: {comparison: {op: EQ, value: {default_value: 413, runtime_key: edge.lr.%s}}}"
        if large:
            limit = max(r.body_limit for r in adapter.routes if r.path in large)
            lines += mapper([status_413 % f"{adapter.name}413large",
                             f'- header_filter: {{header: {{name: ":path", string_match: {{safe_regex: {{regex: '
                             f'"{_path_regex(large)}"}}}}}}}}'],
                            f"request body too large: the limit is {size_limit(limit)}")
        lines += mapper([status_413 % f"{adapter.name}413", prefix],
                        f"request body too large: the limit is {size_limit(wire.MAX_REQUEST_BYTES)}")
        for flags, _, _, _, message in FAULT_REPLIES:
            lines += mapper([f"- response_flag_filter: {{flags: [{', '.join(flags)}]}}", prefix], message)
        lines += mapper([prefix], "%LOCAL_REPLY_BODY%")
    return lines


def envoy_compat_routes() -> list[str]:
    """Per adapter: its routes with a larger body cap (exact paths), then its prefix."""
    from t2i.compat import ADAPTERS

    retry = [
        "  retry_policy:",
        "    retry_on: connect-failure,reset-before-request",
        "    num_retries: 2",
        "    retry_host_predicate:",
        "    - name: envoy.retry_host_predicates.previous_hosts",
        "      typed_config:",
        '        "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate',
        "    host_selection_retry_max_attempts: 3",
        "    retry_back_off: {base_interval: 0.1s, max_interval: 1s}",
    ]
    lines = []
    for adapter in ADAPTERS:
        for path in adapter.large_body_paths(wire.MAX_REQUEST_BYTES):
            (limit,) = {r.body_limit for r in adapter.routes if r.path == path}
            lines += [
                f"- match: {{path: {path}}}",
                "  typed_per_filter_config:",
                "    envoy.filters.http.buffer:",
                '      "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute',
                f"      buffer: {{max_request_bytes: {limit}}}",
                "  route:",
                "    cluster: t2i_compat",
                f"    timeout: {wire.ROUTE_TIMEOUT:g}s",
                "    idle_timeout: 3600s",
                *("  " + line for line in retry),
            ]
        lines += [
            f"- match: {{prefix: {adapter.prefix}}}",
            "  route:",
            "    cluster: t2i_compat",
            f"    timeout: {wire.ROUTE_TIMEOUT:g}s",
            "    idle_timeout: 3600s",
            *("  " + line for line in retry),
        ]
    return lines


def lua_compat_apis() -> list[str]:
    from t2i.compat import ADAPTERS

    entries = ", ".join(f'{{"{a.prefix}", "{a.name}"}}' for a in ADAPTERS)
    return ["-- Path prefix -> the adapter API that serves it (its responses keep their own shapes).",
            f"local COMPAT = {{{entries}}}"]


def readme_openai_params() -> list[str]:
    from t2i.compat.openai_images import EDITS, GENERATIONS, PARAMS

    short = {GENERATIONS: "generations", EDITS: "edits"}
    rows = ["| parameter | on | becomes | default | what happens |", "| --- | --- | --- | --- | --- |"]
    for param in PARAMS:
        name = f"`{param.name}`" + ("" if param.openai else " (ours)")
        on = ", ".join(short[r] for r in param.routes)
        rows.append(f"| {name} | {on} | {param.ours} | {param.default} | {param.effect} |")
    return rows


def readme_openai_errors() -> list[str]:
    from t2i.compat.openai_images import ERRORS

    rows = ["| service status | HTTP | `type` | `code` | SDK exception | when |", "| --- | --- | --- | --- | --- | --- |"]
    exceptions = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 409: "ConflictError",
                  429: "RateLimitError", 500: "InternalServerError", 503: "InternalServerError", 504: "InternalServerError"}
    for row in ERRORS:
        rows.append(f"| {row.status} | {row.http} | `{row.type}` | `{row.code}` | {exceptions[row.http]} | {row.why} |")
    return rows


def readme_a1111_fields() -> list[str]:
    from t2i.compat.a1111_api import FIELDS, IMG2IMG, TXT2IMG

    short = {TXT2IMG: "txt2img", IMG2IMG: "img2img"}
    rows = ["| field | on | becomes | A1111's default | what happens |", "| --- | --- | --- | --- | --- |"]
    for spec in FIELDS:
        on = ", ".join(short[r] for r in spec.routes)
        rows.append(f"| `{spec.name}` | {on} | {spec.ours} | {spec.default} | {spec.effect} |")
    return rows


def readme_a1111_labels() -> list[str]:
    from t2i.compat.a1111_api import AUTOMATIC, SAMPLERS, SCHEDULERS, UPSCALERS

    def names(table: dict[str, str], ours: str) -> str:
        return ", ".join(f"`{label}`" for label, name in table.items() if name == ours)

    from t2i.engine.recipe import A1111_LATENT_UPSCALERS, A1111_SAMPLERS, A1111_SCHEDULES

    rows = ["| kind | ours | A1111 names accepted (any case) |", "| --- | --- | --- |"]
    rows += [f"| sampler | `{name}` | {names(SAMPLERS, name)} |" for name in A1111_SAMPLERS]
    rows += [f"| scheduler | `{name}` | {names(SCHEDULERS, name)} |" for name in A1111_SCHEDULES]
    automatic = ", ".join(f"`{s}`: `{d}`" for s, d in AUTOMATIC.items())
    rows.append(f"| scheduler | the sampler's own | `automatic`, empty ({automatic}; the others: `normal`) |")
    rows += [f"| hr_upscaler | `{name}` | {names(UPSCALERS, name)} |" for name in A1111_LATENT_UPSCALERS]
    return rows


def readme_a1111_errors() -> list[str]:
    from t2i.compat.a1111_api import ERRORS

    rows = ["| service status | HTTP | when |", "| --- | --- | --- |"]
    rows += [f"| {row.status} | {row.http} | {row.why} |" for row in ERRORS]
    return rows


def readme_errors() -> list[str]:
    rows = sorted(ERROR_KINDS, key=lambda k: k.http)
    return ["| HTTP | `status` | when |", "| --- | --- | --- |", *(f"| {k.http} | {k.status} | {k.when} |" for k in rows)]


def edge_readme_errors() -> list[str]:
    by_http: dict[int, list[str]] = {}
    for kind in ERROR_KINDS:
        if kind.from_service and kind.status not in by_http.get(kind.http, []):
            by_http.setdefault(kind.http, []).append(kind.status)
    sent = {name for names in by_http.values() for name in names}
    others = ", ".join(name for name in grpc_numbers() if name not in sent and name != "OK")
    rows = [f"| {', '.join(names)} | {http}{' + `Retry-After`' if http == 429 else ''} |" for http, names in sorted(by_http.items())]
    return ["| gRPC | HTTP |", "| --- | --- |", *rows, f"| anything else ({others}) | 500 (status keeps the real name) |"]


# --- settings -------------------------------------------------------------------------------

def readme_serve_flags() -> list[str]:
    rows = [
        f"| `{o.flags}` | {f'`{o.env}`' if o.env else '-'} | {o.doc_default} | {o.help} |"
        for o in options_of(ServeSettings)
    ]
    return ["| flag | env | default | meaning |", "| --- | --- | --- | --- |", *rows]


# --- prices -----------------------------------------------------------------------------------

def readme_price_table() -> list[str]:
    from t2i.billing.pricing import price
    from t2i.billing.settings import BillingSettings
    from t2i.domain import GenerateRequest, HiresFix
    from t2i.passes import plan
    from t2i.sampling import SigmaTable

    settings, table = BillingSettings(), SigmaTable.sdxl()
    picture = b"(a picture)"  # pricing reads only that there is one
    rows = ["| kind | size | steps | sampler | prompt chunks | images | stardust |",
            "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for kind, side, steps, sampler, chunks, images, extra in (
        ("text-to-image", 768, 28, "euler", 2, 1, {}), ("text-to-image", 768, 28, "dpm_2", 2, 1, {}),
        ("text-to-image", 1024, 28, "euler", 1, 1, {}), ("text-to-image", 1024, 28, "euler", 8, 1, {}),
        ("text-to-image", 1024, 28, "euler", 1, 4, {}), ("text-to-image", 1536, 28, "euler_ancestral", 2, 1, {}),
        ("text-to-image", 2048, 30, "euler", 1, 1, {}), ("text-to-image", 2880, 28, "euler", 2, 1, {}),
        ("image to image, denoise 1", 1024, 28, "euler", 1, 1, {"init_image": picture}),
        ("image to image, denoise 0.5", 1024, 28, "euler", 1, 1, {"init_image": picture, "denoise": 0.5}),
        ("inpainting, denoise 0.75", 1024, 28, "euler", 1, 1, {"init_image": picture, "mask": picture, "denoise": 0.75}),
        ("hires fix 1.5x, denoise 0.5", 1024, 28, "euler", 1, 1, {"hires_fix": HiresFix(scale=1.5)}),
        ("hires fix 2x, 14 steps, denoise 0.4", 832, 28, "euler", 1, 1,
         {"hires_fix": HiresFix(scale=2.0, steps=14, denoise=0.4)}),
    ):
        request = GenerateRequest(prompt="x", width=side, height=side, steps=steps, sampler=sampler, num_images=images, **extra)
        sizes = " then ".join(f"{p.width}x{p.height}" for p in plan(request).passes)
        step_counts = " + ".join(str(p.steps) for p in plan(request).passes)
        rows.append(f"| {kind} | {sizes} | {step_counts} | {sampler} | {chunks} | {images} | "
                    f"{price(request, 1.0, table, settings, chunks)} |")
    return rows


# --- the playground ---------------------------------------------------------------------------

def playground_names() -> list[str]:
    import json

    from t2i import validation
    from t2i.domain import RESIZE_MODES, UPSCALE_METHODS
    from t2i.sampling.names import SAMPLER_NAMES, SCHEDULER_NAMES

    limits = dict(promptChars=validation.MAX_PROMPT_CHARS, images=validation.MAX_IMAGES,
                  cfgScale=validation.MAX_CFG_SCALE, sizeMultiple=validation.SIZE_MULTIPLE)
    return [
        f"const SAMPLERS = {json.dumps(list(SAMPLER_NAMES))};",
        f"const SCHEDULERS = {json.dumps(list(SCHEDULER_NAMES))};",
        f"const KEY_HEADER = {json.dumps(wire.API_KEY_HEADER)};",
        f"const LIMITS = {json.dumps(limits)};",
        f"const RESIZE_MODES = {json.dumps(list(RESIZE_MODES))};",
        f"const UPSCALE_METHODS = {json.dumps(list(UPSCALE_METHODS))};",
    ]


# --- the files ------------------------------------------------------------------------------

BLOCKS: dict[str, dict[str, Callable[[], list[str]]]] = {
    "edge/envoy.yaml": {"lua-error-tables": envoy_lua_tables, "local-reply-statuses": envoy_local_replies,
                        "unread-request-reply": envoy_unread_reply, "grpc-request-size-replies": envoy_grpc_size_replies,
                        "request-size-replies": envoy_size_replies, "fault-replies": envoy_fault_replies,
                        "compat-replies": envoy_compat_replies, "compat-routes": envoy_compat_routes,
                        "lua-compat-apis": lua_compat_apis},
    "README.md": {"error-table": readme_errors, "serve-flags": readme_serve_flags, "price-table": readme_price_table,
                  "openai-params": readme_openai_params, "openai-errors": readme_openai_errors,
                  "a1111-fields": readme_a1111_fields, "a1111-labels": readme_a1111_labels,
                  "a1111-errors": readme_a1111_errors},
    "edge/README.md": {"grpc-http-table": edge_readme_errors},
    "edge/playground/playground.js": {"playground-names": playground_names},
}


def render_text(text: str, blocks: dict[str, Callable[[], list[str]]], path: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    seen = set()
    while i < len(lines):
        line = lines[i]
        out.append(line)
        match = re.search(r"BEGIN GENERATED: ([\w-]+)", line)
        if match:
            name = match.group(1)
            if name not in blocks:
                raise SystemExit(f"{path}: unknown generated block {name!r}")
            end = next((j for j in range(i + 1, len(lines)) if f"END GENERATED: {name}" in lines[j]), None)
            if end is None:
                raise SystemExit(f"{path}: block {name!r} has no END GENERATED line")
            indent = line[: len(line) - len(line.lstrip())]
            out += [indent + rendered if rendered else "" for rendered in blocks[name]()]
            out.append(lines[end])
            seen.add(name)
            i = end
        i += 1
    missing = set(blocks) - seen
    if missing:
        raise SystemExit(f"{path}: generated block(s) {', '.join(sorted(missing))} not found")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for relative, blocks in BLOCKS.items():
        path = ROOT / relative
        current = path.read_text()
        rendered = render_text(current, blocks, relative)
        if rendered != current:
            stale.append(relative)
            if not check:
                path.write_text(rendered)
    if check and stale:
        print(f"render: stale generated blocks in {', '.join(stale)}; run 'make render'", file=sys.stderr)
        return 1
    print("render: generated blocks " + ("fresh" if check else "written"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
