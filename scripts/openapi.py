"""Generate the OpenAPI 3.1 description of the REST API from the protobuf contract.

    python scripts/openapi.py DESCRIPTOR_SET OUT.json

DESCRIPTOR_SET is protoc's output with --include_imports --include_source_info (see
scripts/proto.sh openapi). Paths and verbs come from the google.api.http annotations (each
additional binding is a path of its own), schemas from the messages with their proto3 JSON
names, descriptions from the proto comments. What the proto cannot say is stated here once, as
the edge implements it: POST answers 201, errors have one JSON shape, int64 values are strings
in responses, the API key header, and each path's request body cap (t2i.wire).

The adapters' paths (the OpenAI Images API under /v1/) come from their mapping table
(t2i.compat.openai_images.PARAMS and ERRORS) and their routes (t2i.compat.ADAPTERS).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from t2i import wire
from t2i.errors import ERROR_KINDS

PACKAGE_FILE = "illustrious/texttoimage/v1/text_to_image.proto"
F = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
INT64 = (F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64)


def error_responses() -> dict[str, str]:
    """HTTP status -> description, from the one error table (t2i.errors.ERROR_KINDS)."""
    described: dict[str, list[str]] = {}
    for kind in sorted(ERROR_KINDS, key=lambda k: k.http):
        described.setdefault(str(kind.http), []).append(f"{kind.status}: {kind.when}")
    return {code: "; ".join(texts) for code, texts in described.items()}


def comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple, str]:
    """Leading comments by location path, without buf's lint directives."""
    def text(comment: str) -> str:
        lines = [line.strip() for line in comment.strip().splitlines()]
        return " ".join(line for line in lines if not line.startswith("buf:lint:"))

    return {
        tuple(location.path): text(location.leading_comments)
        for location in file.source_code_info.location
        if location.leading_comments
    }


def field_schema(field: F, request: bool, package: str) -> dict:
    if field.type == F.TYPE_MESSAGE:
        schema = {"$ref": "#/components/schemas/" + field.type_name.removeprefix(f".{package}.")}
    elif field.type in INT64:
        # proto3 JSON: int64 is printed as a string; a number or a string is accepted.
        schema = {"type": ["integer", "string"], "format": "int64"} if request else {"type": "string", "format": "int64"}
    else:
        schema = dict(SCALARS[field.type])
    if field.label == F.LABEL_REPEATED:
        schema = {"type": "array", "items": schema}
    return schema


def generate(files: descriptor_pb2.FileDescriptorSet) -> dict:
    (file,) = [f for f in files.file if f.name == PACKAGE_FILE]
    notes = comments(file)
    package = file.package
    request_messages = {m.input_type.removeprefix(f".{package}.") for s in file.service for m in s.method}
    schemas: dict[str, dict] = {}
    for index, message in enumerate(file.message_type):
        request = message.name in request_messages
        properties = {}
        for field_index, field in enumerate(message.field):
            schema = field_schema(field, request, package)
            description = notes.get((4, index, 2, field_index))
            if description:
                schema["description"] = description
            properties[field.json_name] = schema
        schemas[message.name] = {"type": "object", "properties": properties}
        if notes.get((4, index)):
            schemas[message.name]["description"] = notes[(4, index)]
    schemas["Error"] = {
        "type": "object",
        "description": "The one error shape, whoever produced the error (the service or the edge).",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["code", "status", "message", "requestId"],
            "properties": {
                "code": {"type": "integer", "description": "The HTTP status."},
                "status": {"type": "string", "description": "The gRPC status name, e.g. INVALID_ARGUMENT."},
                "message": {"type": "string", "description": "What went wrong, for people."},
                "requestId": {"type": ["string", "null"], "description": "Equals the x-request-id response header."},
            },
        }},
    }

    paths: dict[str, dict] = {}
    for service_index, service in enumerate(file.service):
        for method_index, method in enumerate(service.method):
            primary = method.options.Extensions[annotations_pb2.http]
            if primary.WhichOneof("pattern") is None:
                if method.name != "WatchJob":
                    continue  # gRPC only
                # Served as real server-sent events (with ids) by the adapters' port, not the
                # transcoder: no annotation, so the transcoder leaves the path alone.
                primary = http_pb2.HttpRule(get=wire.JOB_EVENTS_PATH)
            for rule in (primary, *primary.additional_bindings):
                verb = rule.WhichOneof("pattern")
                path = getattr(rule, verb)
                operation = operation_of(method, rule, notes.get((6, service_index, 2, method_index), ""), package)
                if rule is not primary:
                    # operationIds are unique: the method's name stays with its first path.
                    operation["operationId"] = method.name + "_" + "".join(
                        part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", path) if part)
                paths.setdefault(path, {})[verb] = operation

    for describe in (openai_description, a1111_description):
        compat_schemas, compat_paths = describe()
        schemas.update(compat_schemas)
        paths.update(compat_paths)

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Illustrious Text-to-Image API",
            "version": package.rsplit(".", 1)[-1],
            "description": "Generated from proto/" + PACKAGE_FILE + " by scripts/openapi.py; do not edit. "
                           "Request fields also accept their proto names (e.g. negative_prompt).",
        },
        "servers": [{"url": "http://localhost:8080", "description": "`make run`"}],
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": wire.API_KEY_HEADER},
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "The same API key as `Authorization: Bearer <key>` (what OpenAI's clients send)."},
                "basic": {"type": "http", "scheme": "basic",
                          "description": "The API key as the password, any user name (what A1111 clients send); on "
                                         "/sdapi/v1/ only."},
            },
            "schemas": schemas,
        },
        "paths": paths,
    }


