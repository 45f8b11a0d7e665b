"""The A1111 mapping tables and translations, without a server (tests/edge/test_a1111_compat.py
drives them through Envoy with `webuiapi`)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from t2i import wire
from t2i.compat import ADAPTERS
from t2i.compat import a1111_api as a1
from t2i.domain import GenerateRequest, HiresFix, ModelInfo
from t2i.engine.recipe import A1111_SAMPLERS, A1111_SCHEDULES
from t2i.sampling import SAMPLER_NAMES, SCHEDULER_NAMES

DEMO = ModelInfo(id=1, name="demo", min_size=64, max_size=2880, max_steps=150, max_pixels=2880**2, max_prompt_chunks=8,
                 checkpoint="demo.safetensors", sha256="ab" * 32)
OTHER = ModelInfo(id=2, name="other", min_size=256, max_size=768, max_steps=50, max_pixels=768 * 512,
                  max_prompt_chunks=8, checkpoint="illustrious-xl.safetensors", sha256="cd" * 32)
MODELS = [OTHER, DEMO]


def webuiapi_payload(**change) -> dict:
    """What `webuiapi.WebUIApi.txt2img()` sends with its defaults (webuiapi 0.9.17)."""
    body = {
        "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
        "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
        "hr_negative_prompt": "", "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
        "prompt": "1girl", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0,
        "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": 20, "cfg_scale": 7.0, "width": 512, "height": 512,
        "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
        "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
        "override_settings_restore_afterwards": True, "sampler_name": "Euler a", "scheduler": "automatic",
        "sampler_index": "Euler a", "script_name": None, "script_args": [], "send_images": True, "save_images": False,
        "alwayson_scripts": {},
    }
    return {**body, **change}


def refused(body: dict, route: str = a1.TXT2IMG) -> a1.A1111Error:
    with pytest.raises(a1.A1111Error) as raised:
        a1.translate(body, route, MODELS)
    return raised.value


def test_webuiapis_default_payload_is_a_plain_request_on_the_first_model():
    request = a1.translate(webuiapi_payload(), a1.TXT2IMG, MODELS).request
    assert request == GenerateRequest(model_id=1, prompt="1girl", width=512, height=512, steps=20, cfg_scale=7.0,
                                      sampler="euler_ancestral", scheduler="normal", prompt_syntax="a1111")


def test_a1111s_own_defaults_when_fields_are_left_out():
    request = a1.translate({"prompt": "1girl"}, a1.TXT2IMG, MODELS).request
    assert (request.steps, request.width, request.height, request.cfg_scale, request.sampler) == (
        a1.DEFAULT_STEPS, 512, 512, 7.0, "euler_ancestral")


@pytest.mark.parametrize(("sampler", "scheduler", "expected"), [
    ("Euler a", None, ("euler_ancestral", "normal")),
    ("euler A", "karras", ("euler_ancestral", "karras")),
    ("DPM++ 2S a Karras", None, ("dpmpp_2s_ancestral", "karras")),
    ("DPM++ 2S a", "Automatic", ("dpmpp_2s_ancestral", "karras")),  # A1111's own default for it
    ("DPM2 a", "SGM Uniform", ("dpm_2_ancestral", "sgm_uniform")),
    ("Euler Exponential", "Karras", ("euler", "exponential")),  # the label in the name wins, as in A1111
    ("k_euler_a", "Uniform", ("euler_ancestral", "normal")),
    ("DPM2", "DDIM", ("dpm_2", "ddim_uniform")),
    (None, None, ("euler_ancestral", "normal")),
])
def test_sampler_and_scheduler_labels(sampler, scheduler, expected):
    assert a1.sampler_and_scheduler(sampler, scheduler) == expected


def test_every_sampler_and_scheduler_has_a_label_that_maps_back():
    assert set(A1111_SAMPLERS) == set(SAMPLER_NAMES) and set(A1111_SCHEDULES) == set(SCHEDULER_NAMES)
    for name, label in A1111_SAMPLERS.items():
        for scheduler, schedule_label in A1111_SCHEDULES.items():
            assert a1.sampler_and_scheduler(label, schedule_label) == (name, scheduler)
    assert {s["name"] for s in a1.samplers_list()} == set(A1111_SAMPLERS.values())


def test_unknown_sampler_is_404_and_unknown_scheduler_422():
    error = refused({"prompt": "x", "sampler_name": "DPM++ 2M"})
    assert error.status == 404 and error.body() == {"detail": error.message} and "Euler a" in error.message
    error = refused({"prompt": "x", "scheduler": "Align Your Steps"})
    assert error.status == 422 and error.body()["detail"][0]["loc"] == ["body", "scheduler"]


def test_batches_hires_and_the_model():
    request = a1.translate({"prompt": "x", "batch_size": 2, "n_iter": 3, "enable_hr": True, "hr_scale": 1.5,
                            "hr_upscaler": "Latent (nearest-exact)", "hr_second_pass_steps": 4,
                            "override_settings": {"sd_model_checkpoint": "illustrious-xl.safetensors [cdcdcdcdcd]",
                                                  "CLIP_stop_at_last_layers": 2}}, a1.TXT2IMG, MODELS).request
    assert request.num_images == 6 and request.model_id == 2
    assert request.hires_fix == HiresFix(scale=1.5, upscale_method="nearest-exact", steps=4, denoise=a1.HIRES_DENOISE)
    # The hires fields are not read without enable_hr.
    assert a1.translate(webuiapi_payload(hr_upscaler="R-ESRGAN 4x+"), a1.TXT2IMG, MODELS).request.hires_fix is None
    for value in ("illustrious-xl", "other", "2", "illustrious-xl.safetensors"):
        assert a1.resolve_model(value, MODELS).id == 2


@pytest.mark.parametrize(("change", "field", "fragment"), [
    ({"restore_faces": True}, "restore_faces", "face restoration"),
    ({"styles": ["anime"]}, "styles", "no saved styles"),
    ({"subseed_strength": 0.3}, "subseed_strength", "variation"),
    ({"s_churn": 0.5}, "s_churn", "churn"),
    ({"script_name": "x/y/z plot"}, "script_name", "scripts"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, "alwayson_scripts.ControlNet", "scripts"),
    ({"override_settings": {"sd_vae": "x"}}, "override_settings.sd_vae", "sd_model_checkpoint"),
    ({"enable_hr": True, "hr_sampler_name": "DPM2"}, "hr_sampler_name", "same as sampler_name"),
    ({"enable_hr": True, "hr_resize_x": 1024}, "hr_resize_x", "hr_scale"),
    ({"enable_hr": True, "hr_upscaler": "Latent (antialiased)"}, "hr_upscaler", "latent upscaler"),
    ({"steps": "20"}, "steps", "integer"),
    ({"cfg_scale": True}, "cfg_scale", "number"),
    ({"seed": 2**64}, "seed", "out of range"),
    ({"steps": 2**40}, "steps", "out of range"),
    ({"init_images": ["x"]}, "init_images", "unknown field"),
])
def test_what_this_service_cannot_do_is_refused_naming_the_field(change, field, fragment):
    error = refused(webuiapi_payload(**change))
    assert error.status == 422
    (detail,) = error.body()["detail"]
    assert detail["loc"] == ["body", *field.split(".")] and fragment in detail["msg"], detail


def test_img2img_maps_the_picture_mode_mask_and_strength():
    picture = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(picture, format="PNG")
    mask = io.BytesIO()
    Image.new("L", (64, 64), 255).save(mask, format="PNG")
    encoded = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    body = {"prompt": "x", "init_images": [encoded], "mask": base64.b64encode(mask.getvalue()).decode(), "resize_mode": 1,
            "inpainting_mask_invert": 1, "mask_blur": 4, "inpainting_fill": 1, "inpaint_full_res": True}
    request = a1.translate(body, a1.IMG2IMG, MODELS).request
    assert request.init_image == picture.getvalue() and request.resize_mode == "crop-and-resize"
    assert request.denoise == a1.IMG2IMG_DENOISE
    inverted = Image.open(io.BytesIO(request.mask))
    assert not np.asarray(inverted).any()  # white became black
    assert refused({"prompt": "x"}, a1.IMG2IMG).field == "init_images"
    assert refused({"prompt": "x", "init_images": [encoded, encoded]}, a1.IMG2IMG).field == "init_images"
    assert refused({"prompt": "x", "init_images": ["%%%"]}, a1.IMG2IMG).field == "init_images[0]"
    assert refused({**body, "resize_mode": 3}, a1.IMG2IMG).field == "resize_mode"


def test_the_services_refusals_in_a1111s_terms():
    error = a1.service_error("INVALID_ARGUMENT", "invalid numImages 9: must be 1 to 8", {wire.ERROR_FIELD_HEADER: "numImages"})
    assert error.status == 422 and error.body()["detail"][0]["loc"] == ["body", "batch_size"]
    lora = a1.service_error("INVALID_ARGUMENT", "no LoRA", {wire.ERROR_FIELD_HEADER: "loras[1].name"})
    assert lora.body()["detail"][0]["loc"] == ["body", "prompt"]
    limited = a1.service_error("RESOURCE_EXHAUSTED", "slow down", {wire.RETRY_AFTER_HEADER: "3"})
    assert limited.status == 429 and limited.headers[wire.RETRY_AFTER_HEADER] == "3" and limited.body() == {"detail": "slow down"}
    denied = a1.service_error("UNAUTHENTICATED", "unknown key", {})
    assert denied.status == 401 and denied.headers["WWW-Authenticate"].startswith("Basic")
    broken = a1.service_error("INTERNAL", "boom", {})
    assert broken.status == 500 and set(broken.body()) == {"error", "detail", "body", "errors"}
    assert a1.service_error("DATA_LOSS", "?", {}).status == 500


def test_the_answer_carries_the_infotexts_and_the_seeds():
    translated = a1.translate({"prompt": "1girl", "batch_size": 2, "seed": 5}, a1.TXT2IMG, MODELS)
    answer = a1.response({"prompt": "1girl"}, translated, [b"a", b"b"], [5, 5], ["one", "two"], DEMO, "20261206000000")
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [5, 5] and info["infotexts"] == ["one", "two"] and info["sd_model_hash"] == "abababab" "ab"
    assert answer["images"] == [base64.b64encode(b"a").decode(), base64.b64encode(b"b").decode()]
    assert answer["parameters"] == {"prompt": "1girl"}


def test_the_adapter_record():
    (adapter,) = [a for a in ADAPTERS if a.name == "a1111"]
    assert adapter is a1.ADAPTER and adapter.large_body_paths(wire.MAX_REQUEST_BYTES) == (a1.IMG2IMG,)
    assert all(route.path.startswith(a1.PREFIX) for route in adapter.routes)
    assert {f.kind for f in a1.FIELDS} <= {"string", "integer", "number", "boolean", "object", "array"}
