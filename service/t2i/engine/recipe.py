"""The recipe an image carries: A1111's "parameters" text and ComfyUI's "prompt" graph.

`parameters` is what A1111 writes and what Civitai and image browsers read:

    <prompt> <lora:NAME:STRENGTH>...
    Negative prompt: <negative prompt>
    Steps: 28, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, CFG Rescale φ: 0.7, Seed: 1, Size: 512x512, Model hash: ..., Model: ..., Lora hashes: "NAME: HASH, ..."

(A1111's sampler and schedule display names; its short model hash, the first 10 hex digits of
the SHA-256 of the checkpoint file; its LoRA hash, 12 hex digits of the SHA-256 of the tensor
data; a value with a comma, colon or quote is JSON-quoted, as A1111 quotes it; `CFG Rescale φ`,
as A1111's CFG-rescale option writes it, only when the request has one.) `prompt` is the
equivalent ComfyUI API-format graph: checkpoint loader, a ModelSamplingDiscrete node for a
v-prediction model (the graph must say so: a diffusers folder, or a models file that sets the
prediction, is not what ComfyUI reads from the file), the LoRA loaders, a RescaleCFG node when
the request has cfgRescale, two text encodes, an empty latent of the batch size, KSampler, VAE
decode and save, so that dropping the image into ComfyUI gives the same settings.

`parameters` is read by lines: A1111 takes its last line as the settings and a line starting
with "Negative prompt:" as the start of the negative prompt, so a prompt's own line breaks
could forge either. The prompt and the negative prompt are therefore written on one line each,
as the text encoder reads them: every line break (\n, \r, U+2028, U+2029) becomes a space, and
a prompt that begins with "Negative prompt:" has those words in lower case. Neither changes the
image: ComfyUI and CLIP read a line break as a space and lower-case all text, so pasting the
recipe back gives the same conditioning. The exact text is in the `prompt` graph (JSON).

Image to image, inpainting and hires fix (docs/image-to-image.md):

`parameters` adds, in A1111's order (after `Batch pos`, before `Lora hashes`, which A1111 adds
last as an extra network's field):

    Denoising strength: D, Hires upscale: S, Hires steps: N, Hires upscaler: Latent (nearest-exact)

- `Denoising strength` is written whenever the request has a picture (A1111's img2img always
  writes it, 1 included): the request's denoise. With a hires fix and no picture it is the
  hires denoise, as A1111's txt2img writes it. With both, `Denoising strength` stays the
  picture's denoise (A1111 pastes it into img2img, which is what an image with a picture is),
  and the hires denoise follows the hires fields as `Hires denoising strength`, a key of this
  service (A1111 has one key for both and ignores keys it does not know).
- `Size` is the first pass's size (the request's width x height) even with a hires fix: A1111
  writes `p.width x p.height`, the first pass, and derives the output from `Hires upscale`;
  pasting the output size would upscale twice.
- `Hires steps` only when the hires fix sets its own (non-zero), as A1111 writes it.
- `Hires upscaler` is A1111's label of the latent mode that is the same torch interpolation:
  nearest-exact is "Latent (nearest-exact)", bilinear "Latent", bicubic "Latent (bicubic)"
  (no antialias, as ComfyUI). A1111 has no area mode: it is written "Latent (area)", after
  A1111's "Latent (<torch mode>)" labels, so a reader that maps the mode in the parentheses
  finds it; A1111 itself does not know it. (For an integer scale, area upsampling equals
  nearest-exact.)
- A mask adds no field: A1111 writes mask fields only for what it does besides the plain case
  (`Mask blur` when above 0, `Masked content` other than original, `Inpaint area` only masked),
  and a latent noise mask is that plain case: no blur, the original content, the whole picture.

The `prompt` graph, with a picture: `LoadImage` (the file named `<SHA-256 hex of the caller's
file bytes>.<png|jpg|webp>`, the extension of the bytes' own format: save the picture under that
name in ComfyUI's input folder), an image resize when the request's size is not the picture's
own, `VAEEncode` (the checkpoint's VAE), `RepeatLatentBatch` for several images, and, with a
mask, `LoadImageMask` (channel red, named the same way by the mask's bytes) and
`SetLatentNoiseMask`; the result is KSampler's latent image and KSampler's denoise the
request's. The resize modes are A1111's, and core ComfyUI has an exact node for one of them:
- just-resize: `ImageScale` (lanczos, width, height, crop disabled), the picture stretched;
- crop-and-resize: `ImageScale` with crop center, which crops the picture to the target's
  aspect around its middle and then scales, where A1111 scales and then crops (the same
  picture up to a pixel's rounding at the edges);
- resize-and-fill: `ImageScale` to A1111's fitted size (the whole picture inside width x height,
  centred as A1111 centres it) and `ImagePadForOutpaint` (feathering 0) to width x height. The
  picture is placed as A1111 places it, but ComfyUI fills the bands with mid gray where A1111
  stretches the picture's edge pixels: not exact in the bands.
The mask goes to `SetLatentNoiseMask` as it is: ComfyUI stretches it from its own full size to
the latent (docs/image-to-image.md 5), whatever the resize mode.
With a hires fix: `LatentUpscaleBy` (the method, scale_by) on the first KSampler's output and a
second KSampler (the same seed, sampler, scheduler, cfg, model and prompts; the hires steps, or
the request's; the hires denoise) whose output is decoded. A noise mask set on the first pass's
latent stays on it through LatentUpscaleBy in ComfyUI, so a masked hires pass is masked too.
"""