def body_cap(path: str) -> str:
    """The edge's request body cap on a path (edge/envoy.yaml; larger: 413)."""
    limit = wire.MAX_IMAGE_REQUEST_BYTES if path in wire.IMAGE_PATHS else wire.MAX_REQUEST_BYTES
    return f"At most {limit // 1024 // 1024} MiB ({limit} bytes) of JSON; a larger body is refused with 413."


def operation_of(method, rule, note: str, package: str) -> dict:
    """The OpenAPI operation of one HTTP binding (`rule`) of a method; `note` is its comment."""
    verb = rule.WhichOneof("pattern")
    path = getattr(rule, verb)
    # POST creates (201), except a stream: its 200 opens the event stream, and a job: 202, it
    # runs later (the edge's Lua filter sets these).
    accepted = method.name == "SubmitJob"
    success = "202" if accepted else "201" if verb == "post" and not method.server_streaming else "200"
    output = method.output_type.removeprefix(f".{package}.")
    media = "text/event-stream" if method.server_streaming else "application/json"
    schema = {"$ref": f"#/components/schemas/{output}"}
    if method.output_type == ".google.api.HttpBody":
        # The bytes themselves, with the content type of the image (image/png, image/jpeg, image/webp).
        media, schema = "image/*", {"type": "string", "contentMediaType": "application/octet-stream"}
    operation = {
        "operationId": method.name,
        "summary": note.split(". ")[0],
        "description": note,
        "security": [{"apiKey": []}, {"bearer": []}],
        "parameters": [
            {"name": wire.REQUEST_ID_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
             "description": "Kept if sent, generated otherwise; echoed in the response."},
        ],
        "responses": {
            success: {
                "description": ("Server-sent events, each with its `id:` line (resume with Last-Event-ID) and one JSON "
                                "event per `data:` line" if method.name == "WatchJob" else
                                "Server-sent events, one JSON event per `data:` line" if method.server_streaming else "Success"),
                "content": {media: {"schema": schema}},
            },
            **{
                code: {
                    "description": text,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    **({"headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}}
                       if code == "429" else {}),
                }
                for code, text in error_responses().items()
            },
        },
    }
    for name in re.findall(r"\{(\w+)\}", path):
        operation["parameters"].append({"name": name, "in": "path", "required": True,
                                        "schema": {"type": "integer" if name == "index" else "string"},
                                        "description": "The job's id." if name == "id" else "The image's index, from 0."})
    if method.name == "WatchJob":
        operation["parameters"].append(
            {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "integer", "minimum": 0},
             "description": "The id of the last event already received: the stream resumes after it."})
    if verb == "get" and method.name == "ListJobs":
        operation["parameters"] += [
            {"name": "status", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "Only jobs in this status."},
            {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "The nextCursor of the page before."},
            {"name": "pageSize", "in": "query", "required": False, "schema": {"type": "integer"},
             "description": "Jobs per page, 1 to 100 (default 20)."},
        ]
    if rule.body == "*":
        operation["parameters"].append(
            {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": wire.MAX_IDEMPOTENCY_KEY},
             "description": "Retries with the same key and body within 24 hours are not charged twice."}
        )
        operation["requestBody"] = {
            "required": True,
            "description": body_cap(path),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/" + method.input_type.removeprefix(f".{package}.")}}},
        }
    return operation


# --- the adapters -----------------------------------------------------------------------------

KIND_SCHEMAS = {
    "string": {"type": "string"}, "integer": {"type": "integer"}, "number": {"type": "number"},
    "boolean": {"type": "boolean"}, "object": {"type": "object"},
    "array": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "strength": {"type": "number"}, "strength_clip": {"type": "number"}}}},
    "file": {"type": "string", "contentMediaType": "application/octet-stream"},
}


