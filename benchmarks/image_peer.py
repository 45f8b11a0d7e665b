"""The dynamic-batching peer for image requests: text-to-image, image to image, inpainting and
hires fix on diffusers' SDXL pipelines, behind the same gRPC contract as the service.

    python -m benchmarks.image_peer MODEL_DIR PORT [--window-ms 20 --max-batch 8]

The same dynamic batching as benchmarks/dynamic_peer.py (the service's settings: 20 ms
admission window, max batch 8), over the pipeline calls that diffusers users make:

| request | pipeline calls |
| --- | --- |
| text-to-image | StableDiffusionXLPipeline |
| image to image (initImage, denoise) | StableDiffusionXLImg2ImgPipeline, strength = denoise |
| inpainting (initImage, mask, denoise) | StableDiffusionXLInpaintPipeline, strength = denoise |
| hires fix | StableDiffusionXLPipeline with output_type="latent"; the latent upscaled by scale with torch's interpolate (the request's upscale method, nearest-exact by default); then StableDiffusionXLImg2ImgPipeline on that latent, strength = the hires denoise |

The three pipelines share one set of components (the same model files as the service; the image
pipelines are built from the text-to-image one with `from_pipe`, so no weight is loaded twice).

Batching rule: the work is queued as passes (a hires fix is two passes). When the pipelines are
free, the oldest waiting pass picks the batch: every waiting pass that ONE pipeline call can serve
with it (`pass_key`), oldest first, at most max batch, started when full or when its oldest pass
has waited the window (at once if it waited longer, behind a running call). One call serves
passes of the same pipeline, size, cfg scale, diffusers scheduler configuration and step count
(dynamic_peer's rule) and, for the image pipelines, the same strength (diffusers takes one
strength per call) and the same kind of input (pictures, or latents for a hires fix's second
pass: a call takes one or the other). A hires fix's first pass shares a text-to-image call with
plain text-to-image requests of the same key: the call returns latents, and the plain requests'
latents are decoded in one batched VAE call as the pipeline itself would (`decode_latents`).
The second pass of a hires fix joins the queue at its request's arrival time, so it is served
before anything that came later.

Step counts. The scheduler class and options are the existing peer's mapping
(diffusers_peer.scheduler_choice). A partial pass (denoise < 1) runs, on the service as in
ComfyUI, `steps` steps of the tail of an int(steps / denoise)-step schedule, whereas a diffusers
image pipeline with N steps and strength s runs the last int(N * s) of N steps. So the peer takes
the smallest N with which the pipeline makes exactly as many UNet evaluations as the service's
pass (t2i.passes; `partial_steps` has diffusers' count); full passes too, where it differs from
the existing peer only for ddim_uniform, whose ComfyUI schedule mostly has one step more than
asked. The cost is the same, the images differ.

Pictures and masks are decoded (EXIF orientation, RGB; the mask's red channel) on the PNG
threads as the request arrives, not on the pipeline's thread. Diffusers samples the picture's
latent from the VAE posterior where the service takes its mean; the cost is the same.

Each answer carries in trailing metadata its queue wait (arrival to the start of its first
pipeline call) and the mean number of passes its calls served (diffusers_peer.QUEUE_WAIT_KEY,
BATCH_KEY). A request whose caller went away is dropped from the queue (its second pass
included); one already in a call is finished and thrown away.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import functools
import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from t2i.domain import GenerateRequest
from t2i.passes import DenoisePass, plan
from t2i.sampling import SigmaTable
from t2i.server.convert import request_from_pb
from t2i.settings import EngineConfig

from .diffusers_peer import (
    BATCH_KEY, CHUNK_TOKENS, QUEUE_WAIT_KEY, PeerPipeline, SchedulerChoice, encode_png, scheduler_choice, serve,
    set_torch_threads,
)
from .dynamic_peer import next_batch

TEXT, IMAGE, INPAINT, REFINE = "txt2img", "img2img", "inpaint", "img2img-latent"


# --- step counts and call keys (pure: no pipeline needed) -------------------------------------------

@functools.cache
def _order(class_name: str) -> int:
    import diffusers

    return getattr(diffusers, class_name).order


@functools.cache
def partial_steps(class_name: str, strength: float, evaluations: int) -> int:
    """num_inference_steps with which a diffusers image pipeline at `strength` makes
    `evaluations` UNet evaluations (the nearest count when none makes exactly that many; the
    smallest such N). The pipeline runs scheduler.timesteps[t_start * order:], one evaluation per
    timestep, with t_start = N - min(int(N * strength), N) (get_timesteps); every scheduler of the
    mapping has order * N - (order - 1) timesteps for N steps (KDPM2's are doubled but the first),
    whatever its options (checked for all of them, N 1 to 150), so the count is
    order * min(int(N * strength), N) - (order - 1)."""
    order = _order(class_name)

    def made(n: int) -> int:
        init = min(int(n * strength), n)
        return order * init - (order - 1) if init >= 1 else 0  # 0: the pipeline refuses a run of no steps

    n = 1
    while made(n) < evaluations:  # it never falls as N grows: the first N to reach the count
        n += 1
    if made(n) > evaluations and n > 1 and evaluations - made(n - 1) < made(n) - evaluations:
        return n - 1  # one count short is nearer than the one reached
    return n


@dataclass(frozen=True)
class CallKey:
    """What one pipeline call takes once for all its rows: passes with equal keys can share it."""

    pipeline: str  # TEXT, IMAGE, INPAINT or REFINE
    width: int
    height: int
    cfg_scale: float
    scheduler: SchedulerChoice  # class, options and num_inference_steps
    strength: float  # 1.0 for text-to-image


def pass_key(request: GenerateRequest, index: int) -> CallKey:
    """The call key of a request's pass: `index` 0 is the first pass, 1 a hires fix's second.
    num_inference_steps makes the service's evaluation count (`partial_steps`; a full pass too, so
    that ddim_uniform's extra step, which diffusers_peer.scheduler_choice leaves out, is counted)."""
    the_pass: DenoisePass = plan(request).passes[index]
    mapped = scheduler_choice(request.sampler, request.scheduler, the_pass.steps)
    evaluations = the_pass.evaluations(SigmaTable.sdxl(), request.scheduler, request.sampler)
    full = index == 0 and not request.init_image
    strength = 1.0 if full else the_pass.denoise
    steps = partial_steps(mapped.class_name, strength, evaluations)
    pipeline = TEXT if full else REFINE if index == 1 else INPAINT if request.mask else IMAGE
    return CallKey(pipeline, the_pass.width, the_pass.height, request.cfg_scale,
                   SchedulerChoice(mapped.class_name, mapped.options, steps), strength)


# --- the pipelines ------------------------------------------------------------------------------

def read_picture(data: bytes, mask: bool = False):
    """A request's picture (RGB) or mask (its red channel, as ComfyUI's LoadImageMask), upright."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return image.convert("RGB").getchannel("R") if mask else image.convert("RGB")


@dataclass(eq=False)
class Pass:
    """One pipeline pass of one request, as the pipelines thread sees it."""

    request: GenerateRequest
    key: CallKey
    picture: object = None  # PIL image (image pipelines)
    mask: object = None  # PIL "L" image (inpainting)
    latent: torch.Tensor | None = None  # a hires fix's upscaled latent (second pass)
    wants_latent: bool = False  # a hires fix's first pass


class ImagePipelines:
    def __init__(self, model_dir: str) -> None:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

        self.base = PeerPipeline(model_dir)  # text-to-image, prompt encoding, schedulers
        text = self.base.pipeline
        self.pipelines = {
            TEXT: text,
            IMAGE: StableDiffusionXLImg2ImgPipeline.from_pipe(text),
            INPAINT: StableDiffusionXLInpaintPipeline.from_pipe(text),
        }
        self.pipelines[REFINE] = self.pipelines[IMAGE]
        for pipeline in self.pipelines.values():
            pipeline.set_progress_bar_config(disable=True)
        self.device = self.base.device

    def key(self, request: GenerateRequest, index: int) -> CallKey:
        return pass_key(request, index)

    def warm_up(self) -> None:
        """One call of each kind at 64x64, 2 steps."""
        from PIL import Image

        from t2i.domain import HiresFix

        self.base.warm_up()
        picture = Image.new("RGB", (64, 64), (128, 96, 64))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        common = dict(prompt="warm-up", width=64, height=64, steps=2, cfg_scale=5.0, seed=0)
        hires = GenerateRequest(**common, hires_fix=HiresFix(scale=1.5))
        latent = self.run([Pass(hires, self.key(hires, 0), wants_latent=True)])[0]
        self.run([Pass(hires, self.key(hires, 1), latent=latent)])
        for mask in (b"", buffer.getvalue()):
            request = GenerateRequest(**common, init_image=buffer.getvalue(), mask=mask, denoise=0.5)
            self.run([Pass(request, self.key(request, 0), picture=picture, mask=read_picture(mask, True) if mask else None)])

    def _embeddings(self, requests: list[GenerateRequest]) -> dict:
        """The call's prompt encodings, as PeerPipeline.generate makes them (long prompts chunk by
        chunk, padded to the call's longest)."""
        encoded = self.base.encode([r.prompt for r in requests] + [r.negative_prompt for r in requests])
        chunks = max(context.shape[1] for context, _ in encoded) // (CHUNK_TOKENS + 2)
        contexts = torch.cat([self.base._pad(context, chunks) for context, _ in encoded])
        pooled = torch.cat([p for _, p in encoded])
        n = len(requests)
        return dict(prompt_embeds=contexts[:n], negative_prompt_embeds=contexts[n:], pooled_prompt_embeds=pooled[:n],
                    negative_pooled_prompt_embeds=pooled[n:])

    @torch.inference_mode()
    def run(self, passes: list[Pass]) -> list:
        """ONE pipeline call for passes of one key: a PIL image per pass, or (a hires fix's first
        pass) its latent, upscaled for the second pass."""
        if len({p.key for p in passes}) != 1:
            raise ValueError("one pipeline call serves passes of one key")
        key = passes[0].key
        requests = [p.request for p in passes]
        pipeline_name, width, height, steps, strength = key.pipeline, key.width, key.height, key.scheduler.pipeline_steps, key.strength
        pipeline = self.pipelines[pipeline_name]
        pipeline.scheduler = self.base.scheduler(key.scheduler)
        common = dict(
            **self._embeddings(requests), guidance_scale=key.cfg_scale,
            generator=[torch.Generator(self.device).manual_seed(r.seed) for r in requests],
        )
        if pipeline_name == TEXT:
            latent = any(p.wants_latent for p in passes)
            out = pipeline(height=height, width=width, num_inference_steps=steps,
                           output_type="latent" if latent else "pil", **common).images
            if not latent:
                return list(out)
            plain = [i for i, p in enumerate(passes) if not p.wants_latent]
            images = dict(zip(plain, decode_latents(pipeline, out[plain]))) if plain else {}
            return [upscale(out[i : i + 1], p.request) if p.wants_latent else images[i] for i, p in enumerate(passes)]
        if pipeline_name == REFINE:
            image = torch.cat([p.latent for p in passes])
            return list(pipeline(image=image, strength=strength, num_inference_steps=steps, output_type="pil", **common).images)
        if pipeline_name == INPAINT:
            return list(pipeline(image=[p.picture for p in passes], mask_image=[p.mask for p in passes], height=height,
                                 width=width, strength=strength, num_inference_steps=steps, output_type="pil", **common).images)
        return list(pipeline(image=[p.picture for p in passes], strength=strength, num_inference_steps=steps,
                             output_type="pil", **common).images)


def decode_latents(pipeline, latents: torch.Tensor) -> list:
    """PIL images from a text-to-image pipeline's latents, as the pipeline's own output_type="pil"
    path decodes them (one VAE call for the batch)."""
    vae = pipeline.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        pipeline.upcast_vae()
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    if getattr(pipeline, "watermark", None) is not None:
        image = pipeline.watermark.apply_watermark(image)
    return pipeline.image_processor.postprocess(image, output_type="pil")


def upscale(latent: torch.Tensor, request: GenerateRequest) -> torch.Tensor:
    """LatentUpscaleBy: each latent side times the scale, rounded as Python rounds."""
    from t2i.passes import LATENT_SCALE, hires_size

    width, height = hires_size(request.width, request.height, request.hires_fix.scale)
    size = (height // LATENT_SCALE, width // LATENT_SCALE)
    return torch.nn.functional.interpolate(latent, size=size, mode=request.hires_fix.method)


# --- the server ---------------------------------------------------------------------------------

@dataclass(eq=False)
class Entry:
    """A request and its answer."""

    request: GenerateRequest
    future: asyncio.Future
    arrival: float
    queue_wait: float | None = None
    batches: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Waiting:
    entry: Entry
    work: Pass
    index: int  # 0: first pass, 1: a hires fix's second

    @property
    def arrival(self) -> float:
        return self.entry.arrival

    @property
    def key(self) -> CallKey:
        return self.work.key


class ImagePeer(pb_grpc.TextToImageServiceServicer):
    def __init__(self, model_dir: str, window: float, max_batch: int) -> None:
        self.window = window
        self.max_batch = max_batch
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="image-peer", initializer=set_torch_threads)
        self.png_pool = ThreadPoolExecutor(EngineConfig().png_workers, thread_name_prefix="image-peer-png")
        self.pipelines = self.worker.submit(ImagePipelines, model_dir).result()
        self.worker.submit(self.pipelines.warm_up).result()
        self.waiting: list[Waiting] = []  # in arrival order of their requests
        self.arrived = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    def _enqueue(self, waiting: Waiting) -> None:
        index = bisect.bisect_right([w.arrival for w in self.waiting], waiting.arrival)
        self.waiting.insert(index, waiting)
        self.arrived.set()

    def _prepare(self, request: GenerateRequest) -> Pass:
        """The first pass, its picture and mask decoded (on a PNG thread)."""
        picture = read_picture(request.init_image) if request.init_image else None
        mask = read_picture(request.mask, mask=True) if request.mask else None
        return Pass(request, self.pipelines.key(request, 0), picture=picture, mask=mask,
                    wants_latent=request.hires_fix is not None)

    async def GenerateImage(self, message, context):
        arrival = time.monotonic()
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._batch_loop())
        loop = asyncio.get_running_loop()
        request = request_from_pb(message)
        entry = Entry(request, loop.create_future(), arrival)
        try:
            work = await loop.run_in_executor(self.png_pool, self._prepare, request)
            self._enqueue(Waiting(entry, work, 0))
            png = await entry.future
        except asyncio.CancelledError:
            self.waiting[:] = [w for w in self.waiting if w.entry is not entry]  # not started: nobody spends work on it
            raise
        context.set_trailing_metadata(
            ((QUEUE_WAIT_KEY, f"{entry.queue_wait or 0.0:.6f}"), (BATCH_KEY, f"{statistics.fmean(entry.batches):.3f}"))
        )
        return pb.GenerateImageResponse(images=[png], seeds=[request.seed])

    async def _next_batch(self) -> list[Waiting]:
        return await next_batch(self.waiting, self.arrived, self.window, self.max_batch)

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            started = time.monotonic()
            for waiting in batch:
                self.waiting.remove(waiting)
                if waiting.entry.queue_wait is None:
                    waiting.entry.queue_wait = started - waiting.arrival
                waiting.entry.batches.append(len(batch))
            try:
                outputs = await loop.run_in_executor(self.worker, self.pipelines.run, [w.work for w in batch])
            except Exception as error:  # answer the batch, keep serving
                for waiting in batch:
                    if not waiting.entry.future.done():
                        waiting.entry.future.set_exception(error)
                continue
            for waiting, output in zip(batch, outputs):
                entry = waiting.entry
                if entry.future.done():
                    continue
                if waiting.work.wants_latent:  # a hires fix: its second pass (upscaled latent), in its request's place
                    self._enqueue(Waiting(entry, Pass(entry.request, self.pipelines.key(entry.request, 1), latent=output), 1))
                else:
                    asyncio.ensure_future(self._finish(entry, output))

    async def _finish(self, entry: Entry, image) -> None:
        try:
            png = await asyncio.get_running_loop().run_in_executor(self.png_pool, encode_png, image)
        except Exception as error:
            if not entry.future.done():
                entry.future.set_exception(error)
            return
        if not entry.future.done():
            entry.future.set_result(png)


def main() -> None:
    defaults = EngineConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("port", type=int)
    parser.add_argument("--window-ms", type=float, default=defaults.admission_window_ms)
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch_size)
    args = parser.parse_args()
    peer = ImagePeer(args.model_dir, args.window_ms / 1000, args.max_batch)
    asyncio.run(serve(peer, args.port))


if __name__ == "__main__":
    main()
