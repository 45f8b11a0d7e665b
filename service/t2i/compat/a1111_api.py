"""A1111's `/sdapi/v1` in terms of the one domain request: the mapping tables and translations.

`FIELDS` is the one mapping table: every body field of POST /sdapi/v1/txt2img and
/sdapi/v1/img2img that A1111 (AUTOMATIC1111's stable-diffusion-webui) defines and clients such
as `webuiapi` send, what it becomes in `t2i.domain.GenerateRequest`, A1111's default, and what
happens to it. Fields for what this service does not do (face restoration, scripts, styles,
subseeds, ...) are accepted at their "off" values, which clients send by default, and refused
with 422 naming the field otherwise, never silently dropped. `SAMPLERS`, `SCHEDULERS` and
`UPSCALERS` map A1111's labels; `ERRORS` maps the service's statuses to A1111's (FastAPI's)
replies. All are rendered into the README (scripts/render.py).

Prompts on these routes are read by A1111's rules (`promptSyntax: a1111`, t2i.prompts.a1111):
the service, not this module, reads the `<lora:...>` tags, so the charge, the LoRAs that run
and the image's recipe come from the same text. Nothing here validates what the service
validates; the field a refusal names comes back as the A1111 field sent (`field_of`).
This module does no I/O; t2i.compat.a1111_http serves it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import wire
from ..domain import RESIZE_MODES, GenerateRequest, HiresFix, ModelInfo
from ..engine.recipe import A1111_LATENT_UPSCALERS, A1111_SAMPLERS, A1111_SCHEDULES
from ..errors import ERROR_KINDS
from .adapter import Adapter, Route

PREFIX = "/sdapi/v1/"
TXT2IMG = "/sdapi/v1/txt2img"
IMG2IMG = "/sdapi/v1/img2img"
BOTH = (TXT2IMG, IMG2IMG)
SD_MODELS = "/sdapi/v1/sd-models"
SAMPLERS_PATH = "/sdapi/v1/samplers"
SCHEDULERS_PATH = "/sdapi/v1/schedulers"
LORAS_PATH = "/sdapi/v1/loras"
OPTIONS = "/sdapi/v1/options"
PROGRESS = "/sdapi/v1/progress"
INTERRUPT = "/sdapi/v1/interrupt"
SCRIPTS = "/sdapi/v1/scripts"

# A1111's API defaults where a field is left out (its StableDiffusionProcessing's); the
# sampler is A1111's "Euler a" (its own first sampler, DPM++ 2M, is not offered here).
DEFAULT_SAMPLER = "Euler a"
DEFAULT_STEPS = 50
DEFAULT_SIZE = 512
DEFAULT_CFG = 7.0
HIRES_DENOISE = 0.7  # A1111's hires denoising strength when the request gives none
IMG2IMG_DENOISE = 0.75
# Response headers: the charge and the balance after it (A1111 has no such fields).
USAGE_HEADER = "x-stardust-usage"
BALANCE_HEADER = "x-stardust-balance"
AUTH_REALM = 'Basic realm="t2i"'


class A1111Error(Exception):
    """A reply in A1111's (FastAPI's) shapes: {"detail": "..."} for most statuses, and for 422
    {"detail": [{"type", "loc": ["body", FIELD], "msg", "input"}]} as its request models
    answer; 500 is A1111's own handler's {"error", "detail", "body", "errors"}."""

    def __init__(self, status: int, message: str, *, field: str | None = None, value: Any = None,
                 headers: Mapping[str, str] | None = None, kind: str = "value_error") -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.value, self.kind = status, message, field, value, kind
        self.headers = dict(headers or {})

    def body(self) -> dict:
        if self.status == 422:
            loc = ["body", *self.field.replace("]", "").replace("[", ".").split(".")] if self.field else ["body"]
            return {"detail": [{"type": self.kind, "loc": loc, "msg": self.message, "input": _jsonable(self.value)}]}
        if self.status == 500:
            return {"error": "InternalError", "detail": "", "body": "", "errors": self.message}
        return {"detail": self.message}


def invalid(name: str, value: Any, allowed: str, kind: str = "value_error") -> A1111Error:
    return A1111Error(422, f"invalid {name} {_shown(value)}: {allowed}", field=name, value=value, kind=kind)


# --- labels ------------------------------------------------------------------------------------

def _inverse(table: Mapping[str, str]) -> dict[str, str]:
    return {label.lower(): name for name, label in table.items()}


# A1111's sampler labels (the image recipe's, engine/recipe.py) and its old k-diffusion aliases.
SAMPLERS: dict[str, str] = _inverse(A1111_SAMPLERS) | {
    "k_euler": "euler", "k_euler_a": "euler_ancestral", "k_euler_ancestral": "euler_ancestral",
    "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_ancestral", "k_dpmpp_2s_a": "dpmpp_2s_ancestral",
}
# A1111's scheduler names and labels. "Automatic" is the sampler's own default in A1111: Karras
# for DPM++ 2S a, else its discrete "Uniform" schedule, which is ComfyUI's normal.
SCHEDULERS: dict[str, str] = _inverse(A1111_SCHEDULES) | {
    "automatic": "", "uniform": "normal", "ddim": "ddim_uniform", "sgmuniform": "sgm_uniform",
    **{name: name for name in A1111_SCHEDULES},
}
AUTOMATIC = {"dpmpp_2s_ancestral": "karras", "dpmpp_2s_ancestral_cfg_pp": "karras"}
# A1111's hires upscalers that are the latent interpolations of ComfyUI's LatentUpscaleBy.
UPSCALERS: dict[str, str] = _inverse(A1111_LATENT_UPSCALERS)
# A1111's img2img resize_mode numbers, in its order.
RESIZE_NUMBERS = dict(enumerate(RESIZE_MODES))


def sampler_and_scheduler(sampler: str | None, scheduler: str | None) -> tuple[str, str]:
    """(our sampler, our scheduler) for A1111's labels; a combined legacy label such as
    "DPM++ 2S a Karras" names the scheduler at its end. Labels are matched without case."""
    name = (sampler or DEFAULT_SAMPLER).strip()
    found_scheduler = None
    if name.lower() not in SAMPLERS:
        for label in sorted(SCHEDULERS, key=len, reverse=True):
            if label != "automatic" and name.lower().endswith(" " + label):
                name, found_scheduler = name[: -len(label) - 1], SCHEDULERS[label]
                break
    ours = SAMPLERS.get(name.lower())
    if ours is None:
        raise A1111Error(404, f"Sampler not found: {_shown(sampler)}; available: " + ", ".join(A1111_SAMPLERS.values()),
                         field="sampler_name", value=sampler)
    if found_scheduler is None:
        if scheduler in (None, ""):
            found_scheduler = ""
        elif scheduler.strip().lower() in SCHEDULERS:
            found_scheduler = SCHEDULERS[scheduler.strip().lower()]
        else:
            raise invalid("scheduler", scheduler, "must be Automatic or one of " + ", ".join(A1111_SCHEDULES.values()))
    return ours, found_scheduler or AUTOMATIC.get(ours, "normal")


# --- the service's statuses in A1111's terms ----------------------------------------------------

@dataclass(frozen=True)
class ErrorMapping:
    status: str  # the gRPC status name the service answers
    http: int
    why: str  # for the README


ERRORS: tuple[ErrorMapping, ...] = (
    ErrorMapping("INVALID_ARGUMENT", 422, "a field out of range, as A1111's request models answer: `loc` names the A1111 "
                 "field (`prompt` for a `<lora:...>` tag)"),
    ErrorMapping("FAILED_PRECONDITION", 402, "not enough stardust (A1111 has no billing)"),
    ErrorMapping("UNAUTHENTICATED", 401, "wrong or missing password, with `WWW-Authenticate: Basic` (as `--api-auth`)"),
    ErrorMapping("PERMISSION_DENIED", 401, "revoked key"),
    ErrorMapping("NOT_FOUND", 404, "unknown model (`override_settings.sd_model_checkpoint`)"),
    ErrorMapping("ABORTED", 409, "the same `Idempotency-Key` is still being processed"),
    ErrorMapping("ALREADY_EXISTS", 409, "the request conflicts with an earlier one"),
    ErrorMapping("RESOURCE_EXHAUSTED", 429, "rate limit, concurrency cap, queue full; `Retry-After` in seconds"),
    ErrorMapping("INTERNAL", 500, "server fault (never charged), in A1111's own 500 shape"),
    ErrorMapping("UNAVAILABLE", 503, "starting, shutting down, the ledger or the rate limiter unreachable"),
    ErrorMapping("DEADLINE_EXCEEDED", 504, "the generation outlasted its deadline; never charged"),
)
_ERRORS = {row.status: row for row in ERRORS}
assert {k.status for k in ERROR_KINDS if k.from_service} == set(_ERRORS), "every status the service sends needs a row"


def service_error(status: str, message: str, trailers: Mapping[str, str]) -> A1111Error:
    row = _ERRORS.get(status)
    if row is None or (status == "RESOURCE_EXHAUSTED" and "message larger than max" in message):
        return A1111Error(500, message or status)
    headers = {}
    if status == "RESOURCE_EXHAUSTED":
        headers[wire.RETRY_AFTER_HEADER] = trailers.get(wire.RETRY_AFTER_HEADER, "1")
        headers.update({name: trailers[name] for name in wire.RATE_LIMIT_HEADERS if name in trailers})
    if status in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        headers["WWW-Authenticate"] = AUTH_REALM
    if status == "INVALID_ARGUMENT" and trailers.get(wire.ERROR_FIELD_HEADER):
        sent = trailers[wire.ERROR_FIELD_HEADER]
        return A1111Error(422, message, field=field_of(sent), headers=headers)
    return A1111Error(row.http, message, headers=headers)


# --- the mapping table -------------------------------------------------------------------------

@dataclass
class Context:
    models: list[ModelInfo]
    body: Mapping[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)
    model: ModelInfo | None = None
    current: str = ""  # the field being applied, for its errors


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # its JSON type, for the OpenAPI description
    routes: tuple[str, ...]
    ours: str  # what it becomes, for the README (`-`: nothing)
    default: str  # A1111's, for the README
    effect: str
    apply: Callable[[Any, Context], None]


def _set(domain: str, kind: type | tuple[type, ...], convert: Callable[[Any], Any] = lambda v: v):
    def apply(value: Any, context: Context) -> None:
        context.fields[domain] = convert(_typed(context.current, value, kind))
    return apply


def _ignored(value: Any, context: Context) -> None:
    return None


def _only(*accepted: Any, why: str) -> Callable[[Any, Context], None]:
    """Accepted at A1111's "off" values (what clients send by default); anything else is
    refused, naming the field and `why`."""
    def apply(value: Any, context: Context) -> None:
        if value not in accepted:
            shown = " or ".join(_shown(a) for a in accepted)
            raise invalid(context.current, value, f"only {shown} is accepted here: {why}")
    return apply


def _empty(why: str) -> Callable[[Any, Context], None]:
    def apply(value: Any, context: Context) -> None:
        if value not in (None, "", [], {}):
            raise invalid(context.current, value, f"must be empty: {why}")
    return apply


def _same_as(other: str, why: str) -> Callable[[Any, Context], None]:
    """An hr_* field: empty, or the first pass's own value (A1111's 'use the same')."""
    def apply(value: Any, context: Context) -> None:
        if value in (None, "") or value == context.body.get(other, value):
            return
        raise invalid(context.current, value, f"must be empty or the same as {other}: {why}")
    return apply


def _scripts(value: Any, context: Context) -> None:
    """alwayson_scripts: {} or scripts switched off ({"args": []} or {"args": [false]})."""
    if not isinstance(value, dict):
        raise invalid("alwayson_scripts", value, "must be an object", "dict_type")
    for name, script in value.items():
        args = script.get("args") if isinstance(script, dict) else None
        if args not in ([], [False], None):
            raise invalid(f"alwayson_scripts.{name}", script, "this service runs no scripts or extensions")


def _override(value: Any, context: Context) -> None:
    if not isinstance(value, dict):
        raise invalid("override_settings", value, "must be an object", "dict_type")
    for key, setting in value.items():
        if key == "sd_model_checkpoint":
            context.model = resolve_model(_typed("override_settings.sd_model_checkpoint", setting, str), context.models)
        elif key == "CLIP_stop_at_last_layers":
            if setting not in (1, 2):
                raise invalid(f"override_settings.{key}", setting, "SDXL always uses the penultimate layer: 1 or 2")
        else:
            raise invalid(f"override_settings.{key}", setting,
                          "only sd_model_checkpoint (and CLIP_stop_at_last_layers, ignored on SDXL) can be set here")


def _init_images(value: Any, context: Context) -> None:
    if not isinstance(value, list) or len(value) != 1:
        raise invalid("init_images", f"{len(value)} pictures" if isinstance(value, list) else value,
                      "give exactly one picture (base64, a data: URL allowed)")
    context.fields["init_image"] = decode_base64("init_images[0]", value[0])


def _mask(value: Any, context: Context) -> None:
    if value in (None, ""):
        return
    context.fields["mask"] = decode_base64("mask", value)


def _resize_mode(value: Any, context: Context) -> None:
    number = _typed("resize_mode", value, int)
    if number not in RESIZE_NUMBERS:
        raise invalid("resize_mode", value, "0 (just resize), 1 (crop and resize) or 2 (resize and fill); 3 (latent "
                      "upscale) is not offered")
    context.fields["resize_mode"] = RESIZE_NUMBERS[number]


def _invert(value: Any, context: Context) -> None:
    if value not in (0, 1, False, True):
        raise invalid("inpainting_mask_invert", value, "0 (white is re-drawn) or 1 (black is re-drawn)")
    context.fields["invert_mask"] = bool(value)


NO_SCRIPTS = "this service runs no scripts or extensions"
ONE_PASS_MODEL = "the hires pass uses the request's model, sampler, scheduler and prompts"

# The one mapping table, in A1111's order of its request models.
FIELDS: tuple[Field, ...] = (
    Field("prompt", "string", BOTH, "`prompt`", '""', "Read by A1111's rules (`promptSyntax: a1111`): `(x)`, `[x]`, `(x:w)`, "
          "escapes, `BREAK`, comma back-off, Original emphasis, embeddings by file name, `<lora:NAME:TE:UNET>` tags "
          "as LoRAs. Empty: 422 (a prompt is required here).", _set("prompt", str)),
    Field("negative_prompt", "string", BOTH, "`negativePrompt`", '""', "Read by A1111's rules; empty is zeros, as A1111 "
          "conditions SDXL.", _set("negative_prompt", str)),
    Field("styles", "array", BOTH, "-", "[]", "Must be empty: no saved styles here.", _empty("no saved styles here")),
    Field("seed", "integer", BOTH, "`seed`", "-1", "-1: random; the seed used comes back in `info`.", _set("seed", int)),
    Field("subseed", "integer", BOTH, "-", "-1", "Ignored (variation seeds are off unless `subseed_strength` is set).", _ignored),
    Field("subseed_strength", "number", BOTH, "-", "0", "0 only: no variation seeds.", _only(0, 0.0, None, why="no variation seeds")),
    Field("seed_resize_from_h", "integer", BOTH, "-", "-1", "-1 or 0 only.", _only(-1, 0, None, why="no seed resizing")),
    Field("seed_resize_from_w", "integer", BOTH, "-", "-1", "-1 or 0 only.", _only(-1, 0, None, why="no seed resizing")),
    Field("sampler_name", "string", BOTH, "`samplerName`", f"`{DEFAULT_SAMPLER}`", "An A1111 label (`Euler a`, `DPM2 a`, "
          "`DPM++ 2S a`, ...; a combined legacy label such as `DPM++ 2S a Karras` sets the scheduler too), matched "
          "without case; unknown: 404 `Sampler not found`.", _ignored),  # with scheduler, by translate()
    Field("sampler_index", "string", BOTH, "`samplerName`", "-", "The old name of `sampler_name`, used when that is absent.",
          _ignored),
    Field("scheduler", "string", BOTH, "`scheduler`", "`Automatic`", "An A1111 scheduler name or label (`Karras`, `SGM Uniform`, "
          "...); `Automatic`: Karras for DPM++ 2S a, else Normal (A1111's Uniform).", _ignored),
    Field("batch_size", "integer", BOTH, "`numImages`", "1", "Images per call: `batch_size` x `n_iter`, at most 8, made as one "
          "batch from one seed (each image's infotext says its `Batch pos`).", _set("batch_size", int)),
    Field("n_iter", "integer", BOTH, "`numImages`", "1", "See `batch_size`.", _set("n_iter", int)),
    Field("steps", "integer", BOTH, "`steps`", str(DEFAULT_STEPS), "Sampling steps.", _set("steps", int)),
    Field("cfg_scale", "number", BOTH, "`cfgScale`", f"{DEFAULT_CFG:g}", "Classifier-free guidance.", _set("cfg_scale", (int, float), float)),
    Field("width", "integer", BOTH, "`width`", str(DEFAULT_SIZE), "Output width (img2img: the picture is resized to it by "
          "`resize_mode`).", _set("width", int)),
    Field("height", "integer", BOTH, "`height`", str(DEFAULT_SIZE), "Output height.", _set("height", int)),
    Field("restore_faces", "boolean", BOTH, "-", "false", "false only: no face restoration.", _only(False, None, why="no face restoration")),
    Field("tiling", "boolean", BOTH, "-", "false", "false only: no tiling.", _only(False, None, why="no tiling")),
    Field("do_not_save_samples", "boolean", BOTH, "-", "false", "Ignored: nothing is saved on the server.", _ignored),
    Field("do_not_save_grid", "boolean", BOTH, "-", "false", "Ignored.", _ignored),
    Field("save_images", "boolean", BOTH, "-", "false", "Ignored: nothing is saved on the server.", _ignored),
    Field("send_images", "boolean", BOTH, "-", "true", "false answers without images (still charged: they were made).",
          _set("send_images", bool)),
    Field("eta", "number", BOTH, "-", "null", "null or 1 only: the ancestral samplers' eta is 1.", _only(None, 1, 1.0, why="eta is 1")),
    Field("s_churn", "number", BOTH, "-", "0", "0 only.", _only(0, 0.0, None, why="no churn")),
    Field("s_tmax", "number", BOTH, "-", "0", "0 (A1111: no limit) only.", _only(0, 0.0, None, why="no churn")),
    Field("s_tmin", "number", BOTH, "-", "0", "0 only.", _only(0, 0.0, None, why="no churn")),
    Field("s_noise", "number", BOTH, "-", "1", "1 only.", _only(1, 1.0, None, why="the noise multiplier is 1")),
    Field("s_min_uncond", "number", BOTH, "-", "0", "0 only.", _only(0, 0.0, None, why="negative guidance is never skipped")),
    Field("override_settings", "object", BOTH, "`modelId`", "{}", "`sd_model_checkpoint`: the model (a title or model_name from "
          "GET /sdapi/v1/sd-models, our model name or id); `CLIP_stop_at_last_layers` ignored (SDXL); other keys: 422.",
          _override),
    Field("override_settings_restore_afterwards", "boolean", BOTH, "-", "true", "Ignored: settings never outlive a call here.", _ignored),
    Field("script_name", "string", BOTH, "-", "null", "Must be empty: " + NO_SCRIPTS + ".", _empty(NO_SCRIPTS)),
    Field("script_args", "array", BOTH, "-", "[]", "Must be empty.", _empty(NO_SCRIPTS)),
    Field("alwayson_scripts", "object", BOTH, "-", "{}", "Empty, or scripts switched off (`{\"args\": []}`).", _scripts),
    Field("comments", "object", BOTH, "-", "null", "Ignored.", _ignored),
    Field("force_task_id", "string", BOTH, "-", "null", "Ignored: /progress reports the caller's own calls.", _ignored),
    Field("infotext", "string", BOTH, "-", "null", "Must be empty: send the fields themselves.", _empty("send the fields themselves")),
    Field("disable_extra_networks", "boolean", BOTH, "-", "false", "false only: `<lora:...>` tags are always read.",
          _only(False, None, why="tags are always read")),
    Field("refiner_checkpoint", "string", BOTH, "-", "null", "Must be empty: no refiner pass.", _empty("no refiner pass")),
    Field("refiner_switch_at", "number", BOTH, "-", "null", "Ignored without a refiner.", _ignored),
    # txt2img's hires fix.
    Field("enable_hr", "boolean", (TXT2IMG,), "`hiresFix`", "false", "true adds the hires pass below.", _set("enable_hr", bool)),
    Field("denoising_strength", "number", BOTH, "`denoise` / `hiresFix.denoise`", f"{IMG2IMG_DENOISE:g} (img2img), "
          f"{HIRES_DENOISE:g} (hires)", "img2img: how much of the picture is re-drawn; txt2img: the hires pass's, "
          "ignored without `enable_hr`.", _set("denoising_strength", (int, float), float)),
    Field("hr_scale", "number", (TXT2IMG,), "`hiresFix.scale`", "2", "The upscale factor.", _set("hr_scale", (int, float), float)),
    Field("hr_upscaler", "string", (TXT2IMG,), "`hiresFix.upscaleMethod`", "`Latent`",
          "A latent upscaler: " + ", ".join(f"`{label}` ({name})" for name, label in A1111_LATENT_UPSCALERS.items())
          + "; others (ESRGAN, Lanczos, ...): 422.", _set("hr_upscaler", str)),
    Field("hr_second_pass_steps", "integer", (TXT2IMG,), "`hiresFix.steps`", "0", "0: the first pass's steps.",
          _set("hr_second_pass_steps", int)),
    Field("hr_resize_x", "integer", (TXT2IMG,), "-", "0", "0 only: give `hr_scale`.", _only(0, None, why="give hr_scale")),
    Field("hr_resize_y", "integer", (TXT2IMG,), "-", "0", "0 only: give `hr_scale`.", _only(0, None, why="give hr_scale")),
    Field("hr_checkpoint_name", "string", (TXT2IMG,), "-", "null", "Empty or `Use same checkpoint`.",
          _only(None, "", "Use same checkpoint", why=ONE_PASS_MODEL)),
    Field("hr_sampler_name", "string", (TXT2IMG,), "-", "null", "Empty or the same as `sampler_name`.",
          _same_as("sampler_name", ONE_PASS_MODEL)),
    Field("hr_scheduler", "string", (TXT2IMG,), "-", "null", "Empty or the same as `scheduler`.", _same_as("scheduler", ONE_PASS_MODEL)),
    Field("hr_prompt", "string", (TXT2IMG,), "-", '""', "Empty or the same as `prompt`.", _same_as("prompt", ONE_PASS_MODEL)),
    Field("hr_negative_prompt", "string", (TXT2IMG,), "-", '""', "Empty or the same as `negative_prompt`.",
          _same_as("negative_prompt", ONE_PASS_MODEL)),
    Field("hr_additional_modules", "array", (TXT2IMG,), "-", "null", "Must be empty.", _empty(ONE_PASS_MODEL)),
    Field("firstphase_width", "integer", (TXT2IMG,), "-", "0", "Ignored (A1111 ignores it too).", _ignored),
    Field("firstphase_height", "integer", (TXT2IMG,), "-", "0", "Ignored.", _ignored),
    # img2img.
    Field("init_images", "array", (IMG2IMG,), "`initImage`", "required", "One picture, base64 (a `data:image/...;base64,` URL "
          "too): PNG, JPEG or WebP.", _init_images),
    Field("resize_mode", "integer", (IMG2IMG,), "`resizeMode`", "0", "0 just resize, 1 crop and resize, 2 resize and fill; 3: 422.",
          _resize_mode),
    Field("mask", "string", (IMG2IMG,), "`mask`", "null", "Inpainting: white is re-drawn, the picture's size. The result is "
          "ComfyUI's latent noise mask (SetLatentNoiseMask), not A1111's blurred, pasted-back inpainting.", _mask),
    Field("inpainting_mask_invert", "integer", (IMG2IMG,), "`mask`", "0", "1: black is re-drawn (the mask is inverted).", _invert),
    Field("mask_blur", "integer", (IMG2IMG,), "-", "4", "Ignored: the mask is used as sent.", _ignored),
    Field("mask_blur_x", "integer", (IMG2IMG,), "-", "4", "Ignored.", _ignored),
    Field("mask_blur_y", "integer", (IMG2IMG,), "-", "4", "Ignored.", _ignored),
    Field("inpainting_fill", "integer", (IMG2IMG,), "-", "0", "Ignored: the masked part starts from the picture (A1111's "
          "`original`).", _ignored),
    Field("inpaint_full_res", "boolean", (IMG2IMG,), "-", "true", "Ignored: the whole picture is denoised.", _ignored),
    Field("inpaint_full_res_padding", "integer", (IMG2IMG,), "-", "0", "Ignored.", _ignored),
    Field("initial_noise_multiplier", "number", (IMG2IMG,), "-", "1", "1 only.", _only(1, 1.0, None, why="the noise multiplier is 1")),
    Field("image_cfg_scale", "number", (IMG2IMG,), "-", "1.5", "Ignored (instruct-pix2pix models only).", _ignored),
    Field("include_init_images", "boolean", (IMG2IMG,), "-", "false", "Ignored: only the generated images come back.", _ignored),
    Field("latent_mask", "string", (IMG2IMG,), "-", "null", "Must be empty.", _empty("the mask is the latent mask")),
)
_BY_NAME = {f.name: f for f in FIELDS}
assert len(_BY_NAME) == len(FIELDS)


def fields_of(route: str) -> tuple[Field, ...]:
    return tuple(f for f in FIELDS if route in f.routes)


# --- translation -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Translated:
    request: GenerateRequest
    model: ModelInfo
    send_images: bool


def translate(body: Mapping[str, Any], route: str, models: list[ModelInfo]) -> Translated:
    """A txt2img or img2img JSON body as the one domain request; A1111Error for what the
    caller must change."""
    context = Context(models, body)
    for name in body:
        found = _BY_NAME.get(name)
        if found is None or route not in found.routes:
            raise A1111Error(422, f"unknown field {_shown(name)}: {route} takes " + ", ".join(f.name for f in fields_of(route)),
                             field=name, value=body[name], kind="extra_forbidden")
    for spec in fields_of(route):
        if spec.name in body and body[spec.name] is not None:
            context.current = spec.name
            spec.apply(body[spec.name], context)
    fields = context.fields
    sampler_label = body.get("sampler_name") or body.get("sampler_index")
    sampler, scheduler = sampler_and_scheduler(
        _typed("sampler_name", sampler_label, str) if sampler_label is not None else None,
        _typed("scheduler", body.get("scheduler"), str) if body.get("scheduler") is not None else None,
    )
    model = context.model or sorted(models, key=lambda m: m.id)[0]
    images = fields.pop("batch_size", 1) * fields.pop("n_iter", 1)
    request: dict[str, Any] = {
        "model_id": model.id, "prompt": fields.get("prompt", ""), "negative_prompt": fields.get("negative_prompt", ""),
        "width": fields.get("width", DEFAULT_SIZE), "height": fields.get("height", DEFAULT_SIZE),
        "steps": fields.get("steps", DEFAULT_STEPS), "cfg_scale": fields.get("cfg_scale", DEFAULT_CFG),
        "seed": fields.get("seed", -1), "sampler": sampler, "scheduler": scheduler, "num_images": images,
        "output_format": "png", "prompt_syntax": "a1111",
    }
    denoise = fields.get("denoising_strength")
    if route == IMG2IMG:
        if "init_image" not in fields:
            raise A1111Error(422, "init_images is required: one picture to start from", field="init_images",
                             kind="missing")
        request |= {"init_image": fields["init_image"], "denoise": IMG2IMG_DENOISE if denoise is None else denoise,
                    "resize_mode": fields.get("resize_mode", RESIZE_MODES[0])}
        if "mask" in fields:
            request["mask"] = invert(fields["mask"]) if fields.get("invert_mask") else fields["mask"]
    elif fields.get("enable_hr"):
        label = fields.get("hr_upscaler", "Latent")
        method = UPSCALERS.get(label.strip().lower())
        if method is None:
            raise invalid("hr_upscaler", label, "a latent upscaler: " + ", ".join(A1111_LATENT_UPSCALERS.values()))
        request["hires_fix"] = HiresFix(
            scale=fields.get("hr_scale", 2.0), upscale_method=method, steps=fields.get("hr_second_pass_steps", 0),
            denoise=HIRES_DENOISE if denoise is None else denoise,
        )
    return Translated(GenerateRequest(**request), model, fields.get("send_images", True))


def resolve_model(value: str, models: list[ModelInfo]) -> ModelInfo:
    """A model by A1111's title ("file.safetensors [hash]"), its model_name (the file name
    without extension), our name or our numeric id."""
    for model in sorted(models, key=lambda m: m.id):
        if value in (sd_model(model)["title"], sd_model(model)["model_name"], model.checkpoint, model.name, str(model.id)):
            return model
    raise A1111Error(404, f"Model not found: {_shown(value)}; available: "
                     + ", ".join(repr(sd_model(m)["title"]) for m in models),
                     field="override_settings.sd_model_checkpoint", value=value)


def decode_base64(name: str, value: Any) -> bytes:
    text = _typed(name, value, str)
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(name, value[:40] + "..." if len(value) > 40 else value, "must be base64 (a data: URL allowed)") from None


def invert(mask: bytes) -> bytes:
    """The mask with black and white swapped (inpainting_mask_invert), as PNG. Its header is
    checked by the engine's reader first, so nothing big is decoded here."""
    from PIL import Image, ImageOps

    from ..engine.pictures import read_header
    from ..errors import InvalidArgument

    try:
        read_header(mask, "mask", 1 << 26)
    except InvalidArgument as error:
        raise A1111Error(422, error.message, field="mask") from None
    with Image.open(io.BytesIO(mask)) as image:
        upright = ImageOps.exif_transpose(image).convert("L")
    out = io.BytesIO()
    ImageOps.invert(upright).save(out, format="PNG")
    return out.getvalue()


