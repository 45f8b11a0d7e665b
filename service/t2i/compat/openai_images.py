"""The OpenAI Images API in terms of the one domain request: the mapping table and translations.

`PARAMS` is the one mapping table: every body field of POST /v1/images/generations and
/v1/images/edits (OpenAI's and ours, the latter under snake_case names, sent with the SDK's
`extra_body`), what it becomes in `t2i.domain.GenerateRequest`, its default, and what happens
to it. `ERRORS` maps the service's statuses to OpenAI's error status, type and code. Both are
rendered into the README (scripts/render.py) and the OpenAPI description (scripts/openapi.py).

Nothing here validates a value the service validates: a translated request goes through the
service's GenerateImage (its validation, billing and engine), and the field a refusal names
comes back as the parameter the caller sent (`param_of`). What the service never sees is
checked here: the body's shape and types, OpenAI's own choices (`quality`, `background`, ...),
the `size` syntax, and what this service cannot do (GIF, streaming). `response_format: url`
makes the call a job (t2i.compat.openai_http): the images are the job's stored results.
This module does no I/O; t2i.compat.openai_http serves it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import wire
from ..domain import GenerateRequest, HiresFix, LoraSpec, ModelInfo
from ..errors import ERROR_KINDS, retryable
from .adapter import Adapter, Route

PREFIX = "/v1/"
GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
MODELS = "/v1/models"
BOTH = (GENERATIONS, EDITS)

# The size `auto` (or no size) asks for on /generations: SDXL's native 1024x1024, brought
# within the model's min_size, max_size and max_pixels.
DEFAULT_SIDE = 1024
# /edits re-draws the picture this much unless `denoise` says otherwise (A1111's img2img default).
EDIT_DENOISE = 0.75
OWNED_BY = "illustrious"
# Response headers: the charge, the balance after it, and the seeds of the images.
USAGE_HEADER = "x-stardust-usage"
BALANCE_HEADER = "x-stardust-balance"
SEEDS_HEADER = "x-seeds"
# OpenAI's SDKs read this (non-standard) header before their own retry rules.
SHOULD_RETRY_HEADER = "x-should-retry"

SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")


class OpenAIError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = "invalid_value", headers: Mapping[str, str] | None = None,
                 retry: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = {SHOULD_RETRY_HEADER: "true" if retry else "false", **(headers or {})}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, value: object, allowed: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, f"invalid {param} {_shown(value)}: {allowed}", param=param, code=code)


# --- the service's statuses in OpenAI's terms ---------------------------------------------------

@dataclass(frozen=True)
class ErrorMapping:
    status: str  # the gRPC status name the service answers
    http: int  # what OpenAI's API answers for the same condition
    type: str
    code: str | None
    why: str  # for the README


# One row per status the service sends (t2i.errors.ERROR_KINDS, tests/edge checks); whether
# the SDK may retry (x-should-retry) is the error table's `retryable`. Anything else: 500.
ERRORS: tuple[ErrorMapping, ...] = (
    ErrorMapping("INVALID_ARGUMENT", 400, "invalid_request_error", "invalid_value",
                 "a field out of range; `param` is the parameter you sent (`size` for width or height)"),
    ErrorMapping("FAILED_PRECONDITION", 429, "insufficient_quota", "insufficient_quota",
                 "not enough stardust, as OpenAI answers an exhausted quota; `x-should-retry: false`, so the SDK "
                 "raises RateLimitError at once instead of retrying"),
    ErrorMapping("UNAUTHENTICATED", 401, "invalid_request_error", "invalid_api_key",
                 "missing or unknown key, or two different keys"),
    ErrorMapping("PERMISSION_DENIED", 401, "invalid_request_error", "invalid_api_key",
                 "revoked key: it is no longer a valid key, as OpenAI answers a deactivated one"),
    ErrorMapping("NOT_FOUND", 404, "invalid_request_error", "model_not_found", "unknown `model`"),
    ErrorMapping("ABORTED", 409, "invalid_request_error", "idempotency_key_in_use",
                 "the same `Idempotency-Key` is still being processed (the SDK retries 409)"),
    ErrorMapping("ALREADY_EXISTS", 409, "invalid_request_error", "conflict", "the request conflicts with an earlier one"),
    ErrorMapping("RESOURCE_EXHAUSTED", 429, "requests", "rate_limit_exceeded",
                 "rate limit, concurrency cap, queue full; `retry-after` (seconds) and `x-ratelimit-*` headers, which "
                 "the SDK's retries wait for"),
    ErrorMapping("INTERNAL", 500, "server_error", "server_error", "server fault (never charged)"),
    ErrorMapping("UNAVAILABLE", 503, "server_error", "service_unavailable",
                 "starting, shutting down, the ledger or the rate limiter unreachable"),
    ErrorMapping("DEADLINE_EXCEEDED", 504, "server_error", "timeout", "the generation outlasted its deadline; never charged"),
)
_ERRORS = {row.status: row for row in ERRORS}
assert {k.status for k in ERROR_KINDS if k.from_service} == set(_ERRORS), "every status the service sends needs a row"


def error_type_of(http: int) -> str:
    """OpenAI's error type for an HTTP status (replies the edge makes itself)."""
    if http == 429:
        return "requests"
    return "server_error" if http >= 500 else "invalid_request_error"