from __future__ import annotations

import hashlib
import io
import json
import re

from .. import __version__
from ..domain import GenerateRequest
from ..prompts.a1111 import parse_a1111
from ..sampling import EPSILON, V_PREDICTION

A1111_SAMPLERS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
    "dpmpp_2s_ancestral": "DPM++ 2S a", "euler_cfg_pp": "Euler CFG++", "euler_ancestral_cfg_pp": "Euler a CFG++",
    "dpmpp_2s_ancestral_cfg_pp": "DPM++ 2S a CFG++",
}
# ModelSamplingDiscrete's names for the prediction types.
COMFYUI_SAMPLING = {EPSILON: "eps", V_PREDICTION: "v_prediction"}
A1111_SCHEDULES = {
    "normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
    "simple": "Simple", "ddim_uniform": "DDIM", "beta": "Beta",
}
# A1111's hires upscalers (`latent_upscale_modes`) that interpolate as ComfyUI's LatentUpscaleBy
# does; area has none (see the module's docstring).
A1111_LATENT_UPSCALERS = {
    "nearest-exact": "Latent (nearest-exact)", "bilinear": "Latent", "bicubic": "Latent (bicubic)",
    "area": "Latent (area)",
}
# ImageScale's method for a picture resized to the request's size.
PICTURE_UPSCALE_METHOD = "lanczos"


# Whatever a reader may split lines at (str.splitlines() also splits at \v, \f, \x1c-\x1e and
# \x85, but validation refuses those control characters in prompts).
LINE_BREAKS = re.compile("[\r\n\u2028\u2029]")
NEGATIVE_LABEL = "Negative prompt:"


def one_line(text: str) -> str:
    """`text` as one line of `parameters`, read by the text encoder exactly as `text` is."""
    return LINE_BREAKS.sub(" ", text)


def prompt_line(prompt: str) -> str:
    """The first line of `parameters`: the prompt, which no reader may take for the negative."""
    line = one_line(prompt)
    body = line.lstrip()  # readers strip a line before they look at how it starts
    if body.startswith(NEGATIVE_LABEL):
        line = line[: len(line) - len(body)] + NEGATIVE_LABEL.lower() + body[len(NEGATIVE_LABEL):]
    return line


def quote(value: str) -> str:
    """A1111's quoting of an infotext value."""
    if "," not in value and "\n" not in value and ":" not in value and '"' not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def denoising_fields(request: GenerateRequest) -> dict[str, str]:
    """The image-to-image and hires-fix fields of `parameters`, in A1111's order."""
    fields: dict[str, str] = {}
    hires = request.hires_fix
    if request.init_image:
        fields["Denoising strength"] = f"{request.denoise:g}"
    elif hires is not None:
        fields["Denoising strength"] = f"{hires.denoise:g}"
    if hires is not None:
        fields["Hires upscale"] = f"{hires.scale:g}"
        if hires.steps:
            fields["Hires steps"] = str(hires.steps)
        fields["Hires upscaler"] = A1111_LATENT_UPSCALERS.get(hires.method, f"Latent ({hires.method})")
        if request.init_image:
            fields["Hires denoising strength"] = f"{hires.denoise:g}"
    return fields


