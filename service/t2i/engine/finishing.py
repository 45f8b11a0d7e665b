"""The VAE stage: a finished latent becomes image bytes, and a caller's picture becomes a
latent (image to image), off the denoise thread.

One VAE thread runs every decode and every picture encode (on CUDA in its own stream,
overlapping the next UNet steps) and a small pool encodes the images, so neither blocks the
denoise loop. Each failure here
concerns exactly one request: it fails that request (INTERNAL, never charged) and nothing else.
A request whose caller went away while it waited here is skipped.

The VAE queue is shortest-first (by pixels to decode or encode), so a small image is not held
behind the decodes of a batch of large ones; a job that has waited `DECODE_PATIENCE` seconds
goes first whatever its size, so a stream of small images cannot starve a large one. A picture's
encode is such a job too: its request joins the denoise queue once its latent exists.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .. import metrics
from ..domain import GenerateResult, Preview
from ..errors import InternalError, ServiceError
from ..models.loader import LoadedModel
from . import recipe
from .imaging import decode_latents, encode_image
from .latents import encode_picture
from .previews import latent_rgb, preview_jpeg
from .request import EngineRequest, RequestState

log = logging.getLogger(__name__)

# settle(request, state, result=..., error=...): the engine's one way to answer a request.
Settle = Callable[..., None]
STAGES = ("queue_wait", "vae_encode", "text_encode", "denoise", "vae_decode", "png_encode")
DECODE_PATIENCE = 2.0


class DecodeQueue:
    """Shortest job first, with patience: a plain function of its state (tested alone)."""

    def __init__(self, patience: float = DECODE_PATIENCE) -> None:
        self.patience = patience
        self._items: list[tuple[float, int, int, object]] = []  # (queued at, pixels, sequence, item)
        self._sequence = 0

    def push(self, item, pixels: int, now: float) -> None:
        self._sequence += 1
        self._items.append((now, pixels, self._sequence, item))

    def pop(self, now: float):
        """The item to decode next: the longest-waiting one once it has waited `patience`, else
        the smallest (first come first among equals); None when empty."""
        if not self._items:
            return None
        overdue = [entry for entry in self._items if now - entry[0] >= self.patience]
        chosen = min(overdue) if overdue else min(self._items, key=lambda entry: (entry[1], entry[2]))
        self._items.remove(chosen)
        return chosen[3]

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class _PictureEncode:
    """A picture to encode on the VAE thread; the latent (or the error) settles `future` on `loop`."""

    model: LoadedModel
    pixels: torch.Tensor
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class ImageFinisher:
    def __init__(
        self, models: dict[int, LoadedModel], settle: Settle, *, png_workers: int, png_compress_level: int,
        thread_setup: Callable[[], None] = lambda: None,
    ) -> None:
        self.models = models
        self._settle = settle
        self._compress_level = png_compress_level
        self._queue = DecodeQueue()
        self._queue_lock = threading.Condition()
        self._closing = False
        self._decoder = threading.Thread(target=self._decode_loop, args=(thread_setup,), name="t2i-decode", daemon=True)
        self._encode_pool = ThreadPoolExecutor(png_workers, thread_name_prefix="t2i-png")
        self._streams = {m.id: torch.cuda.Stream(device=m.device) for m in models.values() if m.device.type == "cuda"}
        # Replaceable so that fault-injection tests can wrap the real stages.
        self.decode: Callable[[LoadedModel, torch.Tensor], list] = decode_latents
        self.encode: Callable[..., bytes] = encode_image
        self.encode_picture: Callable[[LoadedModel, torch.Tensor], torch.Tensor] = encode_picture

    def start(self) -> None:
        self._decoder.start()

    def submit(self, request: EngineRequest) -> None:
        width, height = request.plan.output_size
        with self._queue_lock:
            self._queue.push(request, request.samples * width * height, time.monotonic())
            self._queue_lock.notify()

    async def vae_encode(self, model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
        """The (1, 4, h, w) latent of an (H, W, 3) picture, encoded on the VAE thread in turn
        with the decodes; raises what the encode raised."""
        loop = asyncio.get_running_loop()
        job = _PictureEncode(model, pixels, loop, loop.create_future())
        with self._queue_lock:
            self._queue.push(job, pixels.shape[0] * pixels.shape[1], time.monotonic())
            self._queue_lock.notify()
        return await job.future

    def _decode_loop(self, thread_setup: Callable[[], None]) -> None:
        thread_setup()
        while True:
            with self._queue_lock:
                while not self._queue and not self._closing:
                    self._queue_lock.wait()
                request = self._queue.pop(time.monotonic())
            if request is None:  # closing and nothing left
                return
            if isinstance(request, _PictureEncode):
                self._encode_picture(request)
                continue
            try:
                self._decode(request)
            except Exception as error:  # _decode answers its own failures; this is a last guard
                log.exception("decode stage failed", extra={"request_id": request.request_id})
                self._settle(request, RequestState.FAILED, error=InternalError(f"image decoding failed: {type(error).__name__}"))

    def submit_preview(self, request: EngineRequest, step: int, latent) -> None:
        """Project `latent` (the step's guided x0) to RGB and JPEG-encode it off the denoise
        thread (the copy to the CPU included), then send it to the request's caller."""
        def encode() -> None:
            if request.state.terminal:  # it ended while this waited for a worker: no one to show
                request.dropped_event(Preview(step=step, jpeg=b"", width=0, height=0))
                return
            try:
                pixels = latent_rgb(latent)
                jpeg = preview_jpeg(pixels)
            except Exception:
                log.exception("preview encode failed", extra={"request_id": request.request_id})
                return  # a preview is a courtesy: its failure fails nothing
            request.emit(Preview(step=step, jpeg=jpeg, width=pixels.shape[1], height=pixels.shape[0]))

        self._encode_pool.submit(encode)

    def close(self) -> None:
        with self._queue_lock:
            self._closing = True
            self._queue_lock.notify()
        if self._decoder.is_alive():
            self._decoder.join()
        self._encode_pool.shutdown(wait=True)

    def _encode_picture(self, job: _PictureEncode) -> None:
        if job.future.cancelled():
            return  # its caller went away while it waited
        result, error = None, None
        try:
            stream = self._streams.get(job.model.id)
            if stream is None:
                result = self.encode_picture(job.model, job.pixels)
            else:
                with torch.cuda.stream(stream):
                    result = self.encode_picture(job.model, job.pixels)
                stream.synchronize()  # the denoise thread uses it on its own stream next
        except ServiceError as failure:
            error = failure
        except Exception as failure:
            log.exception("VAE encode failed")
            error = InternalError(f"encoding the picture failed: {type(failure).__name__}")
        try:
            job.loop.call_soon_threadsafe(_settle_encode, job.future, result, error)
        except RuntimeError:  # the loop is closed: nobody waits
            pass

    def _decode(self, request: EngineRequest) -> None:
        if request.state is not RequestState.DECODING:
            return  # aborted while it waited for the decoder
        model = self.models[request.params.model_id]
        started = time.perf_counter()
        try:
            stream = self._streams.get(model.id)
            if stream is None:
                pixels = self.decode(model, request.run.result)
            else:
                # Decode in a side stream so the denoise thread's next steps overlap it.
                stream.wait_stream(torch.cuda.current_stream(model.device))
                with torch.cuda.stream(stream):
                    request.run.result.record_stream(stream)
                    pixels = self.decode(model, request.run.result)
        except ServiceError as error:
            self._settle(request, RequestState.FAILED, error=error)
            return
        except Exception as error:
            log.exception("VAE decode failed", extra={"request_id": request.request_id})
            self._settle(request, RequestState.FAILED, error=InternalError(f"image decoding failed: {type(error).__name__}"))
            return
        request.times.vae_decode = time.perf_counter() - started
        request.run = None  # the latent and the sampler's tensors are no longer needed
        self._encode_pool.submit(self._encode, request, pixels)

    def _encode(self, request: EngineRequest, pixels: list) -> None:
        if request.state is not RequestState.DECODING:
            return
        p = request.params
        started = time.perf_counter()
        try:
            recipes = self._recipes(request, len(pixels)) if not p.omit_metadata else [None] * len(pixels)
            images = [
                self.encode(image, p.image_format, quality=p.quality, compress_level=self._compress_level, text=text)
                for image, text in zip(pixels, recipes)
            ]
        except Exception as error:
            log.exception("image encode failed", extra={"request_id": request.request_id})
            self._settle(request, RequestState.FAILED, error=InternalError(f"image encoding failed: {type(error).__name__}"))
            return
        request.times.png_encode = time.perf_counter() - started
        self._log_finished(request)
        result = GenerateResult(images=images, seeds=[request.seed] * len(images), output_format=p.image_format)
        self._settle(request, RequestState.FINISHED, result=result)

    def _recipes(self, request: EngineRequest, images: int) -> list[dict[str, str]]:
        """Each image's text chunks: its own A1111 parameters (they name its batch position),
        and the ComfyUI graph, which is the same for all of them."""
        model = self.models[request.params.model_id]
        lora_hashes = {lora.weights.name: lora.weights.sha256 for lora in request.loras}
        chunks = [{"parameters": recipe.parameters(request.params, request.seed, model.spec.path.stem, model.sha256,
                                                   lora_hashes, index)} for index in range(images)]
        if request.params.syntax == "comfyui":
            # A prompt read by A1111's rules would mean something else in ComfyUI's graph.
            graph = recipe.comfyui_prompt(request.params, request.seed, model.spec.path.name, model.prediction,
                                          model.kind.zero_terminal_snr)
            for chunk in chunks:
                chunk["prompt"] = graph
        return chunks

    @staticmethod
    def _log_finished(request: EngineRequest) -> None:
        width, height = request.plan.output_size
        times, p = request.times, request.params
        for stage in STAGES:
            if stage == "vae_encode" and not request.plan.encode:
                continue  # text-to-image has no such stage: a 0 would pull the histogram down
            metrics.STAGE_LATENCY.labels(stage=stage).observe(getattr(times, stage))
        log.info(
            "image generated",
            extra={
                "request_id": request.request_id, "model_id": p.model_id, "size": f"{width}x{height}", "passes": len(request.plan.passes),
                "sampler": p.sampler, "scheduler": p.scheduler, "steps": p.steps, "evaluations": times.evaluations,
                "mean_batch": round(sum(times.batch_sizes) / max(len(times.batch_sizes), 1), 2),
                "queue_wait_s": round(times.queue_wait, 4), "vae_encode_s": round(times.vae_encode, 4),
                "denoise_s": round(times.denoise, 4),
                "decode_s": round(times.vae_decode, 4), "png_s": round(times.png_encode, 4),
            },
        )


def _settle_encode(future: asyncio.Future, latent, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(latent)
