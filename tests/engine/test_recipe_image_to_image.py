"""The recipe of an image made from a picture, with a mask, or with a hires fix: A1111's
`Denoising strength` and hires fields, in A1111's order and only when they apply, and a ComfyUI
graph that loads the picture by its hash, encodes it into KSampler's latent image, masks it,
resizes it, and upscales and samples again for a hires fix."""

import hashlib
import io
import json

import pytest
from PIL import Image

from t2i.domain import GenerateRequest, HiresFix, LoraSpec
from t2i.engine.recipe import comfyui_prompt, file_name, parameters

from ..support.a1111 import parse_parameters


def picture(width: int, height: int, format: str = "PNG", orientation: int = 0) -> bytes:
    image = Image.new("RGB", (width, height), (200, 120, 40))
    out = io.BytesIO()
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(out, format=format, exif=exif)
    else:
        image.save(out, format=format)
    return out.getvalue()


PICTURE = picture(64, 64)
MASK = picture(64, 64, "WEBP")
BASE = GenerateRequest(model_id=1, prompt="1girl", negative_prompt="lowres", width=64, height=64, steps=12, cfg_scale=5.0,
                       seed=5, sampler="euler_ancestral", scheduler="karras")


def request(**changes) -> GenerateRequest:
    return GenerateRequest(**{**BASE.__dict__, **changes})


def settings_line(text: str) -> str:
    return text.split("\n")[-1]


def keys(text: str) -> list[str]:
    return [key for key in parse_parameters(text) if key not in ("prompt", "negative")]


def graph_of(req: GenerateRequest, **options) -> dict:
    return json.loads(comfyui_prompt(req, 5, "ill.safetensors", **options))


def node(graph: dict, link: list) -> dict:
    assert isinstance(link, list) and link[1] == 0 and link[0] in graph
    return graph[link[0]]


def classes(graph: dict) -> list[str]:
    return sorted(n["class_type"] for n in graph.values())


def decoded_sampler(graph: dict) -> dict:
    """The KSampler whose output VAEDecode reads."""
    decode = next(n for n in graph.values() if n["class_type"] == "VAEDecode")
    sampler = node(graph, decode["inputs"]["samples"])
    assert sampler["class_type"] == "KSampler"
    return sampler


def assert_links_resolve(graph: dict) -> None:
    for each in graph.values():
        for value in each["inputs"].values():
            if isinstance(value, list):
                assert value[0] in graph and isinstance(value[1], int)


# --- A1111 parameters -----------------------------------------------------------------------


PLAIN = parameters(BASE, 5, "ill", "0123456789abcdef", {})
TEXT_TO_IMAGE_KEYS = ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "Version"]


def test_plain_text_to_image_has_none_of_the_new_fields():
    assert keys(PLAIN) == TEXT_TO_IMAGE_KEYS
    for key in ("Denoising strength", "Hires", "Mask"):
        assert key not in PLAIN


@pytest.mark.parametrize("denoise, written", [(0.6, "0.6"), (0.35, "0.35"), (1.0, "1")])
def test_img2img_writes_its_denoising_strength_after_the_model_as_a1111_does(denoise, written):
    text = parameters(request(init_image=PICTURE, denoise=denoise), 5, "ill", "0123456789abcdef", {})
    assert settings_line(text) == settings_line(PLAIN).replace(
        "Model: ill, ", f"Model: ill, Denoising strength: {written}, ")
    assert parse_parameters(text)["Denoising strength"] == written
    assert text.split("\n")[:-1] == PLAIN.split("\n")[:-1]  # the prompts are unchanged


def test_inpainting_writes_the_img2img_fields_and_no_a1111_mask_field():
    img2img = parameters(request(init_image=PICTURE, denoise=0.8), 5, "ill", None, {})
    inpaint = parameters(request(init_image=PICTURE, mask=MASK, denoise=0.8), 5, "ill", None, {})
    assert inpaint == img2img
    assert parse_parameters(inpaint)["Denoising strength"] == "0.8"
    for key in ("Mask blur", "Masked content", "Inpaint area", "Mask mode"):
        assert key not in inpaint


