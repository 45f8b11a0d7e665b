"""Raw gRPC calls with explicit metadata, for billing and edge tests."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

TINY = dict(model_id=1, prompt="1girl", negative_prompt="", height=64, width=64, steps=2, cfg_scale=5.0, seed=1,
            sampler_name="euler", scheduler="normal")


def new_address() -> str:
    """A client address of its own for a test, so per-address auth limits never collide."""
    n = uuid.uuid4().int
    return f"10.{n % 250}.{(n >> 8) % 250}.{(n >> 16) % 250}"


@dataclass
class Outcome:
    response: pb.GenerateImageResponse | None
    code: grpc.StatusCode
    details: str
    initial: dict[str, str]
    trailing: dict[str, str]


class Api:
    def __init__(self, target: str, address: str | None = None) -> None:
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)])
        self.stub = pb_grpc.TextToImageServiceStub(self.channel)
        self.address = address or new_address()

    def metadata(self, key: str | None, idempotency_key: str | None = None, extra=()) -> list[tuple[str, str]]:
        metadata = [("x-forwarded-for", self.address), *extra]
        if key is not None:
            metadata.append(("x-illustrious-api-key", key))
        if idempotency_key is not None:
            metadata.append(("idempotency-key", idempotency_key))
        return metadata

    def generate(self, key: str | None, *, idempotency_key: str | None = None, timeout: float = 120, metadata=(),
                 **fields) -> Outcome:
        request = pb.GenerateImageRequest(**{**TINY, **fields})
        try:
            response, call = self.stub.GenerateImage.with_call(
                request, metadata=self.metadata(key, idempotency_key, metadata), timeout=timeout
            )
        except grpc.RpcError as error:
            return Outcome(None, error.code(), error.details() or "", dict(error.initial_metadata() or ()),
                           dict(error.trailing_metadata() or ()))
        return Outcome(response, grpc.StatusCode.OK, "", dict(call.initial_metadata() or ()), dict(call.trailing_metadata() or ()))

    def generate_future(self, key: str | None, *, timeout: float = 300, **fields):
        return self.stub.GenerateImage.future(pb.GenerateImageRequest(**{**TINY, **fields}), metadata=self.metadata(key), timeout=timeout)

    def list_models(self, key: str | None) -> Outcome:
        try:
            response, call = self.stub.ListModels.with_call(pb.ListModelsRequest(), metadata=self.metadata(key), timeout=30)
        except grpc.RpcError as error:
            return Outcome(None, error.code(), error.details() or "", {}, dict(error.trailing_metadata() or ()))
        return Outcome(response, grpc.StatusCode.OK, "", {}, {})

    def close(self) -> None:
        self.channel.close()