def service_error(status: str, message: str, trailers: Mapping[str, str], route: str) -> OpenAIError:
    """The service's refusal (gRPC status name, message, trailing metadata) as OpenAI answers."""
    row = _ERRORS.get(status)
    if row is None or (status == "RESOURCE_EXHAUSTED" and "message larger than max" in message):
        return OpenAIError(500, message or status, type="server_error", code="server_error", retry=False)
    headers = {}
    if row.http == 429 and status == "RESOURCE_EXHAUSTED":
        headers[wire.RETRY_AFTER_HEADER] = trailers.get(wire.RETRY_AFTER_HEADER, "1")
        headers.update({name: trailers[name] for name in wire.RATE_LIMIT_HEADERS if name in trailers})
    param = None
    if status == "INVALID_ARGUMENT" and trailers.get(wire.ERROR_FIELD_HEADER):
        sent = trailers[wire.ERROR_FIELD_HEADER]
        param = param_of(sent, route)
        message = _reworded(message, sent, param)
    elif status == "NOT_FOUND":
        param = "model"
    return OpenAIError(row.http, message, type=row.type, param=param, code=row.code, headers=headers,
                       retry=retryable(status))


# --- the mapping table -------------------------------------------------------------------------

@dataclass
class Context:
    """What a translation reads and fills: the route, the models, the domain fields so far."""

    route: str
    models: list[ModelInfo]
    fields: dict[str, Any] = field(default_factory=dict)
    links: bool = False  # response_format url: answer with the stored images' URLs


@dataclass(frozen=True)
class Param:
    """One body field: what it is on the wire, where it is taken, and what it becomes."""

    name: str
    kind: str  # JSON type: string, integer, number, boolean, array, object; file (multipart)
    routes: tuple[str, ...]
    ours: str  # what it becomes, for the README (`-`: nothing, it is answered here)
    default: str
    effect: str
    apply: Callable[[Any, Context], None]
    openai: bool = True  # False: our own parameter (snake_case, the SDK's extra_body)
    choices: tuple[str, ...] = ()  # the values accepted (checked here: the service never sees them)
    required: bool = False


def _set(domain: str) -> Callable[[Any, Context], None]:
    """The value, as it is, becomes the domain request's field `domain`."""
    def apply(value: Any, context: Context) -> None:
        context.fields[domain] = value
    return apply


def _ignored(value: Any, context: Context) -> None:
    return None


def _size(value: str, context: Context) -> None:
    if value == "auto":
        return
    match = SIZE.fullmatch(value)
    if match is None:
        raise invalid("size", value, "must be `auto` or WIDTHxHEIGHT in pixels, e.g. 1024x1024 (multiples of 8 within "
                      "the model's limits: GET /v1/models/{model})")
    context.fields["width"], context.fields["height"] = int(match[1]), int(match[2])


def _response_format(value: str, context: Context) -> None:
    context.links = value == "url"


def _background(value: str, context: Context) -> None:
    if value == "transparent":
        raise invalid("background", value, "the images have no alpha channel: use auto or opaque")


def _stream(value: bool, context: Context) -> None:
    if value:
        raise invalid("stream", value, "streaming is not offered here: leave it out or false (progress events are on "
                      "POST /text-to-image/generate/stream)")