# --- answers -----------------------------------------------------------------------------------

def sd_model(model: ModelInfo) -> dict:
    """A model as GET /sdapi/v1/sd-models lists it."""
    stem = model.checkpoint.rsplit(".", 1)[0] if model.checkpoint else model.name
    short = model.sha256[:10]
    return {
        "title": f"{model.checkpoint or model.name} [{short}]" if short else model.checkpoint or model.name,
        "model_name": stem, "hash": short or None, "sha256": model.sha256 or None,
        "filename": model.checkpoint or model.name, "config": None,
    }


def samplers_list() -> list[dict]:
    aliases: dict[str, list[str]] = {}
    for alias, name in SAMPLERS.items():
        if alias.startswith("k_"):
            aliases.setdefault(name, []).append(alias)
    return [{"name": label, "aliases": aliases.get(name, []), "options": {}} for name, label in A1111_SAMPLERS.items()]


def schedulers_list() -> list[dict]:
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}] + [
        {"name": name, "label": label, "aliases": None, "default_rho": 7.0 if name == "karras" else -1,
         "need_inner_model": False}
        for name, label in A1111_SCHEDULES.items()
    ]


def loras_list(loras) -> list[dict]:
    """LoRAs (t2i.domain.LoraDescription) as A1111's Lora extension lists them."""
    return [{"name": lora.name, "alias": lora.name, "path": lora.name + ".safetensors",
             "metadata": {"ss_base_model_version": lora.base_model, "ss_network_dim": str(lora.rank),
                          "ss_tag_frequency": {}, "trigger_words": list(lora.trigger_words), "model_id": lora.model_id}}
            for lora in loras]


