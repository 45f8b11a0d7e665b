"""A small typed client for internal microservices (sync and asyncio flavours).

    from t2i.client import Client
    with Client("localhost:50051", api_key="ilx_...") as client:
        result = client.generate("1girl, masterpiece", width=768, height=768, steps=28)
        open("out.png", "wb").write(result.images[0])

Image to image: `init_image` (and `mask`) are the picture's file contents or its path, and
`hires_fix` a HiresFix or a dict of its fields. With a picture, a width or height left out is 0
(the picture's own size), not GenerateRequest's default:

    result = client.generate("1girl", init_image="photo.png", denoise=0.6, hires_fix={"scale": 1.5})

Both flavours share everything but the call itself (_Calls): request building, metadata and
the translation of errors into ClientError. Options are GenerateRequest's fields; those left
out take its defaults.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from . import errors, wire
from .domain import Event, GenerateRequest, GenerateResult, HiresFix, LoraDescription, ModelInfo
from .server import convert

# Responses hold PNGs (gRPC's default receive limit is 4 MiB); requests may hold a picture and
# a mask, up to what the service and the edge accept (larger fails here, before sending).
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", wire.MAX_RESPONSE_BYTES),
    ("grpc.max_send_message_length", wire.MAX_IMAGE_REQUEST_BYTES),
]


class ClientError(Exception):
    """A call failed; `code` is the gRPC status, `retry_after` is set when retrying later may work."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later (the service's error table says so)."""
        return errors.retryable(self.code.name)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ClientError:
        trailers = dict(error.trailing_metadata() or ())
        retry_after = trailers.get(wire.RETRY_AFTER_HEADER)
        return cls(error.code(), error.details() or "", float(retry_after) if retry_after else None)


# GenerateRequest fields that hold a file's contents: a caller may pass its path instead.
PICTURE_FIELDS = ("init_image", "mask")


def request_options(options: dict) -> dict:
    """GenerateRequest's keyword arguments from a caller's: pictures given as a path (str or
    os.PathLike) are read (an unreadable file raises its OSError, which names it; a str is
    always a path, so base64 text fails loudly instead of being sent as a picture), a hires_fix
    given as a dict of HiresFix's fields becomes one, and with a picture a width or height left
    out is 0, the picture's own size (GenerateRequest's 1024 would resize every picture)."""
    resolved = dict(options)
    for name in PICTURE_FIELDS:
        value = resolved.get(name)
        if isinstance(value, (str, os.PathLike)):
            resolved[name] = Path(value).read_bytes()
        elif isinstance(value, (bytearray, memoryview)):
            resolved[name] = bytes(value)
    if resolved.get("init_image"):
        resolved.setdefault("width", 0)
        resolved.setdefault("height", 0)
    hires = resolved.get("hires_fix")
    if isinstance(hires, Mapping):
        resolved["hires_fix"] = HiresFix(**hires)
    return resolved


@dataclass(frozen=True)
class _Call:
    request: object
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None


