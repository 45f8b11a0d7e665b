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
"""

from __future__ import annotations

import json
import re

from .. import __version__
from ..domain import GenerateRequest
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


def parameters(request: GenerateRequest, seed: int, model_name: str, model_hash: str | None,
               lora_hashes: dict[str, str], index: int = 0) -> str:
    prompt = prompt_line(request.prompt) + "".join(f" <lora:{l.name}:{l.strength:g}>" for l in request.loras)
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
        "Size": f"{request.width}x{request.height}",
    }
    if model_hash:
        fields["Model hash"] = model_hash[:10]
    fields["Model"] = model_name
    if request.num_images > 1:
        fields["Batch size"], fields["Batch pos"] = str(request.num_images), str(index)
    if request.loras:
        fields["Lora hashes"] = ", ".join(f"{l.name}: {lora_hashes[l.name][:12]}" for l in request.loras)
    fields["Version"] = f"illustrious-t2i {__version__}"
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def comfyui_prompt(request: GenerateRequest, seed: int, checkpoint: str, prediction_type: str = EPSILON,
                   zero_terminal_snr: bool = False) -> str:
    """The ComfyUI API-format graph that makes the same image (as a JSON string)."""
    graph: dict[str, dict] = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
    model, clip = ["4", 0], ["4", 1]
    number = 10  # nodes added in a chain are numbered from here, in order
    if prediction_type != EPSILON or zero_terminal_snr:
        graph[str(number)] = {"class_type": "ModelSamplingDiscrete", "inputs": {
            "sampling": COMFYUI_SAMPLING[prediction_type], "zsnr": zero_terminal_snr, "model": model,
        }}
        model, number = [str(number), 0], number + 1
    for lora in request.loras:
        graph[str(number)] = {"class_type": "LoraLoader", "inputs": {
            "lora_name": f"{lora.name}.safetensors", "strength_model": lora.strength, "strength_clip": lora.clip_strength,
            "model": model, "clip": clip,
        }}
        model, clip, number = [str(number), 0], [str(number), 1], number + 1
    if request.cfg_rescale > 0:
        graph[str(number)] = {"class_type": "RescaleCFG", "inputs": {"multiplier": request.cfg_rescale, "model": model}}
        model, number = [str(number), 0], number + 1
    graph["6"] = {"class_type": "CLIPTextEncode", "inputs": {"text": request.prompt, "clip": clip}}
    graph["7"] = {"class_type": "CLIPTextEncode", "inputs": {"text": request.negative_prompt, "clip": clip}}
    graph["5"] = {"class_type": "EmptyLatentImage", "inputs": {
        "width": request.width, "height": request.height, "batch_size": request.num_images,
    }}
    graph["3"] = {"class_type": "KSampler", "inputs": {
        "seed": seed, "steps": request.steps, "cfg": request.cfg_scale, "sampler_name": request.sampler,
        "scheduler": request.scheduler, "denoise": 1.0, "model": model, "positive": ["6", 0], "negative": ["7", 0],
        "latent_image": ["5", 0],
    }}
    graph["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    graph["9"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "illustrious", "images": ["8", 0]}}
    return json.dumps(graph, ensure_ascii=False)