def options(model: ModelInfo) -> dict:
    """The settings GET /sdapi/v1/options reports: the ones that decide an image here."""
    return {
        "sd_model_checkpoint": sd_model(model)["title"], "sd_checkpoint_hash": model.sha256 or None,
        "CLIP_stop_at_last_layers": 1, "eta_ancestral": 1.0, "emphasis": "Original",
        "comma_padding_backtrack": 20, "enable_emphasis": True, "samples_format": "png",
        "sd_vae": "Automatic", "sdxl_crop_left": 0, "sdxl_crop_top": 0,
    }


def response(body: Mapping[str, Any], translated: Translated, images: list[bytes], seeds: list[int],
             infotexts: list[str], model: ModelInfo, job_timestamp: str) -> dict:
    """txt2img/img2img's answer: {"images", "parameters", "info"}, `info` a JSON string as A1111's."""
    r = translated.request
    seed = seeds[0] if seeds else r.seed
    info = {
        "prompt": r.prompt, "all_prompts": [r.prompt] * len(images), "negative_prompt": r.negative_prompt,
        "all_negative_prompts": [r.negative_prompt] * len(images), "seed": seed, "all_seeds": list(seeds),
        "subseed": -1, "all_subseeds": [-1] * len(images), "subseed_strength": 0, "width": r.width, "height": r.height,
        "sampler_name": A1111_SAMPLERS[r.sampler], "scheduler": A1111_SCHEDULES[r.scheduler], "cfg_scale": r.cfg_scale,
        "steps": r.steps, "batch_size": r.num_images, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": sd_model(model)["model_name"], "sd_model_hash": model.sha256[:10] or None,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": r.denoise if r.init_image else (r.hires_fix.denoise if r.hires_fix else 0),
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": job_timestamp, "clip_skip": 1, "is_using_inpainting_conditioning": False,
    }
    parameters = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    return {
        "images": [base64.b64encode(image).decode() for image in images] if translated.send_images else [],
        "parameters": parameters, "info": json.dumps(info),
    }