def _partial_images(value: int, context: Context) -> None:
    if value:
        raise invalid("partial_images", value, "needs streaming, which is not offered here: leave it out or 0")


def _refused(name: str, why: str) -> Callable[[Any, Context], None]:
    """A parameter for something this service does not do: 400 whenever it is given."""
    def apply(value: Any, context: Context) -> None:
        raise invalid(name, value, why)
    return apply


GIF_ONLY = "only for GIF output, which this service does not produce: leave it out"


def _loras(value: list, context: Context) -> None:
    loras = []
    for index, item in enumerate(value):
        where = f"loras[{index}]"
        if not isinstance(item, dict):
            raise invalid(where, item, 'must be an object: {"name": ..., "strength": ..., "strength_clip": ...}', "invalid_type")
        unknown = sorted(set(item) - {"name", "strength", "strength_clip"})
        if unknown:
            raise invalid(f"{where}.{unknown[0]}", item[unknown[0]], "a LoRA takes name, strength and strength_clip",
                          "unknown_parameter")
        if not isinstance(item.get("name"), str):
            raise invalid(f"{where}.name", item.get("name"), "must be a string: the LoRA's name (GET /lora/list)",
                          "invalid_type")
        for key in ("strength", "strength_clip"):
            if item.get(key) is not None and not _is_number(item[key]):
                raise invalid(f"{where}.{key}", item[key], "must be a number", "invalid_type")
        strength = item.get("strength")
        loras.append(LoraSpec(item["name"], 1.0 if strength is None else float(strength),
                              None if item.get("strength_clip") is None else float(item["strength_clip"])))
    context.fields["loras"] = tuple(loras)


HIRES_KEYS = {"scale": "number", "denoise": "number", "steps": "integer", "upscale_method": "string"}


def _hires_fix(value: dict, context: Context) -> None:
    for key, item in value.items():
        kind = HIRES_KEYS.get(key)
        if kind is None:
            raise invalid(f"hires_fix.{key}", item, "hires_fix takes " + ", ".join(HIRES_KEYS), "unknown_parameter")
        if item is not None and not _of_kind(item, kind):
            raise invalid(f"hires_fix.{key}", item, f"must be {_a(kind)}", "invalid_type")
    given = {key: item for key, item in value.items() if item is not None}
    context.fields["hires_fix"] = HiresFix(**given)


def _p(name: str, kind: str, routes: tuple[str, ...], ours: str, default: str, effect: str,
       apply: Callable[[Any, Context], None] | None = None, **extra) -> Param:
    return Param(name, kind, routes, ours, default, effect, apply or _set(name), **extra)


QUALITIES = ("low", "medium", "high", "xhigh", "max", "auto", "standard", "hd")

