"""The naive peer: diffusers' StableDiffusionXLPipeline called once per request under a lock,
as diffusers' own server example does, behind the same gRPC contract as the service.

    python -m benchmarks.naive_peer MODEL_DIR PORT

The pipeline, the sampler/scheduler mapping and the long-prompt encoding are diffusers_peer's
(shared with the dynamic peer); the pipeline runs in one worker thread with the service's
intra-op thread count. Each answer carries its queue wait (arrival to the start of its
pipeline call) in trailing metadata.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from .diffusers_peer import BATCH_KEY, QUEUE_WAIT_KEY, PeerPipeline, encode_png, serve, set_torch_threads


class NaivePeer(pb_grpc.TextToImageServiceServicer):
    def __init__(self, model_dir: str) -> None:
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="naive-peer", initializer=set_torch_threads)
        self.pipeline = self.worker.submit(PeerPipeline, model_dir).result()
        self.worker.submit(self.pipeline.warm_up).result()
        self.lock = asyncio.Lock()

    def _run(self, request: pb.GenerateImageRequest) -> bytes:
        return encode_png(self.pipeline.generate([request])[0])

    async def GenerateImage(self, request, context):
        arrival = time.monotonic()
        async with self.lock:
            waited = time.monotonic() - arrival
            png = await asyncio.get_running_loop().run_in_executor(self.worker, self._run, request)
        context.set_trailing_metadata(((QUEUE_WAIT_KEY, f"{waited:.6f}"), (BATCH_KEY, "1")))
        return pb.GenerateImageResponse(images=[png], seeds=[request.seed])


if __name__ == "__main__":
    asyncio.run(serve(NaivePeer(sys.argv[1]), int(sys.argv[2])))
