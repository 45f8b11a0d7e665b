"""The adapters' HTTP port of `t2i serve`: other APIs' routes, served through the service's own gRPC.

Each adapter's routes (openai_http, a1111_http) translate a request into the one domain request
(by openai_images, a1111_api) and send it to this process's GenerateImage (or
GenerateImageStream) over a real socket through the Gateway here, with the caller's credentials
(x-illustrious-api-key or Authorization), x-request-id, Idempotency-Key and client address as metadata, so
that authentication, rate limits, validation, pricing, the ledger and the engine are exactly
those of the documented route. The answer, or the refusal, is translated back into the API's
own shapes and statuses. Nothing is counted or stored here.

The client address follows the service's rule (t2i.billing.addresses): the last
x-forwarded-for hop when the HTTP peer is a trusted proxy (the edge), else the peer. The gRPC
server must trust this process's loopback address to take it (`t2i serve` checks at start).

A caller that goes away (the edge's timeout, a closed connection) cancels its gRPC call: the
generation stops at its next step and is not charged, as on the documented route.

It runs in the serving process's event loop, started once the gRPC port is bound and stopped
after it (t2i.server.app); signals stay the serving process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from .. import wire
from ..billing.addresses import client_of, parse_networks, trusts
from ..domain import ModelInfo
from ..server import convert
from ..server.interceptors import REQUEST_ID
from ..settings import ServeSettings

log = logging.getLogger(__name__)

# Request headers passed on to the service as metadata (the credentials and the idempotency key
# as sent; the service judges them). x-forwarded-for is set by the trust rule, never copied.
PASSED_HEADERS = (wire.API_KEY_HEADER, wire.AUTHORIZATION_HEADER, wire.IDEMPOTENCY_HEADER)
# Idle keep-alive connections from the edge stay open this long, longer than the edge keeps them
# (edge/envoy.yaml, the adapters' cluster), so the edge never reuses one this side just closed.
KEEP_ALIVE_SECONDS = 75
# After the gRPC server stopped, what is left of a response gets this long to go out.
SHUTDOWN_SECONDS = 5
MAX_FORM_FIELDS = 100


class ClientGone(Exception):
    """The caller disconnected while its call ran; nothing can be answered."""


class Refused(Exception):
    """The service refused a call: its gRPC status name, message and trailing metadata (each
    adapter answers it in its API's terms)."""

    def __init__(self, status: str, message: str, trailers: dict[str, str]) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.trailers = status, message, trailers


def loopback_target(settings: ServeSettings, grpc_port: int) -> tuple[str, str]:
    """(host the adapters reach the gRPC port at, its gRPC target)."""
    host = settings.grpc_host
    if host in ("", "0.0.0.0", "127.0.0.1", "localhost"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    target = f"[{host}]:{grpc_port}" if ":" in host else f"{host}:{grpc_port}"
    return host, target


def configuration_error(settings: ServeSettings) -> str | None:
    """Why the adapters cannot run with these settings (None: they can)."""
    if settings.public_url:
        from urllib.parse import urlsplit

        parts = urlsplit(settings.public_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            return (f"--public-url {settings.public_url!r}: must be an http or https URL with a host and no query or "
                    "fragment, e.g. https://api.example.com")
    host, _ = loopback_target(settings, 0)
    if not trusts(parse_networks(settings.trusted_proxies), host):
        return (f"--compat-port: the adapters call the gRPC port from {host}, which --trusted-proxies "
                f"({settings.trusted_proxies!r}) does not include, so every caller of theirs would share that address "
                f"in the per-address limits: add {host} to it, or turn the adapters off with --compat-port -1")
    return None


class Gateway:
    """The service's gRPC API as the adapters call it: a real channel to this process's port."""

    def __init__(self, target: str, trusted: tuple, public_url: str = "") -> None:
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.max_send_message_length", wire.MAX_IMAGE_REQUEST_BYTES),
            ("grpc.max_receive_message_length", wire.MAX_RESPONSE_BYTES),
        ])
        self.stub = pb_grpc.TextToImageServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.trusted = trusted
        self.public_url = public_url.rstrip("/")  # where links to stored images start ("": the request's)

    def metadata(self, request) -> list[tuple[str, str]]:
        headers = request.headers
        peer = request.client.host if request.client else "unknown"
        metadata = [(wire.FORWARDED_FOR_HEADER, client_of(peer, headers.get(wire.FORWARDED_FOR_HEADER), self.trusted))]
        request_id = headers.get(wire.REQUEST_ID_HEADER)
        if request_id:
            metadata.append((wire.REQUEST_ID_HEADER, request_id))
        for name in PASSED_HEADERS:
            value = headers.get(name)
            if value is not None:
                metadata.append((name, value))
        return metadata

    async def call(self, rpc, message, request, metadata: list[tuple[str, str]] | None = None) -> tuple[Any, dict[str, str]]:
        """(response, initial metadata) of one unary call; Refused for the service's refusal;
        ClientGone when the caller disconnects first (the call is cancelled)."""
        call = rpc(message, metadata=self.metadata(request) if metadata is None else metadata)
        return await self._until_gone(call, _answer(call), request)

    async def generate_streamed(self, message, request, metadata: list[tuple[str, str]], on_progress) -> tuple[Any, dict[str, str]]:
        """GenerateImage through GenerateImageStream (the same path, billing included), calling
        `on_progress(event)` with each Progress event; (its result, initial metadata)."""
        call = self.stub.GenerateImageStream(message, metadata=metadata)

        async def read():
            result = None
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "progress":
                    on_progress(event.progress)
                elif kind == "result":
                    result = event.result
                elif kind == "error":
                    raise Refused(event.error.status, event.error.message, {})
            initial = {k: v for k, v in (await call.initial_metadata() or ()) if isinstance(v, str)}
            if result is None:
                raise Refused("INTERNAL", "the stream ended without a result", {})
            return result, initial

        return await self._until_gone(call, read(), request)

    async def job_ended(self, job_id: str, request, metadata: list[tuple[str, str]]):
        """Follow a job (WatchJob) until it ends; the ended Job."""
        call = self.stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=metadata)

        async def read():
            async for event in call:
                if event.WhichOneof("event") == "ended":
                    return event.ended
            raise Refused("INTERNAL", f"the events of job {job_id} ended without its end", {})

        return await self._until_gone(call, read(), request)

    async def _until_gone(self, call, answering, request):
        answer = asyncio.ensure_future(answering)
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # stopped by the adapter (A1111's interrupt): so is the call
            call.cancel()
            answer.cancel()
            raise
        finally:
            gone.cancel()
        if not answer.done():
            call.cancel()
            answer.cancel()
            raise ClientGone()
        try:
            return answer.result()
        except grpc.aio.AioRpcError as error:
            trailers = {k: v for k, v in (error.trailing_metadata() or ()) if isinstance(v, str)}
            raise Refused(error.code().name, error.details() or "", trailers) from None

    async def models(self, request, metadata: list[tuple[str, str]] | None = None) -> list[ModelInfo]:
        """The models; the call authenticates the caller (ListModels takes the key like any call)."""
        response, _ = await self.call(self.stub.ListModels, pb.ListModelsRequest(), request, metadata)
        return [convert.model_from_pb(model) for model in response.models]

    async def loras(self, request, metadata: list[tuple[str, str]]) -> list:
        response, _ = await self.call(self.stub.ListLoras, pb.ListLorasRequest(), request, metadata)
        return convert.loras_from_pb(response)

    async def serving(self) -> bool:
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service=wire.SERVICE), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self.channel.close()


