"""The naive peer: diffusers' StableDiffusionXLPipeline called once per request under a lock,
as diffusers' own server example does, behind the same gRPC contract as the service.

    python -m benchmarks.naive_peer MODEL_DIR PORT
"""

from __future__ import annotations

import asyncio
import io
import sys

import grpc
import torch
from diffusers import StableDiffusionXLPipeline
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc


class NaivePeer(pb_grpc.TextToImageServiceServicer):
    def __init__(self, model_dir: str) -> None:
        self.pipeline = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        self.pipeline.set_progress_bar_config(disable=True)
        self.lock = asyncio.Lock()

    def _run(self, request: pb.GenerateImageRequest) -> bytes:
        image = self.pipeline(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg_scale,
            generator=torch.Generator().manual_seed(request.seed),
        ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=4)
        return buffer.getvalue()

    async def GenerateImage(self, request, context):
        async with self.lock:
            png = await asyncio.to_thread(self._run, request)
        return pb.GenerateImageResponse(images=[png], seeds=[request.seed])


async def main(model_dir: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 * 1024 * 1024)])
    pb_grpc.add_TextToImageServiceServicer_to_server(NaivePeer(model_dir), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