def progress_body(running: list[dict], job_timestamp: str) -> dict:
    """GET /sdapi/v1/progress for the caller's running calls (each {"step", "total"...})."""
    if not running:
        return {"progress": 0.0, "eta_relative": 0.0, "state": {
            "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
            "job_timestamp": job_timestamp, "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
        }, "current_image": None, "textinfo": None}
    first = running[0]
    fraction = first["evaluations"] / first["total_evaluations"] if first["total_evaluations"] else 0.0
    return {"progress": round(fraction, 4), "eta_relative": round(first["remaining"], 3), "state": {
        "skipped": False, "interrupted": False, "stopping_generation": False, "job": first["job"],
        "job_count": len(running), "job_timestamp": first["timestamp"], "job_no": 0,
        "sampling_step": first["step"], "sampling_steps": first["total"],
    }, "current_image": None, "textinfo": None}


# --- names -------------------------------------------------------------------------------------

_SERVICE_TO_A1111 = {
    "prompt": "prompt", "negativePrompt": "negative_prompt", "seed": "seed", "samplerName": "sampler_name",
    "scheduler": "scheduler", "numImages": "batch_size", "steps": "steps", "cfgScale": "cfg_scale", "width": "width",
    "height": "height", "width x height": "width", "modelId": "override_settings.sd_model_checkpoint",
    "initImage": "init_images[0]", "denoise": "denoising_strength", "mask": "mask", "resizeMode": "resize_mode",
    "hiresFix.scale": "hr_scale", "hiresFix.steps": "hr_second_pass_steps", "hiresFix.denoise": "denoising_strength",
    "hiresFix.upscaleMethod": "hr_upscaler", "hiresFix": "hr_scale", "loras": "prompt",
}


