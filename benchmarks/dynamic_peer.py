"""The dynamic-batching peer: the strongest request-level batcher diffusers allows, behind the
same gRPC contract as the service.

    python -m benchmarks.dynamic_peer MODEL_DIR PORT [--window-ms 20 --max-batch 8]

Dynamic batching as Triton or TorchServe do it, with the service's own settings (EngineConfig
defaults: admission_window_ms=20, max_batch_size=8):

1. Requests queue in arrival order. When the pipeline is free, the oldest waiting request
   picks the batch: every waiting request that one StableDiffusionXLPipeline call can serve
   together with it (same size, cfg scale and diffusers scheduler configuration and step
   count: diffusers_peer.group_key), oldest first, at most max_batch.
2. The batch starts when it is full or when its oldest request has waited the window, so
   companions arriving together start together (the service's admission window). A request
   that waited longer than the window (behind a running call) starts at once.
3. The batch runs as ONE pipeline call: lists of prompt and negative-prompt encodings, one
   torch.Generator per request (seeded by its seed), one scheduler instance per configuration.
   A request nobody can share a call with runs alone: the rest run one by one.
4. PNG encoding runs on two other threads (like the service's finishing stage), so the next
   call starts as soon as the pipeline returns.

A request whose caller went away (cancelled, deadline passed) before its call started is
dropped from the queue; one already in a call is finished and its image thrown away, since a
pipeline call cannot be left halfway. Each answer carries in trailing metadata its queue wait
(arrival to the start of its pipeline call) and the number of requests its call served.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from t2i.settings import EngineConfig

from .diffusers_peer import BATCH_KEY, QUEUE_WAIT_KEY, PeerPipeline, encode_png, group_key, serve, set_torch_threads


@dataclass(eq=False)
class Waiting:
    request: pb.GenerateImageRequest
    key: tuple
    future: asyncio.Future
    arrival: float = field(default_factory=time.monotonic)
    queue_wait: float = 0.0
    batch: int = 0


async def next_batch(waiting: list, arrived: asyncio.Event, window: float, max_batch: int) -> list:
    """The dynamic batching rule both peers use: the oldest waiting entry and those with its
    `key`, gathered until `max_batch` of them wait or `window` seconds have passed since its
    `arrival`; if it is cancelled meanwhile, the next oldest starts over. `arrived` is set
    whenever an entry is added to `waiting`."""

    def batch_of(oldest) -> list:
        return [w for w in waiting if w.key == oldest.key][:max_batch]

    while True:
        while not waiting:
            arrived.clear()
            await arrived.wait()
        oldest = waiting[0]
        batch = batch_of(oldest)
        while len(batch) < max_batch and oldest in waiting:
            remaining = oldest.arrival + window - time.monotonic()
            if remaining <= 0:
                break
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except TimeoutError:
                pass
            batch = batch_of(oldest)
        if oldest in waiting:
            return batch_of(oldest)


class DynamicPeer(pb_grpc.TextToImageServiceServicer):
    def __init__(self, model_dir: str, window: float, max_batch: int) -> None:
        self.window = window
        self.max_batch = max_batch
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="dynamic-peer", initializer=set_torch_threads)
        self.png_pool = ThreadPoolExecutor(EngineConfig().png_workers, thread_name_prefix="dynamic-peer-png")
        self.pipeline = self.worker.submit(PeerPipeline, model_dir).result()
        self.worker.submit(self.pipeline.warm_up).result()
        self.waiting: list[Waiting] = []
        self.arrived = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    async def GenerateImage(self, request, context):
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._batch_loop())
        entry = Waiting(request, group_key(request), asyncio.get_running_loop().create_future())
        self.waiting.append(entry)
        self.arrived.set()
        try:
            png = await entry.future
        except asyncio.CancelledError:
            if entry in self.waiting:  # not started yet: nobody spends work on it
                self.waiting.remove(entry)
            raise
        context.set_trailing_metadata(((QUEUE_WAIT_KEY, f"{entry.queue_wait:.6f}"), (BATCH_KEY, str(entry.batch))))
        return pb.GenerateImageResponse(images=[png], seeds=[request.seed])

    async def _next_batch(self) -> list[Waiting]:
        return await next_batch(self.waiting, self.arrived, self.window, self.max_batch)

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            started = time.monotonic()
            for entry in batch:
                self.waiting.remove(entry)
                entry.queue_wait, entry.batch = started - entry.arrival, len(batch)
            try:
                images = await loop.run_in_executor(self.worker, self.pipeline.generate, [e.request for e in batch])
            except Exception as error:  # answer the batch, keep serving
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(error)
                continue
            for entry, image in zip(batch, images):
                if not entry.future.done():
                    asyncio.ensure_future(self._finish(entry, image))

    async def _finish(self, entry: Waiting, image) -> None:
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
    peer = DynamicPeer(args.model_dir, args.window_ms / 1000, args.max_batch)
    asyncio.run(serve(peer, args.port))


if __name__ == "__main__":
    main()