def openai_description() -> tuple[dict, dict]:
    """Schemas and paths of the OpenAI Images API adapter (its one mapping table)."""
    from t2i.compat import openai_images as oa

    def request_schema(route: str, form: bool) -> dict:
        properties = {}
        for param in oa.params_of(route):
            schema = dict(KIND_SCHEMAS[param.kind])
            if form and param.kind in ("array", "object"):
                schema = {"type": "string", "contentMediaType": "application/json"}
            if param.choices:
                schema["enum"] = list(param.choices)
            origin = "" if param.openai else "Ours (the SDK's extra_body). "
            becomes = "" if param.ours == "-" else f" Becomes {param.ours}."
            schema["description"] = f"{origin}{param.effect}{becomes} Default: {param.default}."
            properties[param.name] = schema
        required = [param.name for param in oa.params_of(route) if param.required]
        return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}

    schemas = {
        "OpenAIImagesRequest": request_schema(oa.GENERATIONS, form=False),
        "OpenAIImageEditRequest": request_schema(oa.EDITS, form=True),
        "OpenAIImagesResponse": {
            "type": "object", "required": ["created", "data"],
            "properties": {
                "created": {"type": "integer", "description": "Unix time of the answer."},
                "data": {"type": "array", "items": {"type": "object", "required": ["b64_json", "revised_prompt"], "properties": {
                    "b64_json": {"type": "string", "contentEncoding": "base64"},
                    "revised_prompt": {"type": "string", "description": "The prompt, unchanged."}}}},
                "background": {"type": "string", "enum": ["opaque"]},
                "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
                "size": {"type": "string", "description": "WIDTHxHEIGHT of the images."},
            },
        },
        "OpenAIModel": {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
            "id": {"type": "string", "description": "The model's name (its numeric id when another model shares the name)."},
            "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": {"type": "string"}}},
        "OpenAIModelList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/OpenAIModel"}}}},
        "OpenAIError": {
            "type": "object", "required": ["error"], "description": "OpenAI's error shape, whoever made the error.",
            "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"], "description": "The parameter at fault, as sent."},
                "code": {"type": ["string", "null"]}}}},
        },
    }
    error_reply = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}}
    described: dict[str, list[str]] = {}
    for row in oa.ERRORS:
        described.setdefault(str(row.http), []).append(f"{row.status} ({row.code}): {row.why}")
    described.setdefault("400", []).append("the adapter's own refusals (unknown parameter, wrong type, bad size, ...)")
    described["413"] = ["request body over the route's cap"]
    errors = {code: {"description": "; ".join(texts), **error_reply,
                     **({"headers": {"Retry-After": {"schema": {"type": "integer"}}}} if code == "429" else {})}
              for code, texts in sorted(described.items())}
    request_id = {"name": wire.REQUEST_ID_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
                  "description": "Kept if sent, generated otherwise; echoed in the response."}
    idempotency = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "schema": {"type": "string", "maxLength": wire.MAX_IDEMPOTENCY_KEY},
                   "description": "Retries with the same key and body within 24 hours are not charged twice."}
    charged = {
        "description": "The images",
        "headers": {
            oa.USAGE_HEADER: {"schema": {"type": "integer"}, "description": "Stardust charged."},
            oa.BALANCE_HEADER: {"schema": {"type": "integer"}, "description": "Spendable balance after the charge."},
            oa.SEEDS_HEADER: {"schema": {"type": "string"}, "description": "The seeds, comma-separated."},
        },
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIImagesResponse"}}},
    }
    security = [{"bearer": []}, {"apiKey": []}]
    routes = {(route.method, route.path): route for route in oa.ADAPTER.routes}

    def operation(method: str, path: str, operation_id: str, **extra) -> dict:
        route = routes[(method, path)]
        return {"operationId": operation_id, "summary": route.summary, "tags": ["OpenAI-compatible"],
                "security": security, **extra}

    def body_description(path: str) -> str:
        limit = routes[("POST", path)].body_limit
        return f"At most {limit // 1024 // 1024} MiB ({limit} bytes); a larger body is refused with 413."

    paths = {
        oa.GENERATIONS: {"post": operation(
            "POST", oa.GENERATIONS, "OpenAICreateImage", parameters=[request_id, idempotency],
            requestBody={"required": True, "description": body_description(oa.GENERATIONS), "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/OpenAIImagesRequest"}}}},
            responses={"200": charged, **errors})},
        oa.EDITS: {"post": operation(
            "POST", oa.EDITS, "OpenAICreateImageEdit", parameters=[request_id, idempotency],
            requestBody={"required": True, "description": body_description(oa.EDITS), "content": {
                "multipart/form-data": {"schema": {"$ref": "#/components/schemas/OpenAIImageEditRequest"}}}},
            responses={"200": charged, **errors})},
        oa.MODELS: {"get": operation(
            "GET", oa.MODELS, "OpenAIListModels", parameters=[request_id],
            responses={"200": {"description": "The models", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/OpenAIModelList"}}}},
                **{code: reply for code, reply in errors.items() if code in ("401", "429", "503")}})},
        oa.MODELS + "/{model}": {"get": operation(
            "GET", oa.MODELS + "/{model}", "OpenAIRetrieveModel",
            parameters=[{"name": "model", "in": "path", "required": True, "schema": {"type": "string"},
                         "description": "A model's id from the list, or its numeric id."}, request_id],
            responses={"200": {"description": "The model", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/OpenAIModel"}}}},
                **{code: reply for code, reply in errors.items() if code in ("401", "404", "429", "503")}})},
    }
    return schemas, paths


A1111_KINDS = {
    "string": {"type": ["string", "null"]}, "integer": {"type": ["integer", "null"]},
    "number": {"type": ["number", "null"]}, "boolean": {"type": ["boolean", "null"]},
    "object": {"type": ["object", "null"]}, "array": {"type": ["array", "null"]},
}


def a1111_description() -> tuple[dict, dict]:
    """Schemas and paths of the A1111 /sdapi/v1 adapter (its one mapping table)."""
    from t2i.compat import a1111_api as a1

    def request_schema(route: str) -> dict:
        properties = {}
        for spec in a1.fields_of(route):
            becomes = "" if spec.ours == "-" else f" Becomes {spec.ours}."
            properties[spec.name] = {**A1111_KINDS[spec.kind], "description": f"{spec.effect}{becomes} A1111's default: {spec.default}."}
        required = ["init_images"] if route == a1.IMG2IMG else []
        return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}

    detail = {"type": "object", "required": ["detail"], "properties": {"detail": {
        "description": "A message; for 422 a list of {type, loc, msg, input} (FastAPI's validation errors).",
        "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "required": ["type", "loc", "msg"], "properties": {
            "type": {"type": "string"}, "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
            "msg": {"type": "string"}, "input": {}}}}]}}}
    schemas = {
        "A1111Txt2ImgRequest": request_schema(a1.TXT2IMG),
        "A1111Img2ImgRequest": request_schema(a1.IMG2IMG),
        "A1111ImagesResponse": {"type": "object", "required": ["images", "parameters", "info"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}},
            "parameters": {"type": "object", "description": "The request's fields as sent."},
            "info": {"type": "string", "description": "JSON text: seed, all_seeds, infotexts (each image's `parameters` "
                     "recipe), sampler_name, ... as A1111 writes it."}}},
        "A1111Error": {**detail, "description": "FastAPI's error shape, whoever made the error (500: A1111's "
                       "{error, detail, body, errors})."},
    }
    error_reply = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/A1111Error"}}}}
    described: dict[str, list[str]] = {}
    for row in a1.ERRORS:
        described.setdefault(str(row.http), []).append(f"{row.status}: {row.why}")
    described.setdefault("422", []).append("the adapter's own refusals (unknown field, wrong type, a feature not offered)")
    described.setdefault("404", []).append("unknown sampler")
    described["413"] = ["request body over the route's cap"]
    errors = {code: {"description": "; ".join(texts), **error_reply} for code, texts in sorted(described.items())}
    security = [{"basic": []}, {"bearer": []}, {"apiKey": []}]
    any_json = {"content": {"application/json": {"schema": {}}}}

    def operation(route, operation_id: str, **extra) -> dict:
        return {"operationId": operation_id, "summary": route.summary, "tags": ["A1111-compatible"],
                "security": security, **extra}

    paths: dict[str, dict] = {}
    for route in a1.ADAPTER.routes:
        name = "A1111" + "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", route.path.removeprefix(a1.PREFIX)))
        if route.path in a1.BOTH:
            schema = "A1111Txt2ImgRequest" if route.path == a1.TXT2IMG else "A1111Img2ImgRequest"
            limit = route.body_limit
            op = operation(route, name, requestBody={"required": True, "description": f"At most {limit // 1024 // 1024} MiB "
                           f"({limit} bytes); a larger body is refused with 413.", "content": {"application/json": {
                               "schema": {"$ref": f"#/components/schemas/{schema}"}}}},
                           responses={"200": {"description": "The images; the charge and balance in x-stardust-usage and "
                                              "x-stardust-balance", "content": {"application/json": {"schema": {
                                                  "$ref": "#/components/schemas/A1111ImagesResponse"}}}}, **errors})
        else:
            op = operation(route, name, responses={"200": {"description": route.summary, **any_json},
                                                   **{c: r for c, r in errors.items() if c in ("401", "429", "503")}})
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return schemas, paths


def main() -> None:
    descriptor, out = Path(sys.argv[1]), Path(sys.argv[2])
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes())
    out.write_text(json.dumps(generate(files), indent=2) + "\n")


if __name__ == "__main__":
    main()
