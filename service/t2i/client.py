"""A small typed client for internal microservices (sync and asyncio flavours).

    from t2i.client import Client
    with Client("localhost:50051", api_key="sk_...") as client:
        result = client.generate(prompt="1girl, masterpiece", width=768, height=768, steps=28)
        open("out.png", "wb").write(result.images[0])
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from .domain import GenerateRequest, GenerateResult, ModelInfo
from .server import convert

API_KEY_HEADER = "x-illustrious-api-key"
IDEMPOTENCY_HEADER = "idempotency-key"
REQUEST_ID_HEADER = "x-request-id"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]


class ClientError(Exception):
    """A call failed; `code` is the gRPC status, `retry_after` is set when retrying later may work."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ClientError:
        trailers = dict(error.trailing_metadata() or ())
        retry_after = trailers.get("retry-after")
        return cls(error.code(), error.details() or "", float(retry_after) if retry_after else None)


@dataclass(frozen=True)
class GenerateOptions:
    model_id: int = 1
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 28
    cfg_scale: float = 7.0
    seed: int = -1
    sampler: str = "euler"
    scheduler: str = "normal"


def _metadata(api_key: str | None, idempotency_key: str | None, request_id: str | None) -> tuple[tuple[str, str], ...]:
    pairs = ((API_KEY_HEADER, api_key), (IDEMPOTENCY_HEADER, idempotency_key), (REQUEST_ID_HEADER, request_id))
    return tuple((name, value) for name, value in pairs if value)


def _request(prompt: str, options: GenerateOptions) -> pb.GenerateImageRequest:
    return convert.request_to_pb(GenerateRequest(prompt=prompt, **vars(options)))


class Client:
    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None, timeout: float | None = 600.0) -> None:
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.TextToImageServiceStub(self._channel)
        self.api_key = api_key
        self.timeout = timeout

    def generate(
        self, prompt: str, *, idempotency_key: str | None = None, request_id: str | None = None,
        timeout: float | None = None, **options,
    ) -> GenerateResult:
        try:
            response = self._stub.GenerateImage(
                _request(prompt, GenerateOptions(**options)),
                metadata=_metadata(self.api_key, idempotency_key, request_id),
                timeout=timeout or self.timeout,
            )
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        return convert.result_from_pb(response)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        try:
            response = self._stub.ListModels(
                pb.ListModelsRequest(), metadata=_metadata(self.api_key, None, None), timeout=timeout or self.timeout
            )
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        return [convert.model_from_pb(m) for m in response.models]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None, timeout: float | None = 600.0) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.TextToImageServiceStub(self._channel)
        self.api_key = api_key
        self.timeout = timeout

    async def generate(
        self, prompt: str, *, idempotency_key: str | None = None, request_id: str | None = None,
        timeout: float | None = None, **options,
    ) -> GenerateResult:
        try:
            response = await self._stub.GenerateImage(
                _request(prompt, GenerateOptions(**options)),
                metadata=_metadata(self.api_key, idempotency_key, request_id),
                timeout=timeout or self.timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise ClientError.from_rpc_error(error) from None
        return convert.result_from_pb(response)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        try:
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), metadata=_metadata(self.api_key, None, None), timeout=timeout or self.timeout
            )
        except grpc.aio.AioRpcError as error:
            raise ClientError.from_rpc_error(error) from None
        return [convert.model_from_pb(m) for m in response.models]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
