"""The OpenAI mapping table and its translations, without a server (tests/edge drives them
through Envoy with the real SDK)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from t2i import wire
from t2i.compat import ADAPTERS
from t2i.compat import openai_images as oa
from t2i.domain import GenerateRequest, HiresFix, LoraSpec, ModelInfo
from t2i.errors import ERROR_KINDS

DEMO = ModelInfo(id=1, name="demo", min_size=64, max_size=2880, max_steps=150, max_pixels=2880**2, max_prompt_chunks=8)
SMALL = ModelInfo(id=2, name="small", min_size=256, max_size=768, max_steps=50, max_pixels=768 * 512, max_prompt_chunks=8)
MODELS = [DEMO, SMALL]


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def refused(body: dict, route: str = oa.GENERATIONS, form: bool = False) -> oa.OpenAIError:
    with pytest.raises(oa.OpenAIError) as raised:
        oa.translate(body, route, MODELS, form=form)
    return raised.value


def test_defaults_are_the_domain_requests_and_auto_is_the_models_default_size():
    request = oa.translate({"prompt": "1girl"}, oa.GENERATIONS, MODELS).request
    assert request == GenerateRequest(model_id=1, prompt="1girl", width=1024, height=1024)
    # Within the model's sides and pixel cap: 768 per side, then the largest square of 768x512 pixels.
    assert oa.default_size(SMALL) == (624, 624)
    assert oa.default_size(ModelInfo(2, "s", 256, 768, 50, 768**2, 8)) == (768, 768)
    assert oa.translate({"prompt": "x", "model": "small", "size": "auto"}, oa.GENERATIONS, MODELS).request.width == 624


def test_every_parameter_becomes_what_the_table_says():
    body = {
        "prompt": "p", "model": "2", "n": 3, "size": "512x256", "output_format": "webp", "output_compression": 70,
        "quality": "hd", "style": "vivid", "background": "opaque", "moderation": "low", "user": "u-1",
        "safety_identifier": "s", "complexity": "high", "stream": False, "partial_images": 0, "response_format": "b64_json",
        "negative_prompt": "n", "steps": 9, "cfg_scale": 4.5, "cfg_rescale": 0.7, "seed": 11, "sampler": "dpm_2",
        "scheduler": "karras", "loras": [{"name": "a", "strength": 0.5, "strength_clip": 0.25}, {"name": "b"}],
        "hires_fix": {"scale": 1.5, "denoise": 0.4, "steps": 5, "upscale_method": "bicubic"}, "omit_metadata": True,
    }
    request = oa.translate(body, oa.GENERATIONS, MODELS).request
    assert request == GenerateRequest(
        model_id=2, prompt="p", negative_prompt="n", width=512, height=256, steps=9, cfg_scale=4.5, seed=11,
        sampler="dpm_2", scheduler="karras", loras=(LoraSpec("a", 0.5, 0.25), LoraSpec("b", 1.0, None)), num_images=3,
        omit_metadata=True, output_format="webp", quality=70, cfg_rescale=0.7,
        hires_fix=HiresFix(scale=1.5, upscale_method="bicubic", steps=5, denoise=0.4),
    )


def test_response_format_url_asks_for_links_to_the_same_request():
    plain = oa.translate({"prompt": "p"}, oa.GENERATIONS, MODELS)
    linked = oa.translate({"prompt": "p", "response_format": "url"}, oa.GENERATIONS, MODELS)
    inline = oa.translate({"prompt": "p", "response_format": "b64_json"}, oa.GENERATIONS, MODELS)
    assert (plain.links, linked.links, inline.links) == (False, True, False)
    assert plain.request == linked.request == inline.request
    answer = oa.images_response([], "p", 7, "png", (64, 64), urls=["http://h/jobs/j/images/0"])
    assert answer["data"] == [{"url": "http://h/jobs/j/images/0", "revised_prompt": "p"}]


def test_edits_take_a_form_with_text_values_and_default_to_the_pictures_size():
    picture = png(Image.new("RGB", (100, 60)))
    form = {"prompt": "p", "image": [picture], "n": "2", "steps": "3", "cfg_scale": "6", "denoise": "0.5",
            "omit_metadata": "true", "loras": '[{"name": "a"}]', "size": "", "resize_mode": "crop-and-resize"}
    request = oa.translate(form, oa.EDITS, MODELS, form=True).request
    assert (request.width, request.height, request.init_image, request.num_images) == (0, 0, picture, 2)
    assert (request.steps, request.cfg_scale, request.denoise, request.omit_metadata) == (3, 6, 0.5, True)
    assert request.loras == (LoraSpec("a"),) and request.resize_mode == "crop-and-resize"
    assert oa.translate({"prompt": "p", "image": picture}, oa.EDITS, MODELS, form=True).request.denoise == oa.EDIT_DENOISE
    assert refused({"prompt": "p", "image": picture, "steps": "x"}, oa.EDITS, form=True).code == "invalid_type"
    several = refused({"prompt": "p", "image": [picture, picture]}, oa.EDITS, form=True)
    assert several.param == "image" and "exactly one file" in several.message
    missing = refused({"prompt": "p"}, oa.EDITS, form=True)
    assert (missing.param, missing.code) == ("image", "missing_required_parameter")


def test_an_openai_mask_becomes_ours():
    mask = Image.new("RGBA", (16, 8), (255, 255, 255, 255))
    ImageDraw.Draw(mask).rectangle((0, 0, 7, 7), fill=(255, 255, 255, 0))  # transparent: edit here
    ours = Image.open(io.BytesIO(oa.openai_mask(png(mask), 10_000)))
    assert ours.mode == "L" and ours.getpixel((0, 0)) == 255 and ours.getpixel((15, 0)) == 0
    plain = png(Image.new("L", (16, 8), 255))
    assert oa.openai_mask(plain, 10_000) == plain  # no alpha: already ours (white re-draws)
    with pytest.raises(oa.OpenAIError) as raised:
        oa.openai_mask(png(mask), 100)  # more pixels than the model takes: refused from the header
    assert raised.value.param == "mask" and "16 x 8 = 128 pixels; at most 100" in raised.value.message
    with pytest.raises(oa.OpenAIError) as raised:
        oa.openai_mask(b"not a picture", 10_000)
    assert raised.value.param == "mask" and "not an image" in raised.value.message


@pytest.mark.parametrize("body,param,code", [
    ({}, "prompt", "missing_required_parameter"),
    ({"prompt": 5}, "prompt", "invalid_type"),
    ({"prompt": "p", "n": "2"}, "n", "invalid_type"),
    ({"prompt": "p", "n": True}, "n", "invalid_type"),
    ({"prompt": "p", "cfg_scale": "7"}, "cfg_scale", "invalid_type"),
    ({"prompt": "p", "size": "1024X1024"}, "size", "invalid_value"),
    ({"prompt": "p", "size": "0x64"}, "size", "invalid_value"),
    ({"prompt": "p", "size": " 64x64"}, "size", "invalid_value"),
    ({"prompt": "p", "quality": "ultra"}, "quality", "invalid_value"),
    ({"prompt": "p", "background": "transparent"}, "background", "invalid_value"),
    ({"prompt": "p", "stream": True}, "stream", "invalid_value"),
    ({"prompt": "p", "partial_images": 2}, "partial_images", "invalid_value"),
    ({"prompt": "p", "frame_count": 4}, "frame_count", "invalid_value"),
    ({"prompt": "p", "svg": {}}, "svg", "invalid_value"),
    ({"prompt": "p", "colour": "red"}, "colour", "unknown_parameter"),
    ({"prompt": "p", "resize_mode": "just-resize"}, "resize_mode", "unknown_parameter"),
    ({"prompt": "p", "loras": [{"name": "a", "weight": 1}]}, "loras[0].weight", "unknown_parameter"),
    ({"prompt": "p", "loras": ["a"]}, "loras[0]", "invalid_type"),
    ({"prompt": "p", "loras": [{"name": "a", "strength": "1"}]}, "loras[0].strength", "invalid_type"),
    ({"prompt": "p", "hires_fix": {"scale": 2, "method": "x"}}, "hires_fix.method", "unknown_parameter"),
    ({"prompt": "p", "steps": 2**31}, "steps", "invalid_value"),
    ({"prompt": "p", "seed": 2**63}, "seed", "invalid_value"),
])
def test_what_the_service_never_sees_is_refused_here_naming_the_parameter(body, param, code):
    error = refused(body)
    assert (error.status, error.param, error.code) == (400, param, code), error.message
    assert error.headers[oa.SHOULD_RETRY_HEADER] == "false"
    assert error.body() == {"error": {"message": error.message, "type": "invalid_request_error", "param": param,
                                      "code": code}}


def test_null_means_left_out_and_values_the_service_judges_pass_through():
    request = oa.translate({"prompt": "p", "n": None, "size": None, "steps": 0, "sampler": "lms"}, oa.GENERATIONS,
                           MODELS).request
    assert request.num_images == 1 and request.steps == 0 and request.sampler == "lms"  # the service refuses these


def test_models_are_named_or_numbered():
    assert oa.resolve_model("small", MODELS) is SMALL and oa.resolve_model("2", MODELS) is SMALL
    assert oa.resolve_model(None, MODELS) is DEMO
    missing = pytest.raises(oa.OpenAIError, oa.resolve_model, "gpt-image-1", MODELS).value
    assert (missing.status, missing.code, missing.param) == (404, "model_not_found", "model")
    twins = [DEMO, ModelInfo(3, "demo", 64, 1024, 50, 1024**2, 8)]
    assert [m["id"] for m in oa.models_list(twins, 0)["data"]] == ["1", "3"]  # a shared name is no id
    assert oa.models_list(MODELS, 7) == {"object": "list", "data": [
        {"id": "demo", "object": "model", "created": 7, "owned_by": "illustrious"},
        {"id": "small", "object": "model", "created": 7, "owned_by": "illustrious"},
    ]}


@pytest.mark.parametrize("field,param", [
    ("numImages", "n"), ("width", "size"), ("height", "size"), ("width x height", "size"), ("samplerName", "sampler"),
    ("negativePrompt", "negative_prompt"), ("cfgScale", "cfg_scale"), ("quality", "output_compression"),
    ("outputFormat", "output_format"), ("initImage", "image"), ("mask", "mask"), ("prompt", "prompt"),
    ("hiresFix.upscaleMethod", "hires_fix.upscale_method"), ("loras[1].strength_model", "loras[1].strength"),
    ("loras[0].strength_clip", "loras[0].strength_clip"), ("resizeMode", "resize_mode"), ("modelId", "model"),
])
def test_the_services_field_names_come_back_as_the_parameters_sent(field, param):
    assert oa.param_of(field, oa.GENERATIONS) == param


def test_every_status_the_service_sends_has_an_openai_answer():
    sent = {kind.status for kind in ERROR_KINDS if kind.from_service}
    assert sent == {row.status for row in oa.ERRORS}
    for row in oa.ERRORS:
        error = oa.service_error(row.status, "why", {wire.RETRY_AFTER_HEADER: "3", "x-ratelimit-limit": "9"}, oa.GENERATIONS)
        assert (error.status, error.type, error.code) == (row.http, row.type, row.code)
    quota = oa.service_error("FAILED_PRECONDITION", "insufficient stardust", {}, oa.GENERATIONS)
    assert quota.status == 429 and quota.headers == {oa.SHOULD_RETRY_HEADER: "false"}  # no retry-after: not a rate limit
    limited = oa.service_error("RESOURCE_EXHAUSTED", "rate limit exceeded", {wire.RETRY_AFTER_HEADER: "3",
                                                                             "x-ratelimit-limit": "9"}, oa.GENERATIONS)
    assert limited.headers == {oa.SHOULD_RETRY_HEADER: "true", "retry-after": "3", "x-ratelimit-limit": "9"}
    field = oa.service_error("INVALID_ARGUMENT", "invalid numImages 9: must be 1 to 8", {wire.ERROR_FIELD_HEADER: "numImages"},
                             oa.GENERATIONS)
    assert (field.param, field.message) == ("n", "invalid n (numImages) 9: must be 1 to 8")
    too_large = oa.service_error("RESOURCE_EXHAUSTED", "message larger than max (5 vs. 4)", {}, oa.GENERATIONS)
    assert too_large.status == 500 and too_large.type == "server_error"
    unknown = oa.service_error("DATA_LOSS", "lost", {}, oa.GENERATIONS)
    assert unknown.status == 500


def test_the_adapter_record_states_the_routes_and_caps():
    (adapter,) = [a for a in ADAPTERS if a.name == "openai"]
    assert adapter.prefix == "/v1/" and adapter is oa.ADAPTER
    assert adapter.large_body_paths(wire.MAX_REQUEST_BYTES) == (oa.EDITS,)
    assert {r.path for r in adapter.routes} == {oa.GENERATIONS, oa.EDITS, oa.MODELS, oa.MODELS + "/{model}"}
    assert all(r.path.startswith(adapter.prefix) for r in adapter.routes)


def test_serve_refuses_adapters_whose_loopback_calls_it_would_not_trust(tmp_path):
    """Per-address limits need the adapters' x-forwarded-for to be believed: without loopback in
    --trusted-proxies every caller would share 127.0.0.1. Refused before anything starts."""
    result = subprocess.run(
        [sys.executable, "-m", "t2i", "--log-format", "text", "serve", "--data-dir", str(tmp_path),
         "--trusted-proxies", "10.0.0.0/8", "--compat-port", "0", "--grpc-port", "0", "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--trusted-proxies" in result.stderr and "127.0.0.1" in result.stderr