def test_hires_fix_writes_its_fields_in_a1111_order_and_the_first_pass_size():
    hires = HiresFix(scale=1.5, upscale_method="bicubic", steps=8, denoise=0.45)
    text = parameters(request(hires_fix=hires, num_images=2), 5, "ill", "0123456789abcdef", {"a": "ab" * 32},
                      index=1)
    read = parse_parameters(text)
    assert keys(text) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
                          "Batch size", "Batch pos", "Denoising strength", "Hires upscale", "Hires steps",
                          "Hires upscaler", "Version"]
    assert (read["Denoising strength"], read["Hires upscale"], read["Hires steps"], read["Hires upscaler"]) == (
        "0.45", "1.5", "8", "Latent (bicubic)")
    assert read["Size"] == "64x64"  # A1111 writes the first pass's size; Hires upscale gives the output
    assert "Batch pos: 1, Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 8, Hires upscaler: Latent (bicubic), " \
           "Version: " in text


def test_hires_steps_are_written_only_when_set_and_lora_hashes_come_after_the_hires_fields():
    text = parameters(request(hires_fix=HiresFix(scale=2.0), loras=(LoraSpec("a", 0.5),)), 5, "ill", None,
                      {"a": "cd" * 32})
    assert keys(text) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model",
                          "Denoising strength", "Hires upscale", "Hires upscaler", "Lora hashes", "Version"]
    read = parse_parameters(text)
    assert (read["Denoising strength"], read["Hires upscale"], read["Hires upscaler"]) == (
        "0.5", "2", "Latent (nearest-exact)")


@pytest.mark.parametrize("method, label", [
    ("", "Latent (nearest-exact)"), ("nearest-exact", "Latent (nearest-exact)"), ("bilinear", "Latent"),
    ("bicubic", "Latent (bicubic)"), ("area", "Latent (area)"),
])
def test_hires_upscaler_is_a1111s_label_of_the_same_interpolation(method, label):
    text = parameters(request(hires_fix=HiresFix(scale=2.0, upscale_method=method)), 5, "ill", None, {})
    assert parse_parameters(text)["Hires upscaler"] == label


def test_a_picture_with_a_hires_fix_keeps_both_denoising_strengths():
    text = parameters(request(init_image=PICTURE, denoise=0.7, hires_fix=HiresFix(scale=2.0, denoise=0.4)), 5, "ill",
                      None, {})
    read = parse_parameters(text)
    assert read["Denoising strength"] == "0.7" and read["Hires denoising strength"] == "0.4"
    assert keys(text) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model",
                          "Denoising strength", "Hires upscale", "Hires upscaler", "Hires denoising strength", "Version"]


def test_the_new_fields_do_not_open_a_way_to_forge_lines():
    forged = "1girl\nNegative prompt: forged\nSteps: 99, Denoising strength: 0.01, Hires upscale: 4"
    text = parameters(request(prompt=forged, init_image=PICTURE, denoise=0.6, hires_fix=HiresFix(scale=2.0)), 5,
                      "ill", None, {})
    read = parse_parameters(text)
    assert len(text.splitlines()) == 3
    assert read["negative"] == "lowres" and read["Steps"] == "12"
    assert read["Denoising strength"] == "0.6" and read["Hires upscale"] == "2"


# --- ComfyUI graph --------------------------------------------------------------------------


def test_text_to_image_graph_is_unchanged():
    graph = graph_of(BASE)
    assert classes(graph) == sorted(["CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode", "EmptyLatentImage",
                                     "KSampler", "VAEDecode", "SaveImage"])
    assert graph["3"]["inputs"]["latent_image"] == ["5", 0] and graph["3"]["inputs"]["denoise"] == 1.0


def test_img2img_encodes_the_picture_into_the_samplers_latent_image():
    graph = graph_of(request(init_image=PICTURE, denoise=0.55))
    assert_links_resolve(graph)
    assert classes(graph) == sorted(["CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode", "LoadImage",
                                     "VAEEncode", "KSampler", "VAEDecode", "SaveImage"])
    sampler = graph["3"]["inputs"]
    assert sampler["denoise"] == 0.55
    encode = node(graph, sampler["latent_image"])
    assert encode["class_type"] == "VAEEncode" and encode["inputs"]["vae"] == ["4", 2]
    load = node(graph, encode["inputs"]["pixels"])
    assert load == {"class_type": "LoadImage", "inputs": {"image": hashlib.sha256(PICTURE).hexdigest() + ".png"}}
    assert decoded_sampler(graph) is graph["3"]


