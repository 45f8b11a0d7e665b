"""The adapters' HTTP port of `t2i serve`: other APIs' routes, served through the service's own gRPC.

Each request is translated into the one domain request (t2i.compat.openai_images) and sent to
this process's GenerateImage over a real socket, with the caller's credentials (x-illustrious-
api-key or Authorization), x-request-id, Idempotency-Key and client address as metadata, so
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
import io
import json
import logging
import socket
import time
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
from . import openai_images as oa

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
    host, _ = loopback_target(settings, 0)
    if not trusts(parse_networks(settings.trusted_proxies), host):
        return (f"--compat-port: the adapters call the gRPC port from {host}, which --trusted-proxies "
                f"({settings.trusted_proxies!r}) does not include, so every caller of theirs would share that address "
                f"in the per-address limits: add {host} to it, or turn the adapters off with --compat-port -1")
    return None


class Gateway:
    """The service's gRPC API as the adapters call it: a real channel to this process's port."""

    def __init__(self, target: str, trusted: tuple) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.max_send_message_length", wire.MAX_IMAGE_REQUEST_BYTES),
            ("grpc.max_receive_message_length", wire.MAX_RESPONSE_BYTES),
        ])
        self.stub = pb_grpc.TextToImageServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.trusted = trusted

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

    async def call(self, rpc, message, request, route: str) -> tuple[Any, dict[str, str]]:
        """(response, initial metadata) of one unary call, or the service's refusal as an
        OpenAIError; ClientGone when the caller disconnects first (the call is cancelled)."""
        call = rpc(message, metadata=self.metadata(request))
        answer = asyncio.ensure_future(_answer(call))
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
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
            raise oa.service_error(error.code().name, error.details() or "", trailers, route) from None

    async def models(self, request, route: str) -> list[ModelInfo]:
        response, _ = await self.call(self.stub.ListModels, pb.ListModelsRequest(), request, route)
        return [convert.model_from_pb(model) for model in response.models]

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
    """The Starlette application of the OpenAI Images API (t2i.compat.openai_images)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    started = int(time.time())

    def error_response(error: oa.OpenAIError, request: Request) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=_echo(request, error.headers))

    def answering(route: str):
        """Wrap a handler: its OpenAIErrors become OpenAI-shaped replies."""
        def decorate(handler):
            async def endpoint(request: Request) -> Response:
                try:
                    return await handler(request, route)
                except oa.OpenAIError as error:
                    return error_response(error, request)
                except ClientGone:
                    return Response(status_code=499)  # nobody reads it; the edge logs the disconnect
            return endpoint
        return decorate

    @answering(oa.GENERATIONS)
    async def generations(request: Request, route: str) -> Response:
        if not _media_type(request).startswith("application/json"):
            raise oa.OpenAIError(400, f"POST {route} takes a JSON body (Content-Type: application/json)", param=None,
                                 code="invalid_request_body")
        raw = await _body(request, oa.ADAPTER.body_limit(route))
        try:
            body = json.loads(raw)
        except ValueError as error:
            raise oa.OpenAIError(400, f"the body is not valid JSON ({error})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise oa.OpenAIError(400, "the body must be a JSON object", code="invalid_json")
        return await generate(request, route, body, form=False)

    @answering(oa.EDITS)
    async def edits(request: Request, route: str) -> Response:
        if not _media_type(request).startswith("multipart/form-data"):
            raise oa.OpenAIError(400, f"POST {route} takes multipart/form-data (the picture and the mask as files)",
                                 code="invalid_request_body")
        limit = oa.ADAPTER.body_limit(route)
        body = await _form(request, await _body(request, limit), limit)
        return await generate(request, route, body, form=True)

    async def generate(request: Request, route: str, body: dict, form: bool) -> Response:
        models = await gateway.models(request, route)  # authenticates the caller first
        translated = oa.translate(body, route, models, form=form)
        message = convert.request_to_pb(translated.request)
        response, initial = await gateway.call(gateway.stub.GenerateImage, message, request, route)
        images = list(response.images)
        headers = {
            oa.USAGE_HEADER: str(response.stardust_usage), oa.BALANCE_HEADER: str(response.stardust_balance),
            oa.SEEDS_HEADER: ",".join(str(seed) for seed in response.seeds),
            **{name: initial[name] for name in wire.RATE_LIMIT_HEADERS if name in initial},
        }
        body = oa.images_response(images, translated.request.prompt, int(time.time()),
                                  response.output_format or translated.request.image_format, _size_of(images))
        return JSONResponse(body, headers=_echo(request, headers))

    @answering(oa.MODELS)
    async def list_models(request: Request, route: str) -> Response:
        models = await gateway.models(request, route)
        return JSONResponse(oa.models_list(models, started), headers=_echo(request, {}))

    @answering(oa.MODELS + "/{model}")
    async def get_model(request: Request, route: str) -> Response:
        models = await gateway.models(request, route)
        model = oa.resolve_model(request.path_params["model"], models)
        ordered = sorted(models, key=lambda m: m.id)
        return JSONResponse(oa.model_object(model, ordered, started), headers=_echo(request, {}))

    async def healthz(request: Request) -> Response:
        serving = await gateway.serving()
        return JSONResponse({"serving": serving}, status_code=200 if serving else 503)

    async def http_error(request: Request, error: HTTPException) -> Response:
        if error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            failure = oa.OpenAIError(405, f"method not allowed: use {allowed} {request.url.path}", code="method_not_allowed")
        elif error.status_code == 404:
            failure = oa.OpenAIError(404, f"invalid URL ({request.method} {request.url.path}): the OpenAI-compatible "
                                     f"API has POST {oa.GENERATIONS}, POST {oa.EDITS}, GET {oa.MODELS} and GET "
                                     f"{oa.MODELS}/{{model}}", code="unknown_url")
        else:
            failure = oa.OpenAIError(error.status_code, str(error.detail), code=None)
        failure.headers.update(error.headers or {})
        return error_response(failure, request)

    async def crash(request: Request, error: Exception) -> Response:
        log.exception("adapter request failed", extra={"path": request.url.path})
        return error_response(oa.OpenAIError(500, "internal error", type="server_error", code="server_error", retry=True),
                              request)

    return Starlette(
        routes=[
            Route(oa.GENERATIONS, generations, methods=["POST"]),
            Route(oa.EDITS, edits, methods=["POST"]),
            Route(oa.MODELS, list_models, methods=["GET"]),
            Route(oa.MODELS + "/{model:path}", get_model, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: crash},
    )


def _media_type(request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _echo(request, headers: dict[str, str]) -> dict[str, str]:
    """`headers` and the caller's x-request-id, when it is one the service keeps (the edge sets
    its own on the way out anyway)."""
    request_id = request.headers.get(wire.REQUEST_ID_HEADER)
    kept = request_id is not None and REQUEST_ID.fullmatch(request_id)
    return {**headers, **({wire.REQUEST_ID_HEADER: request_id} if kept else {})}


async def _body(request, limit: int) -> bytes:
    """The whole body, at most `limit` bytes (413 beyond, as the edge answers)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise oa.OpenAIError(413, f"request body too large: the limit is {limit // 1024 // 1024} MiB ({limit} bytes)",
                                 code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _form(request, raw: bytes, limit: int) -> dict:
    """A multipart body as {name: text | bytes | [bytes, ...]}; `image[]` (the SDK's array of
    files) counts as `image`."""
    from starlette.requests import Request

    async def replay() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=8, max_fields=MAX_FORM_FIELDS, max_part_size=limit)
    except Exception as error:  # python-multipart's and Starlette's parse errors
        raise oa.OpenAIError(400, f"the multipart body could not be read ({error})", code="invalid_request_body") from None
    body: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            key = name.removesuffix("[]")
            if hasattr(value, "read"):
                value = await value.read()
            if key in body:
                previous = body[key]
                body[key] = (previous if isinstance(previous, list) else [previous]) + [value]
            else:
                body[key] = [value] if name.endswith("[]") else value
    finally:
        await form.close()
    return body


def _size_of(images: list[bytes]) -> tuple[int, int] | None:
    if not images:
        return None
    from PIL import Image

    with contextlib.suppress(Exception), Image.open(io.BytesIO(images[0])) as image:
        return image.size
    return None


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
        self.gateway = Gateway(target, parse_networks(self.settings.trusted_proxies))
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