def parameters(request: GenerateRequest, seed: int, model_name: str, model_hash: str | None,
               lora_hashes: dict[str, str], index: int = 0) -> str:
    # A1111-syntax prompts carry their own <lora:...> tags; the other LoRAs are written as tags.
    tagged = {tag.name for tag in parse_a1111(request.prompt).loras} if request.syntax == "a1111" else set()
    prompt = prompt_line(request.prompt) + "".join(
        f" <lora:{l.name}:{l.strength:g}>" for l in request.loras if l.name not in tagged
    )
    lines = [prompt]
    if request.negative_prompt:
        lines.append(f"{NEGATIVE_LABEL} {one_line(request.negative_prompt)}")
    fields = {
        "Steps": str(request.steps),
        "Sampler": A1111_SAMPLERS[request.sampler],
        "Schedule type": A1111_SCHEDULES[request.scheduler],
        "CFG scale": f"{request.cfg_scale:g}",
    }
    if request.cfg_rescale > 0:
        fields["CFG Rescale φ"] = f"{request.cfg_rescale:g}"
    fields |= {
        "Seed": str(seed),
        "Size": f"{request.width}x{request.height}",  # the first pass's, as A1111 writes it
    }
    if model_hash:
        fields["Model hash"] = model_hash[:10]
    fields["Model"] = model_name
    if request.num_images > 1:
        fields["Batch size"], fields["Batch pos"] = str(request.num_images), str(index)
    fields |= denoising_fields(request)
    if request.loras:
        fields["Lora hashes"] = ", ".join(f"{l.name}: {lora_hashes[l.name][:12]}" for l in request.loras)
    fields["Version"] = f"illustrious-t2i {__version__}"
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def file_name(data: bytes) -> str:
    """The name a picture's graph node gives the caller's file: its SHA-256 (hex) and the
    extension of its format (PNG, JPEG or WebP, by their signatures; png otherwise)."""
    if data.startswith(b"\xff\xd8\xff"):
        extension = "jpg"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        extension = "webp"
    else:
        extension = "png"
    return f"{hashlib.sha256(data).hexdigest()}.{extension}"