# The one mapping table. Order: OpenAI's parameters, then ours.
PARAMS: tuple[Param, ...] = (
    _p("prompt", "string", BOTH, "`prompt`", "required", "The prompt, in ComfyUI's syntax (docs/prompts.md); it comes "
       "back unchanged as `revised_prompt`.", required=True),
    _p("model", "string", BOTH, "`modelId`", "the first model (lowest id)",
       "A model's `id` from GET /v1/models (its name), or its numeric id (`\"1\"`); unknown: 404 `model_not_found`.",
       _ignored),  # resolved by translate(): it decides the size defaults
    _p("n", "integer", BOTH, "`numImages`", "1", "How many images, 1 to 8 (one noise draw covers the batch; each image "
       "is priced like one request).", _set("num_images")),
    _p("size", "string", BOTH, "`width`, `height`", "`auto`",
       f"`WIDTHxHEIGHT`, exactly (e.g. `1024x1024`), within the model's limits. `auto` on /generations: "
       f"{DEFAULT_SIDE}x{DEFAULT_SIDE} brought within the model's `min_size`, `max_size` and `max_pixels`; on /edits: "
       "the picture's own size, each side cropped to a multiple of 8 (another size resizes the picture by "
       "`resize_mode`).", _size),
    _p("response_format", "string", BOTH, "-", "`b64_json`", "`b64_json` (the default here, as for GPT image models); "
       "`url`: the call runs as a job (README, \"Jobs\") and each `url` is where its stored image is, "
       "`GET` with the same key (`Authorization: Bearer`) until the results expire (24 h by default); needs "
       "billing (its database).", _response_format, choices=("b64_json", "url")),
    _p("output_format", "string", BOTH, "`outputFormat`", "`png`", "`png`, `jpeg` or `webp` (`gif` and `svg`: 400); "
       "the recipe goes in the PNG text chunks or the EXIF UserComment.", _set("output_format")),
    _p("output_compression", "integer", BOTH, "`quality`", "90 (ours; OpenAI's is 100)",
       "JPEG/WebP quality, 1 to 100 (ignored for PNG).", _set("quality")),
    _p("quality", "string", BOTH, "-", "`auto`", "Accepted and ignored: the work is set by `steps` (and the price with "
       "it).", _ignored, choices=QUALITIES),
    _p("style", "string", (GENERATIONS,), "-", "-", "Accepted and ignored (`vivid`, `natural`): the prompt decides the "
       "style.", _ignored, choices=("vivid", "natural")),
    _p("background", "string", BOTH, "-", "`auto`", "`auto` or `opaque` (the images are always opaque); `transparent`: "
       "400.", _background, choices=("auto", "opaque", "transparent")),
    _p("moderation", "string", (GENERATIONS,), "-", "`auto`", "Accepted and ignored (`low`, `auto`): no moderation "
       "layer here.", _ignored, choices=("low", "auto")),
    _p("user", "string", BOTH, "-", "-", "Accepted and ignored: neither stored nor logged (the key identifies the "
       "caller).", _ignored),
    _p("safety_identifier", "string", BOTH, "-", "-", "Accepted and ignored, like `user`.", _ignored),
    _p("complexity", "string", BOTH, "-", "-", "Accepted and ignored (`low`, `medium`, `high`): `steps` set the work.",
       _ignored, choices=("low", "medium", "high")),
    _p("input_fidelity", "string", (EDITS,), "-", "-", "Accepted and ignored (`high`, `low`): `denoise` says how much of "
       "the picture is kept.", _ignored, choices=("high", "low")),
    _p("stream", "boolean", BOTH, "-", "false", "Only false: 400 for true (progress events: POST "
       "/text-to-image/generate/stream).", _stream),
    _p("partial_images", "integer", BOTH, "-", "0", "Only 0 (it needs streaming).", _partial_images),
    _p("frame_count", "integer", BOTH, "-", "-", "GIF only: 400 when given.", _refused("frame_count", GIF_ONLY)),
    _p("frame_duration_ms", "integer", BOTH, "-", "-", "GIF only: 400 when given.",
       _refused("frame_duration_ms", GIF_ONLY)),
    _p("svg", "object", BOTH, "-", "-", "SVG only: 400 when given.",
       _refused("svg", "SVG output is not produced here: leave it out")),
    _p("image", "file", (EDITS,), "`initImage`", "required", "The picture to start from: one PNG, JPEG or WebP file "
       "(several: 400).", _set("init_image"), required=True),
    _p("mask", "file", (EDITS,), "`mask`", "none (the whole picture)", "Inpainting, the picture's size. OpenAI's kind: "
       "an alpha channel whose transparent pixels are re-drawn (turned into ours: white re-draws, black keeps); a mask "
       "without alpha is read as ours.", _set("mask")),  # made ours by translate() once the model is known
    _p("markup", "file", (EDITS,), "-", "-", "Not supported: 400 when given.",
       _refused("markup", "markup images are not supported here: leave it out")),
    # Ours, in the same body (the SDK's extra_body), with the documented API's meaning.
    _p("negative_prompt", "string", BOTH, "`negativePrompt`", '`""`', "What to steer away from.", openai=False),
    _p("steps", "integer", BOTH, "`steps`", str(GenerateRequest.steps), "Sampling steps, 1 to the model's `max_steps`.",
       openai=False),
    _p("cfg_scale", "number", BOTH, "`cfgScale`", f"{GenerateRequest.cfg_scale:g}", "Classifier-free guidance, 0 to "
       "30.", openai=False),
    _p("cfg_rescale", "number", BOTH, "`cfgRescale`", "0", "RescaleCFG's multiplier, 0 to 1.", openai=False),
    _p("seed", "integer", BOTH, "`seed`", "-1 (random)", "The seed; the ones used come back in `x-seeds`.", openai=False),
    _p("sampler", "string", BOTH, "`samplerName`", f"`{GenerateRequest.sampler}`", "A KSampler sampler name.",
       _set("sampler"), openai=False),
    _p("scheduler", "string", BOTH, "`scheduler`", f"`{GenerateRequest.scheduler}`", "A KSampler scheduler name.",
       openai=False),
    _p("loras", "array", BOTH, "`loras`", "none", 'LoRAs: `[{"name": ..., "strength": 1, "strength_clip": ...}]` '
       "(multipart: the same as JSON text).", _loras, openai=False),
    _p("hires_fix", "object", BOTH, "`hiresFix`", "none", "`{\"scale\": 1.5, \"denoise\": 0.5, \"steps\": ..., "
       "\"upscale_method\": ...}` (multipart: JSON text).", _hires_fix, openai=False),
    _p("denoise", "number", BOTH, "`denoise`", f"1; {EDIT_DENOISE:g} on /edits",
       "How much of the picture is re-drawn, 0.01 to 1 (below 1 needs a picture: /edits).", openai=False),
    _p("resize_mode", "string", (EDITS,), "`resizeMode`", "`just-resize`", "How the picture fits another `size`: "
       "`just-resize`, `crop-and-resize`, `resize-and-fill`.", openai=False),
    _p("omit_metadata", "boolean", BOTH, "`omitMetadata`", "false", "true leaves the recipe out of the image.",
       openai=False),
)
_BY_NAME = {param.name: param for param in PARAMS}
assert len(_BY_NAME) == len(PARAMS)


