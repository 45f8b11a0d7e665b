"""What the two diffusers peers (naive_peer.py, dynamic_peer.py) share.

- `PeerPipeline`: one diffusers StableDiffusionXLPipeline on the service's model files, with
  the service's sampler and scheduler names mapped onto diffusers schedulers (one scheduler
  instance per configuration, reused), prompts of any length, and `generate(requests)` that
  serves a list of requests with ONE batched pipeline call.
- `serve(servicer, port)`: the same gRPC contract as the service (GenerateImage), on a port.

The peers get every fair advantage: the service's intra-op thread count (cores - 1 on a CPU,
set in the thread that runs the pipeline, as the service does), a warm-up, the same model
files, the same PNG settings (compress_level 4). They report, in trailing metadata, how long
each request waited between its arrival and the start of its pipeline call (QUEUE_WAIT_KEY)
and how many requests that call served (BATCH_KEY), so the benchmark can show their queues.

Sampler and scheduler mapping (approximate: diffusers has no exact equivalent of most of
ComfyUI's KSampler settings, so the images differ; the cost does not, which is what counts
here). Each diffusers run makes as many UNet evaluations as the service's run would:

| service sampler | diffusers scheduler | steps passed to the pipeline |
| --- | --- | --- |
| euler, euler_cfg_pp | EulerDiscreteScheduler | steps |
| euler_ancestral, euler_ancestral_cfg_pp | EulerAncestralDiscreteScheduler | steps |
| dpm_2 | KDPM2DiscreteScheduler (2 evaluations a step, 2 * steps - 1 in all) | steps |
| dpm_2_ancestral | KDPM2AncestralDiscreteScheduler (likewise) | steps |
| dpmpp_2s_ancestral, ..._cfg_pp | DPMSolverSinglestepScheduler, order 2, sde-dpmsolver++ | 2 * steps - 1 |

CFG++ has no diffusers counterpart: the `_cfg_pp` samplers run as their plain versions.
DPMSolverSinglestep makes one evaluation per step and alternates first- and second-order
updates, so 2 * steps - 1 of its steps are the 2S sampler's steps, each two evaluations.

| service scheduler | diffusers option |
| --- | --- |
| normal | timestep_spacing="linspace" (t = linspace(999, 0, n): the same timesteps) |
| karras | use_karras_sigmas=True |
| exponential | use_exponential_sigmas=True |
| sgm_uniform, simple | timestep_spacing="trailing" |
| ddim_uniform | timestep_spacing="leading" (with the model's steps_offset=1: timesteps 1 + k * stride) |
| beta | use_beta_sigmas=True |

An option a scheduler class does not take is left out (EulerAncestralDiscreteScheduler has no
karras/exponential/beta sigmas in this diffusers, DPMSolverSinglestepScheduler no
timestep_spacing); that run uses the class's default spacing. Requests whose settings map onto
the same diffusers configuration can share a pipeline call (euler with euler_cfg_pp, say).

Prompts: diffusers' own encode_prompt truncates at 77 tokens, while the service encodes every
75-token chunk (ComfyUI's way). So the peers encode prompts the way diffusers users do for long
prompts (A1111 / the lpw community pipelines): each chunk between start and end tokens, both
encoders, the penultimate hidden states concatenated chunk after chunk, the pooled embedding
from the first chunk, and all chunks of all prompts of a call in one forward per encoder. A
call's prompts and negative prompts are padded to the same number of chunks with encodings
of the empty chunk (A1111's padding) because a pipeline call takes one tensor shape.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from t2i.sampling.samplers import TWO_STAGE

QUEUE_WAIT_KEY = "x-bench-queue-wait-s"
BATCH_KEY = "x-bench-batch"
PNG_COMPRESS_LEVEL = 4  # the service's EngineConfig.png_compress_level
CHUNK_TOKENS = 75

SAMPLER_SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_cfg_pp": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "euler_ancestral_cfg_pp": "EulerAncestralDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_ancestral": "KDPM2AncestralDiscreteScheduler",
    "dpmpp_2s_ancestral": "DPMSolverSinglestepScheduler",
    "dpmpp_2s_ancestral_cfg_pp": "DPMSolverSinglestepScheduler",
}
CLASS_OPTIONS = {
    "DPMSolverSinglestepScheduler": (("solver_order", 2), ("algorithm_type", "sde-dpmsolver++"), ("lower_order_final", True)),
}
SCHEDULER_OPTIONS = {
    "normal": (("timestep_spacing", "linspace"),),
    "karras": (("use_karras_sigmas", True),),
    "exponential": (("use_exponential_sigmas", True),),
    "sgm_uniform": (("timestep_spacing", "trailing"),),
    "simple": (("timestep_spacing", "trailing"),),
    "ddim_uniform": (("timestep_spacing", "leading"),),
    "beta": (("use_beta_sigmas", True),),
}
# Schedulers that evaluate once per step, for samplers that evaluate twice per step.
ONE_EVALUATION_PER_STEP = {"DPMSolverSinglestepScheduler"}


@dataclass(frozen=True)
class SchedulerChoice:
    class_name: str
    options: tuple[tuple[str, object], ...]
    pipeline_steps: int


def scheduler_choice(sampler: str, scheduler: str, steps: int) -> SchedulerChoice:
    """The diffusers scheduler (class and options) and pipeline step count for service settings."""
    import diffusers

    class_name = SAMPLER_SCHEDULERS[sampler]
    accepted = set(inspect.signature(getattr(diffusers, class_name).__init__).parameters)
    options = tuple(
        (key, value) for key, value in (*CLASS_OPTIONS.get(class_name, ()), *SCHEDULER_OPTIONS[scheduler]) if key in accepted
    )
    pipeline_steps = 2 * steps - 1 if sampler in TWO_STAGE and class_name in ONE_EVALUATION_PER_STEP else steps
    return SchedulerChoice(class_name, options, max(1, pipeline_steps))


def group_key(request) -> tuple:
    """Requests with the same key can be served by one pipeline call (a GenerateImageRequest)."""
    return (request.width, request.height, request.cfg_scale, scheduler_choice(request.sampler_name, request.scheduler, request.steps))


def torch_threads() -> int:
    """The service's choice on a CPU (EngineConfig.torch_threads = 0): cores - 1."""
    return max(1, (os.cpu_count() or 2) - 1)