def test_pictures_are_named_by_the_sha256_of_their_bytes_and_their_format():
    jpeg, webp = picture(64, 64, "JPEG"), picture(64, 64, "WEBP")
    assert file_name(PICTURE) == hashlib.sha256(PICTURE).hexdigest() + ".png"
    assert file_name(jpeg) == hashlib.sha256(jpeg).hexdigest() + ".jpg"
    assert file_name(webp) == hashlib.sha256(webp).hexdigest() + ".webp"
    graph = graph_of(request(init_image=jpeg))
    assert [n["inputs"]["image"] for n in graph.values() if n["class_type"] == "LoadImage"] == [file_name(jpeg)]


def test_several_images_repeat_the_encoded_picture():
    graph = graph_of(request(init_image=PICTURE, num_images=3))
    repeat = node(graph, graph["3"]["inputs"]["latent_image"])
    assert repeat["class_type"] == "RepeatLatentBatch" and repeat["inputs"]["amount"] == 3
    assert node(graph, repeat["inputs"]["samples"])["class_type"] == "VAEEncode"
    assert "RepeatLatentBatch" not in classes(graph_of(request(init_image=PICTURE)))


@pytest.mark.parametrize("images", [1, 2])
def test_a_mask_sets_the_latent_noise_mask_and_only_a_mask_does(images):
    graph = graph_of(request(init_image=PICTURE, mask=MASK, denoise=0.9, num_images=images))
    assert_links_resolve(graph)
    masked = node(graph, graph["3"]["inputs"]["latent_image"])
    assert masked["class_type"] == "SetLatentNoiseMask"
    samples = node(graph, masked["inputs"]["samples"])
    assert samples["class_type"] == ("VAEEncode" if images == 1 else "RepeatLatentBatch")
    load = node(graph, masked["inputs"]["mask"])
    assert load == {"class_type": "LoadImageMask",
                    "inputs": {"image": hashlib.sha256(MASK).hexdigest() + ".webp", "channel": "red"}}
    for unmasked in (request(init_image=PICTURE, num_images=images), BASE):
        assert not {"SetLatentNoiseMask", "LoadImageMask"} & set(classes(graph_of(unmasked)))


@pytest.mark.parametrize("init", [b"", PICTURE])
def test_hires_fix_upscales_the_first_pass_and_samples_it_again(init):
    hires = HiresFix(scale=1.5, upscale_method="bilinear", steps=7, denoise=0.45)
    graph = graph_of(request(init_image=init, denoise=0.8 if init else 1.0, hires_fix=hires))
    assert_links_resolve(graph)
    assert classes(graph).count("KSampler") == 2
    second = decoded_sampler(graph)
    assert second is not graph["3"]
    upscale = node(graph, second["inputs"]["latent_image"])
    assert upscale["class_type"] == "LatentUpscaleBy"
    assert upscale["inputs"] == {"upscale_method": "bilinear", "scale_by": 1.5, "samples": ["3", 0]}
    first, second = graph["3"]["inputs"], second["inputs"]
    assert first["denoise"] == (0.8 if init else 1.0) and first["steps"] == 12
    assert second["denoise"] == 0.45 and second["steps"] == 7
    for same in ("seed", "cfg", "sampler_name", "scheduler", "model", "positive", "negative"):
        assert second[same] == first[same]


def test_hires_steps_default_to_the_requests_and_the_method_to_nearest_exact():
    graph = graph_of(request(hires_fix=HiresFix(scale=2.0)))
    second = decoded_sampler(graph)["inputs"]
    assert second["steps"] == 12 and second["denoise"] == 0.5
    assert node(graph, second["latent_image"])["inputs"]["upscale_method"] == "nearest-exact"