def picture_size_of(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a picture file after its EXIF orientation, from its header (no pixels
    are decoded); None when Pillow cannot read it."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that turn it a quarter
                width, height = height, width
            return width, height
    except Exception:
        return None


def fitted(size: tuple[int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """A1111's resize-and-fill: the picture's size inside width x height, and its left and top."""
    picture_width, picture_height = size
    if width * picture_height < picture_width * height:  # the picture is wider than the target
        inner_width, inner_height = width, max(1, picture_height * width // picture_width)
    else:
        inner_width, inner_height = max(1, picture_width * height // picture_height), height
    return inner_width, inner_height, width // 2 - inner_width // 2, height // 2 - inner_height // 2


def comfyui_prompt(request: GenerateRequest, seed: int, checkpoint: str, prediction_type: str = EPSILON,
                   zero_terminal_snr: bool = False, *, picture_size: tuple[int, int] | None = None) -> str:
    """The ComfyUI API-format graph that makes the same image (as a JSON string).

    `picture_size`: the request's picture's (width, height) after its EXIF orientation, before
    any crop or resize; None: read from the picture's header (a header Pillow cannot read: no
    resize). It decides whether the picture is resized: not when the request's size is the
    picture's own, or that cropped to multiples of 8 (VAEEncode crops the middle itself)."""
    graph: dict[str, dict] = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
    model, clip, vae = ["4", 0], ["4", 1], ["4", 2]
    number = 10  # nodes added in a chain are numbered from here, in order

    def add(class_type: str, inputs: dict) -> list:
        nonlocal number
        graph[str(number)] = {"class_type": class_type, "inputs": inputs}
        number += 1
        return [str(number - 1), 0]

    if prediction_type != EPSILON or zero_terminal_snr:
        model = add("ModelSamplingDiscrete", {
            "sampling": COMFYUI_SAMPLING[prediction_type], "zsnr": zero_terminal_snr, "model": model,
        })
    for lora in request.loras:
        node = add("LoraLoader", {
            "lora_name": f"{lora.name}.safetensors", "strength_model": lora.strength, "strength_clip": lora.clip_strength,
            "model": model, "clip": clip,
        })
        model, clip = node, [node[0], 1]
    if request.cfg_rescale > 0:
        model = add("RescaleCFG", {"multiplier": request.cfg_rescale, "model": model})
    graph["6"] = {"class_type": "CLIPTextEncode", "inputs": {"text": request.prompt, "clip": clip}}
    graph["7"] = {"class_type": "CLIPTextEncode", "inputs": {"text": request.negative_prompt, "clip": clip}}
    if request.init_image:
        latent = _picture_latent(request, add, vae, picture_size)
        denoise = request.denoise
    else:
        graph["5"] = {"class_type": "EmptyLatentImage", "inputs": {
            "width": request.width, "height": request.height, "batch_size": request.num_images,
        }}
        latent, denoise = ["5", 0], 1.0

    def sampler(steps: int, denoise: float, latent: list) -> dict:
        return {
            "seed": seed, "steps": steps, "cfg": request.cfg_scale, "sampler_name": request.sampler,
            "scheduler": request.scheduler, "denoise": denoise, "model": model, "positive": ["6", 0],
            "negative": ["7", 0], "latent_image": latent,
        }

    graph["3"] = {"class_type": "KSampler", "inputs": sampler(request.steps, denoise, latent)}
    samples = ["3", 0]
    hires = request.hires_fix
    if hires is not None:  # the same seed, sampler, scheduler, cfg, model and prompts
        upscaled = add("LatentUpscaleBy", {"upscale_method": hires.method, "scale_by": hires.scale, "samples": samples})
        samples = add("KSampler", sampler(hires.steps or request.steps, hires.denoise, upscaled))
    graph["8"] = {"class_type": "VAEDecode", "inputs": {"samples": samples, "vae": vae}}
    graph["9"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "illustrious", "images": ["8", 0]}}
    return json.dumps(graph, ensure_ascii=False)


def _picture_latent(request: GenerateRequest, add, vae: list, picture_size: tuple[int, int] | None) -> list:
    """The nodes from the picture (and the mask) to the first KSampler's latent image."""
    image = add("LoadImage", {"image": file_name(request.init_image)})
    size = picture_size or picture_size_of(request.init_image)
    width, height = request.width, request.height
    own = size is None or (width, height) in (size, (size[0] // 8 * 8, size[1] // 8 * 8))
    if not own:
        mode = request.resize
        if mode == "resize-and-fill" and width * size[1] != height * size[0]:
            inner_width, inner_height, left, top = fitted(size, width, height)
            image = add("ImageScale", {
                "upscale_method": PICTURE_UPSCALE_METHOD, "width": inner_width, "height": inner_height,
                "crop": "disabled", "image": image,
            })
            image = add("ImagePadForOutpaint", {
                "left": left, "top": top, "right": width - inner_width - left, "bottom": height - inner_height - top,
                "feathering": 0, "image": image,
            })
        else:  # just-resize, crop-and-resize, and a fill at the picture's own aspect
            image = add("ImageScale", {
                "upscale_method": PICTURE_UPSCALE_METHOD, "width": width, "height": height,
                "crop": "center" if mode == "crop-and-resize" else "disabled", "image": image,
            })
    latent = add("VAEEncode", {"pixels": image, "vae": vae})
    if request.num_images > 1:
        latent = add("RepeatLatentBatch", {"amount": request.num_images, "samples": latent})
    if request.mask:
        mask = add("LoadImageMask", {"image": file_name(request.mask), "channel": "red"})
        latent = add("SetLatentNoiseMask", {"samples": latent, "mask": mask})
    return latent