def params_of(route: str) -> tuple[Param, ...]:
    return tuple(param for param in PARAMS if route in param.routes)


# --- translation -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Translated:
    request: GenerateRequest
    model: ModelInfo
    links: bool = False  # answer with URLs of stored images (response_format url)


def translate(body: Mapping[str, Any], route: str, models: list[ModelInfo], *, form: bool = False) -> Translated:
    """A /generations JSON body, or an /edits form (`form`: values are strings and files are
    bytes), as the one domain request. OpenAIError for what the caller must change."""
    context = Context(route, models)
    allowed = params_of(route)
    for name in body:
        param = _BY_NAME.get(name)
        if param is None:
            raise OpenAIError(400, f"unknown parameter {_shown(name)}: {route} takes "
                              + ", ".join(p.name for p in allowed), param=name, code="unknown_parameter")
        if route not in param.routes:
            raise OpenAIError(400, f"{name} is a parameter of {' and '.join(param.routes)}, not of {route}", param=name,
                              code="unknown_parameter")
    for param in allowed:
        value = body.get(param.name)
        if value is None or (form and param.kind != "file" and value == "" and not param.required):
            if param.required:
                raise OpenAIError(400, f"missing required parameter {param.name}", param=param.name,
                                  code="missing_required_parameter")
            continue
        value = _typed(param, value, form)
        if param.choices and value not in param.choices:
            raise invalid(param.name, value, "must be one of " + ", ".join(param.choices))
        param.apply(value, context)
    model = resolve_model(body.get("model"), models)
    fields = context.fields
    fields["model_id"] = model.id
    if route == EDITS:
        fields.setdefault("denoise", EDIT_DENOISE)
        fields.setdefault("width", 0)  # 0 x 0: the picture's own size
        fields.setdefault("height", 0)
    elif "width" not in fields:
        fields["width"], fields["height"] = default_size(model)
    _check_representable(fields)
    if "mask" in fields:
        fields["mask"] = openai_mask(fields["mask"], model.max_pixels)
    return Translated(GenerateRequest(**fields), model, context.links)


