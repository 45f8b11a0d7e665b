"""The TextToImageService servicer: decode the proto, call the engine, encode the response.

Errors are not handled here: domain exceptions propagate to the ServingInterceptor, which
maps them to status codes (server/status.py). Billing never appears here either.
"""

from __future__ import annotations

import time

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from ..logs import request_id_var
from . import convert
from .catalog import ModelCatalog


class TextToImageServicer(pb_grpc.TextToImageServiceServicer):
    def __init__(self, catalog: ModelCatalog) -> None:
        self.catalog = catalog

    async def GenerateImage(self, request: pb.GenerateImageRequest, context: grpc.aio.ServicerContext) -> pb.GenerateImageResponse:
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        result = await self.catalog.engine().generate(
            convert.request_from_pb(request), request_id=request_id_var.get(), deadline=deadline
        )
        return convert.result_to_pb(result)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return convert.models_to_pb(self.catalog.engine().model_infos())

    async def ListLoras(self, request: pb.ListLorasRequest, context: grpc.aio.ServicerContext) -> pb.ListLorasResponse:
        return convert.loras_to_pb(self.catalog.engine().lora_descriptions(request.model_id))