def field_of(service_field: str) -> str:
    """The A1111 field for a field the service named (`numImages` -> `batch_size`; a LoRA's,
    which can only come from a `<lora:...>` tag here -> `prompt`)."""
    if service_field.startswith("loras"):
        return "prompt"
    return _SERVICE_TO_A1111.get(service_field, service_field)


# --- types -------------------------------------------------------------------------------------

_KINDS = {int: "int_type", float: "float_type", str: "string_type", bool: "bool_type"}


def _typed(name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        word = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean"}[k] for k in kinds)
        raise invalid(name, value, f"must be {word}", _KINDS[kinds[0]])
    if isinstance(value, int) and not isinstance(value, bool):
        # Beyond the wire's integer types the request could not even be encoded: refused here.
        bits = 63 if name == "seed" else 31
        if not -(2**bits) <= value < 2**bits:
            raise invalid(name, value, f"out of range ({-(2**bits)} to {2**bits - 1})")
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    with contextlib.suppress(TypeError, ValueError):
        json.dumps(value)
        return value
    return repr(value)


def _shown(value: object) -> str:
    from ..errors import describe

    return describe(value)


def is_a1111_path(path: str) -> bool:
    return path.startswith(PREFIX) or re.fullmatch(r"/sdapi/v1", path) is not None


# --- the edge ------------------------------------------------------------------------------------

def edge_error(message: str) -> dict:
    """Envoy's own replies on /sdapi/v1/ (json_format): FastAPI's {"detail": ...}."""
    return {"detail": message}


ADAPTER = Adapter(
    name="a1111",
    prefix=PREFIX,
    routes=(
        Route("POST", TXT2IMG, wire.MAX_REQUEST_BYTES, "Text to image (A1111 API)"),
        Route("POST", IMG2IMG, wire.MAX_IMAGE_REQUEST_BYTES, "Image to image and inpainting (A1111 API)"),
        Route("GET", SD_MODELS, 0, "The models (A1111 API)"),
        Route("GET", SAMPLERS_PATH, 0, "The samplers, by A1111 label (A1111 API)"),
        Route("GET", SCHEDULERS_PATH, 0, "The schedulers (A1111 API)"),
        Route("GET", LORAS_PATH, 0, "The LoRAs (A1111's Lora extension)"),
        Route("GET", OPTIONS, 0, "The settings that decide an image here (A1111 API, read only)"),
        Route("GET", PROGRESS, 0, "Progress of the caller's own running call (A1111 API)"),
        Route("POST", INTERRUPT, 0, "Stop the caller's own running calls, uncharged (A1111 API)"),
        Route("GET", SCRIPTS, 0, "The scripts: none (A1111 API)"),
    ),
    edge_error=edge_error,
)