def set_torch_threads() -> None:
    # Per thread, as the service does it: call it in the thread that runs the pipeline.
    if not torch.cuda.is_available():
        torch.set_num_threads(torch_threads())


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


class PeerPipeline:
    def __init__(self, model_dir: str | Path) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        from diffusers import StableDiffusionXLPipeline
        from diffusers.models.attention_processor import AttnProcessor2_0
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.pipeline = StableDiffusionXLPipeline.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True).to(device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.pipeline.unet.set_attn_processor(AttnProcessor2_0())  # what the service uses off CUDA
        self.device = device
        self.base_config = dict(self.pipeline.scheduler.config)
        self.schedulers: dict[tuple, object] = {}
        self._empty_chunk: tuple[torch.Tensor, torch.Tensor] | None = None

    def scheduler(self, choice: SchedulerChoice):
        """One scheduler instance per configuration, reused by every call with it."""
        key = (choice.class_name, choice.options)
        if key not in self.schedulers:
            import diffusers

            self.schedulers[key] = getattr(diffusers, choice.class_name).from_config(self.base_config, **dict(choice.options))
        return self.schedulers[key]

    def warm_up(self) -> None:
        from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

        request = pb.GenerateImageRequest(
            model_id=1, prompt="warm-up", negative_prompt="", width=64, height=64, steps=2, cfg_scale=5.0, seed=0,
            sampler_name="euler", scheduler="normal",
        )
        self.generate([request])

    # --- prompts --------------------------------------------------------------------------

    def _chunk_rows(self, tokenizer, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """77-token rows (start, up to 75 tokens, end, padding) for every chunk of every text."""
        ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        rows, counts = [], []
        length = CHUNK_TOKENS + 2
        for tokens in ids:
            chunks = [tokens[i : i + CHUNK_TOKENS] for i in range(0, len(tokens), CHUNK_TOKENS)] or [[]]
            for chunk in chunks:
                row = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
                rows.append(row + [tokenizer.pad_token_id] * (length - len(row)))
            counts.append(len(chunks))
        return rows, counts

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(context (1, 77 * chunks, 2048-ish), pooled (1, dim)) per text, one forward per encoder."""
        p = self.pipeline
        per_encoder = []
        pooled = None
        for index, (tokenizer, encoder) in enumerate(((p.tokenizer, p.text_encoder), (p.tokenizer_2, p.text_encoder_2))):
            rows, counts = self._chunk_rows(tokenizer, texts)
            output = encoder(torch.tensor(rows, device=self.device), output_hidden_states=True)
            hidden = output.hidden_states[-2]
            per_encoder.append([h.reshape(1, -1, h.shape[-1]) for h in torch.split(hidden, counts)])
            if index == 1:
                firsts = torch.tensor([0, *counts[:-1]], device=self.device).cumsum(0)
                pooled = output.text_embeds[firsts]
        return [
            (torch.cat([first, second], dim=-1), pooled[i : i + 1])
            for i, (first, second) in enumerate(zip(*per_encoder))
        ]

    def _pad(self, context: torch.Tensor, chunks: int) -> torch.Tensor:
        if self._empty_chunk is None:
            self._empty_chunk = self.encode([""])[0]
        missing = chunks - context.shape[1] // (CHUNK_TOKENS + 2)
        if missing <= 0:
            return context
        return torch.cat([context, self._empty_chunk[0].repeat(1, missing, 1)], dim=1)

    # --- one pipeline call ------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests) -> list:
        """PIL images for requests (GenerateImageRequest) that share a group_key, in ONE call."""
        keys = {group_key(r) for r in requests}
        if len(keys) != 1:
            raise ValueError(f"one pipeline call serves requests of one configuration, got {len(keys)}")
        first = requests[0]
        choice = scheduler_choice(first.sampler_name, first.scheduler, first.steps)
        encoded = self.encode([r.prompt for r in requests] + [r.negative_prompt for r in requests])
        chunks = max(context.shape[1] for context, _ in encoded) // (CHUNK_TOKENS + 2)
        contexts = torch.cat([self._pad(context, chunks) for context, _ in encoded])
        pooled = torch.cat([p for _, p in encoded])
        n = len(requests)
        self.pipeline.scheduler = self.scheduler(choice)
        return self.pipeline(
            prompt_embeds=contexts[:n],
            negative_prompt_embeds=contexts[n:],
            pooled_prompt_embeds=pooled[:n],
            negative_pooled_prompt_embeds=pooled[n:],
            height=first.height,
            width=first.width,
            num_inference_steps=choice.pipeline_steps,
            guidance_scale=first.cfg_scale,
            generator=[torch.Generator(self.device).manual_seed(r.seed) for r in requests],
            output_type="pil",
        ).images


async def serve(servicer, port: int) -> None:
    """Serve `servicer` (a TextToImageServiceServicer) on 127.0.0.1:port until killed;
    prints "ready" once it takes requests."""
    import grpc
    from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

    server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 * 1024 * 1024)])
    pb_grpc.add_TextToImageServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()