async def _answer(call) -> tuple[Any, dict[str, str]]:
    response = await call
    initial = {k: v for k, v in (await call.initial_metadata() or ()) if isinstance(v, str)}
    return response, initial


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the ASGI server reports the caller gone (the body has been read by then)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def build_app(gateway: Gateway):
    """The Starlette application of every adapter (t2i.compat.ADAPTERS): each adapter's routes
    (its `*_http` module), and the replies for unknown paths, wrong methods and crashes in the
    shape of the adapter whose prefix the path is under."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from . import a1111_http, job_events_http, openai_http

    adapters = (openai_http.Routes(gateway), a1111_http.Routes(gateway), job_events_http.Routes(gateway))

    def owner(path: str):
        for adapter in adapters:
            if adapter.owns(path):
                return adapter
        return adapters[0]

    async def healthz(request: Request) -> Response:
        serving = await gateway.serving()
        return JSONResponse({"serving": serving}, status_code=200 if serving else 503)

    async def http_error(request: Request, error: HTTPException) -> Response:
        return owner(request.url.path).http_error(request, error)

    async def crash(request: Request, error: Exception) -> Response:
        log.exception("adapter request failed", extra={"path": request.url.path})
        return owner(request.url.path).crash(request)

    return Starlette(
        routes=[*(route for adapter in adapters for route in adapter.routes()), Route("/healthz", healthz, methods=["GET"])],
        exception_handlers={HTTPException: http_error, Exception: crash},
    )


def media_type(request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def echo(request, headers: dict[str, str]) -> dict[str, str]:
    """`headers` and the caller's x-request-id, when it is one the service keeps (the edge sets
    its own on the way out anyway)."""
    request_id = request.headers.get(wire.REQUEST_ID_HEADER)
    kept = request_id is not None and REQUEST_ID.fullmatch(request_id)
    return {**headers, **({wire.REQUEST_ID_HEADER: request_id} if kept else {})}


def error_reply(error, request):
    """An adapter's error (its API's exception: `body()`, `status`, `headers`) as its JSON reply."""
    from starlette.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status, headers=echo(request, error.headers))


class NotAJsonObject(Exception):
    """A body that is not one JSON object: `kind` says why (`content_type`: not sent as JSON,
    `syntax`: not JSON, with the parser's `detail`; `shape`: JSON, not an object). Each adapter
    answers it in its API's words."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind)
        self.kind, self.detail = kind, detail


async def read_json_object(request, limit: int) -> dict:
    """The body as a JSON object, at most `limit` bytes (BodyTooLarge beyond, NotAJsonObject)."""
    if not media_type(request).startswith("application/json"):
        raise NotAJsonObject("content_type")
    raw = await read_body(request, limit)
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise NotAJsonObject("syntax", str(error)) from None
    if not isinstance(body, dict):
        raise NotAJsonObject("shape")
    return body


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body too large: the limit is {limit // 1024 // 1024} MiB ({limit} bytes)")
        self.limit = limit


async def read_body(request, limit: int) -> bytes:
    """The whole body, at most `limit` bytes (BodyTooLarge beyond: a 413, as the edge answers)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


class CompatServer:
    """The adapters' HTTP server (uvicorn) in the serving process's event loop."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.port: int | None = None
        self._server = None
        self._task: asyncio.Task | None = None
        self.gateway: Gateway | None = None

    async def start(self, grpc_port: int) -> int:
        """Bind and serve; returns the bound port."""
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # SIGTERM and SIGINT belong to the serving process
                yield

        # Its start and stop lines say nothing the serving process's own log does not.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        _, target = loopback_target(self.settings, grpc_port)
        self.gateway = Gateway(target, parse_networks(self.settings.trusted_proxies), self.settings.public_url)
        host = self.settings.compat_host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, self.settings.compat_port), family=family, backlog=2048)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            build_app(self.gateway), log_config=None, access_log=False, lifespan="off", proxy_headers=False,
            server_header=False, timeout_keep_alive=KEEP_ALIVE_SECONDS, timeout_graceful_shutdown=SHUTDOWN_SECONDS,
            h11_max_incomplete_event_size=wire.MAX_METADATA_BYTES,
        )
        self._server = Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # its start-up error
                raise RuntimeError("the adapters' HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
        if self.gateway is not None:
            await self.gateway.close()