def default_size(model: ModelInfo) -> tuple[int, int]:
    """`auto` on /generations: DEFAULT_SIDE square within the model's sides and pixel cap."""
    side = min(max(DEFAULT_SIDE, model.min_size), model.max_size)
    if side * side > model.max_pixels:
        side = max(model.min_size, int(math.isqrt(model.max_pixels)) // 8 * 8)
    return side, side


def resolve_model(value: str | None, models: list[ModelInfo]) -> ModelInfo:
    """`model`: an id from GET /v1/models, a numeric id (as a string), or nothing (the first
    model); OpenAIError 404 model_not_found otherwise."""
    ordered = sorted(models, key=lambda m: m.id)
    if value is None:
        return ordered[0]
    for model in ordered:
        if value in (model_id(model, ordered), str(model.id)):
            return model
    raise OpenAIError(404, f"the model {_shown(value)} does not exist; available: "
                      + ", ".join(f"{model_id(m, ordered)!r}" for m in ordered), param="model", code="model_not_found")


def model_id(model: ModelInfo, models: list[ModelInfo]) -> str:
    """A model's OpenAI `id`: its name, or its numeric id when another model has the same name."""
    if sum(1 for other in models if other.name == model.name) == 1 and not model.name.isdigit():
        return model.name
    return str(model.id)


def model_object(model: ModelInfo, models: list[ModelInfo], created: int) -> dict:
    return {"id": model_id(model, models), "object": "model", "created": created, "owned_by": OWNED_BY}


def models_list(models: list[ModelInfo], created: int) -> dict:
    ordered = sorted(models, key=lambda m: m.id)
    return {"object": "list", "data": [model_object(m, ordered, created) for m in ordered]}


def images_response(images: list[bytes], prompt: str, created: int, output_format: str, size: tuple[int, int] | None,
                    urls: list[str] | None = None) -> dict:
    """OpenAI's ImagesResponse: the images inline (b64_json), or with `urls` where they are."""
    data = ([{"url": url, "revised_prompt": prompt} for url in urls] if urls is not None else
            [{"b64_json": base64.b64encode(image).decode(), "revised_prompt": prompt} for image in images])
    response: dict[str, Any] = {
        "created": created,
        "data": data,
        "background": "opaque",
        "output_format": output_format,
    }
    if size is not None:
        response["size"] = f"{size[0]}x{size[1]}"
    return response


def openai_mask(data: bytes, max_pixels: int) -> bytes:
    """OpenAI's mask (transparent pixels are edited) as ours (white re-draws, black keeps), as
    PNG; a mask without alpha is returned as it is (ours already). The header is checked first
    (format, frames, pixel count) by the engine's own reader, so nothing big is decoded."""
    from PIL import Image, ImageOps

    from ..engine.pictures import read_header
    from ..errors import InvalidArgument

    try:
        read_header(data, "mask", max_pixels)
    except InvalidArgument as error:
        raise OpenAIError(400, _reworded(error.message, "mask", "mask"), param="mask") from None
    with Image.open(io.BytesIO(data)) as image:
        if not ("A" in image.getbands() or "transparency" in image.info):
            return data
        upright = ImageOps.exif_transpose(image)
        alpha = upright.convert("RGBA").getchannel("A")
    mask = alpha.point(lambda a: 255 - a)
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


# --- names -------------------------------------------------------------------------------------

def _wire_names() -> dict[str, str]:
    """The service's name of a field (as its messages and x-error-field give it, the documented
    JSON name that the table's `ours` column shows) -> the parameter sent here."""
    names = {"width x height": "size", "width": "size", "height": "size"}
    for param in PARAMS:
        match = re.fullmatch(r"`(\w+)`", param.ours)
        if match:
            names.setdefault(match[1], param.name)
    return names


_NAMES: dict[str, str] | None = None
_TAILS = {"strength_model": "strength", "strengthClip": "strength_clip", "upscaleMethod": "upscale_method"}


def param_of(service_field: str, route: str) -> str:
    """The parameter the caller sent for a field the service named (`numImages` -> `n`,
    `hiresFix.scale` -> `hires_fix.scale`, `loras[0].strength_model` -> `loras[0].strength`)."""
    global _NAMES
    if _NAMES is None:
        _NAMES = _wire_names()
    head, sep, tail = re.match(r"([^.\[]*)(.?)(.*)", service_field).groups()
    mapped = _NAMES.get(head, head)
    if not tail:
        return mapped
    rest = re.sub(r"[A-Za-z_]+", lambda m: _TAILS.get(m[0], m[0]), sep + tail)
    return mapped + rest


def _reworded(message: str, service_field: str, param: str) -> str:
    """'invalid numImages 9: ...' -> 'invalid n (numImages) 9: ...' when the names differ."""
    lead = f"invalid {service_field} "
    if param != service_field and message.startswith(lead):
        return f"invalid {param} ({service_field}) " + message[len(lead):]
    return message


# --- types -------------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _of_kind(value: Any, kind: str) -> bool:
    return {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": _is_number,
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
        "file": lambda v: isinstance(v, (bytes, list)),
    }[kind](value)


def _a(kind: str) -> str:
    return {"integer": "an integer", "array": "an array", "object": "an object", "file": "a file"}.get(kind, f"a {kind}")


def _typed(param: Param, value: Any, form: bool) -> Any:
    """The value as its kind, or OpenAIError naming the parameter. Multipart values are text:
    integers, numbers and booleans are parsed, arrays and objects are JSON text."""
    if form and param.kind != "file" and isinstance(value, str):
        value = _from_text(param, value)
    if param.kind == "file":
        if isinstance(value, list):
            if len(value) != 1:
                raise invalid(param.name, f"{len(value)} files", "give exactly one file")
            value = value[0]
        if not isinstance(value, bytes):
            raise invalid(param.name, value, "must be a file (multipart/form-data)", "invalid_type")
        return value
    if not _of_kind(value, param.kind):
        raise invalid(param.name, value, f"must be {_a(param.kind)}", "invalid_type")
    return value


def _from_text(param: Param, text: str) -> Any:
    """A multipart field's text as the parameter's kind (checked again by _typed)."""
    import json

    whole = re.fullmatch(r"-?[0-9]+", text) is not None
    if param.kind == "string":
        return text
    if param.kind in ("integer", "number") and whole:
        return int(text)
    if param.kind == "number":
        with contextlib.suppress(ValueError):
            return float(text)
    if param.kind == "boolean" and text in ("true", "false"):
        return text == "true"
    if param.kind in ("array", "object"):
        with contextlib.suppress(ValueError):
            return json.loads(text)
    json_text = " (JSON text)" if param.kind in ("array", "object") else ""
    raise invalid(param.name, text, f"must be {_a(param.kind)}{json_text}", "invalid_type")


_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def _check_representable(fields: dict[str, Any]) -> None:
    """Integers beyond the wire's types (int32 steps, int64 seed) are refused here, naming the
    parameter, before they could fail the request's encoding."""
    from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
    from google.protobuf.descriptor import FieldDescriptor as F

    from ..server.convert import RENAMED

    proto_fields = pb.GenerateImageRequest.DESCRIPTOR.fields_by_name
    renamed = RENAMED[GenerateRequest]
    for domain, value in fields.items():
        descriptor = proto_fields.get(renamed.get(domain, domain))
        if descriptor is None or not isinstance(value, int) or isinstance(value, bool):
            continue
        kind = "int64" if descriptor.type in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64) else "int32"
        low, high = _INT_RANGES[kind]
        if not low <= value <= high:
            name = param_of(descriptor.json_name, "")
            raise invalid(name, value, f"out of range ({low} to {high})")
    hires = fields.get("hires_fix")
    if hires is not None and not _INT_RANGES["int32"][0] <= hires.steps <= _INT_RANGES["int32"][1]:
        raise invalid("hires_fix.steps", hires.steps, "out of range")


def _shown(value: object) -> str:
    from ..errors import describe

    return describe(value)


# --- the edge ------------------------------------------------------------------------------------

def edge_error(message: str) -> dict:
    """Envoy's own replies on /v1/ (json_format): OpenAI's shape, the type by the status."""
    return {"error": {
        "message": message,
        "type": "%CEL(response.code == 429 ? 'requests' : response.code >= 500 ? 'server_error' : "
                "'invalid_request_error')%",
        "param": None,
        "code": None,
    }}


ADAPTER = Adapter(
    name="openai",
    prefix=PREFIX,
    routes=(
        Route("POST", GENERATIONS, wire.MAX_REQUEST_BYTES, "Create images from a prompt (OpenAI Images API)"),
        Route("POST", EDITS, wire.MAX_IMAGE_REQUEST_BYTES,
              "Re-draw a picture, or inpaint it with a mask (OpenAI Images API, multipart/form-data)"),
        Route("GET", MODELS, 0, "List the models (OpenAI Models API)"),
        Route("GET", MODELS + "/{model}", 0, "One model (OpenAI Models API)"),
    ),
    edge_error=edge_error,
)