@pytest.mark.parametrize("prediction, zsnr, rescale, chain", [
    ("epsilon", False, 0.7, ["RescaleCFG", "CheckpointLoaderSimple"]),
    ("v_prediction", True, 0.7, ["RescaleCFG", "ModelSamplingDiscrete", "CheckpointLoaderSimple"]),
    ("v_prediction", True, 0.0, ["ModelSamplingDiscrete", "CheckpointLoaderSimple"]),
])
def test_both_samplers_take_the_model_through_the_sampling_and_rescale_nodes(prediction, zsnr, rescale, chain):
    req = request(init_image=PICTURE, mask=MASK, num_images=2, denoise=0.6, cfg_rescale=rescale,
                  loras=(LoraSpec("a", 0.8),), hires_fix=HiresFix(scale=2.0))
    graph = json.loads(comfyui_prompt(req, 5, "noob.safetensors", prediction, zsnr))
    assert_links_resolve(graph)
    samplers = [n for n in graph.values() if n["class_type"] == "KSampler"]
    assert len(samplers) == 2 and samplers[0]["inputs"]["model"] == samplers[1]["inputs"]["model"]
    link, found = samplers[0]["inputs"]["model"], []
    while True:
        found.append(graph[link[0]]["class_type"])
        if found[-1] == "CheckpointLoaderSimple":
            break
        link = graph[link[0]]["inputs"]["model"]
    assert [c for c in found if c != "LoraLoader"] == chain and found.count("LoraLoader") == 1
    assert len(graph) == len(set(graph))


def test_a_picture_at_the_requested_size_is_not_resized():
    for size in [(64, 64), (68, 70)]:  # its own size, or that cropped to multiples of 8 (VAEEncode's crop)
        graph = graph_of(request(init_image=picture(*size), resize_mode="crop-and-resize"))
        assert "ImageScale" not in classes(graph)


def test_the_picture_size_is_read_after_its_exif_orientation():
    # Stored 64 x 96 with orientation 6: a 96 x 64 picture, the request's size.
    turned = picture(64, 96, "JPEG", orientation=6)
    assert "ImageScale" not in classes(graph_of(request(init_image=turned, width=96, height=64)))
    assert "ImageScale" in classes(graph_of(request(init_image=turned, width=64, height=96)))


def scale_node(graph: dict) -> dict:
    encode = next(n for n in graph.values() if n["class_type"] == "VAEEncode")
    return node(graph, encode["inputs"]["pixels"])


def test_just_resize_stretches_the_picture_with_imagescale():
    graph = graph_of(request(init_image=PICTURE, width=128, height=96))
    scale = scale_node(graph)
    assert scale["class_type"] == "ImageScale"
    assert {k: v for k, v in scale["inputs"].items() if k != "image"} == {
        "upscale_method": "lanczos", "width": 128, "height": 96, "crop": "disabled"}
    assert node(graph, scale["inputs"]["image"])["class_type"] == "LoadImage"


def test_crop_and_resize_crops_the_middle():
    scale = scale_node(graph_of(request(init_image=PICTURE, width=128, height=96, resize_mode="crop-and-resize")))
    assert scale["class_type"] == "ImageScale" and scale["inputs"]["crop"] == "center"
    assert (scale["inputs"]["width"], scale["inputs"]["height"]) == (128, 96)


def test_resize_and_fill_fits_the_picture_and_pads_it_as_a1111_places_it():
    graph = graph_of(request(init_image=picture(100, 50), width=128, height=96, resize_mode="resize-and-fill"))
    pad = scale_node(graph)
    assert pad["class_type"] == "ImagePadForOutpaint"
    scale = node(graph, pad["inputs"]["image"])
    # 100 x 50 inside 128 x 96: 128 x 64, 16 rows above and below.
    assert (scale["inputs"]["width"], scale["inputs"]["height"], scale["inputs"]["crop"]) == (128, 64, "disabled")
    assert {k: v for k, v in pad["inputs"].items() if k != "image"} == {
        "left": 0, "top": 16, "right": 0, "bottom": 16, "feathering": 0}
    # The picture's own aspect: a plain resize.
    same = scale_node(graph_of(request(init_image=picture(64, 48), width=128, height=96, resize_mode="resize-and-fill")))
    assert same["class_type"] == "ImageScale" and same["inputs"]["crop"] == "disabled"


def test_the_picture_size_given_by_the_caller_wins_over_the_header():
    req = request(init_image=PICTURE, width=128, height=96)
    assert "ImageScale" not in classes(graph_of(req, picture_size=(128, 96)))
    assert "ImageScale" in classes(graph_of(req, picture_size=(64, 64)))