class _Calls:
    """The arguments of each RPC, built the same way for both clients."""

    def __init__(self, api_key: str | None, timeout: float | None) -> None:
        self.api_key = api_key
        self.timeout = timeout

    def _metadata(self, idempotency_key: str | None = None, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
        pairs = ((wire.API_KEY_HEADER, self.api_key), (wire.IDEMPOTENCY_HEADER, idempotency_key),
                 (wire.REQUEST_ID_HEADER, request_id))
        return tuple((name, value) for name, value in pairs if value)

    def generate(self, prompt: str, idempotency_key, request_id, timeout, options: dict) -> _Call:
        request = convert.request_to_pb(GenerateRequest(prompt=prompt, **request_options(options)))
        return _Call(request, self._metadata(idempotency_key, request_id), timeout or self.timeout)

    def list_models(self, timeout) -> _Call:
        return _Call(pb.ListModelsRequest(), self._metadata(), timeout or self.timeout)

    def call(self, request, timeout) -> _Call:
        return _Call(request, self._metadata(), timeout or self.timeout)

    def list_loras(self, model_id: int, timeout) -> _Call:
        return _Call(pb.ListLorasRequest(model_id=model_id), self._metadata(), timeout or self.timeout)


def _models(response: pb.ListModelsResponse) -> list[ModelInfo]:
    return [convert.model_from_pb(m) for m in response.models]


class Client:
    def __init__(self, target: str = f"localhost:{wire.GRPC_PORT}", *, api_key: str | None = None,
                 timeout: float | None = 600.0) -> None:
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.TextToImageServiceStub(self._channel)
        self._calls = _Calls(api_key, timeout)

    def _invoke(self, method, call: _Call):
        try:
            return method(call.request, metadata=call.metadata, timeout=call.timeout)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None

    def generate(self, prompt: str, *, idempotency_key: str | None = None, request_id: str | None = None,
                 timeout: float | None = None, **options) -> GenerateResult:
        call = self._calls.generate(prompt, idempotency_key, request_id, timeout, options)
        return convert.result_from_pb(self._invoke(self._stub.GenerateImage, call))

    def generate_stream(self, prompt: str, *, idempotency_key: str | None = None, request_id: str | None = None,
                        timeout: float | None = None, **options) -> Iterator[Event]:
        """The generation's events as they come; the last is a GenerateResult or a Failed."""
        call = self._calls.generate(prompt, idempotency_key, request_id, timeout, options)
        try:
            for message in self._stub.GenerateImageStream(call.request, metadata=call.metadata, timeout=call.timeout):
                yield convert.event_from_pb(message)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return _models(self._invoke(self._stub.ListModels, self._calls.list_models(timeout)))

    def list_loras(self, model_id: int = 0, *, timeout: float | None = None) -> list[LoraDescription]:
        return convert.loras_from_pb(self._invoke(self._stub.ListLoras, self._calls.list_loras(model_id, timeout)))

    # Jobs: generations that run later (README, "Jobs"). They answer the proto's Job message.

    def submit_job(self, prompt: str, *, idempotency_key: str | None = None, request_id: str | None = None,
                   timeout: float | None = None, **options) -> pb.Job:
        """Queue the generation GenerateImage would run; its price is reserved now."""
        return self._invoke(self._stub.SubmitJob, self._calls.generate(prompt, idempotency_key, request_id, timeout, options))

    def get_job(self, job_id: str, *, timeout: float | None = None) -> pb.Job:
        return self._invoke(self._stub.GetJob, self._calls.call(pb.GetJobRequest(id=job_id), timeout))

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> pb.Job:
        return self._invoke(self._stub.CancelJob, self._calls.call(pb.CancelJobRequest(id=job_id), timeout))

    def watch_job(self, job_id: str, after: int = 0, *, timeout: float | None = None) -> Iterator[pb.JobEvent]:
        """The job's events after event `after` as they happen, the last one `ended`. No deadline
        unless `timeout` is given (not the client's default: a job may wait long in the queue)."""
        call = self._calls.call(pb.WatchJobRequest(id=job_id, after=after), None)
        try:
            yield from self._stub.WatchJob(call.request, metadata=call.metadata, timeout=timeout)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None

    def list_jobs(self, status: str = "", cursor: str = "", page_size: int = 0, *,
                  timeout: float | None = None) -> pb.ListJobsResponse:
        return self._invoke(self._stub.ListJobs, self._calls.call(
            pb.ListJobsRequest(status=status, cursor=cursor, page_size=page_size), timeout))

    def job_image(self, job_id: str, index: int = 0, *, timeout: float | None = None) -> tuple[bytes, str]:
        """(the image's bytes, its content type)."""
        body = self._invoke(self._stub.GetJobImage, self._calls.call(pb.GetJobImageRequest(id=job_id, index=index), timeout))
        return body.data, body.content_type

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    def __init__(self, target: str = f"localhost:{wire.GRPC_PORT}", *, api_key: str | None = None,
                 timeout: float | None = 600.0) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.TextToImageServiceStub(self._channel)
        self._calls = _Calls(api_key, timeout)

    async def _invoke(self, method, call: _Call):
        try:
            return await method(call.request, metadata=call.metadata, timeout=call.timeout)
        except grpc.aio.AioRpcError as error:
            raise ClientError.from_rpc_error(error) from None

    async def generate(self, prompt: str, *, idempotency_key: str | None = None, request_id: str | None = None,
                       timeout: float | None = None, **options) -> GenerateResult:
        call = self._calls.generate(prompt, idempotency_key, request_id, timeout, options)
        return convert.result_from_pb(await self._invoke(self._stub.GenerateImage, call))

    async def generate_stream(self, prompt: str, *, idempotency_key: str | None = None, request_id: str | None = None,
                              timeout: float | None = None, **options) -> AsyncIterator[Event]:
        """The generation's events as they come; the last is a GenerateResult or a Failed."""
        call = self._calls.generate(prompt, idempotency_key, request_id, timeout, options)
        try:
            async for message in self._stub.GenerateImageStream(call.request, metadata=call.metadata, timeout=call.timeout):
                yield convert.event_from_pb(message)
        except grpc.aio.AioRpcError as error:
            raise ClientError.from_rpc_error(error) from None

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return _models(await self._invoke(self._stub.ListModels, self._calls.list_models(timeout)))

    async def list_loras(self, model_id: int = 0, *, timeout: float | None = None) -> list[LoraDescription]:
        return convert.loras_from_pb(await self._invoke(self._stub.ListLoras, self._calls.list_loras(model_id, timeout)))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
