"""The outermost server interceptor: request id, error mapping, metrics and access logs.

Every unary RPC passes through here, billing included, so a domain exception raised anywhere
below (servicer, engine, billing interceptor) becomes its status code in one place. Generation
calls also pass its gate first: while the server cannot take any (starting, shutting down) they
are UNAVAILABLE before billing authenticates or rate-limits them, so a caller at its limits
hears the truth (503, retry elsewhere) rather than 429, and spends no rate-limit tokens on it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from .. import metrics, wire
from ..errors import InvalidArgument, ServiceError, Unavailable
from ..logs import request_id_var
from .status import status_for

log = logging.getLogger(__name__)

# What a request id may look like: it is logged, stored in the ledger and echoed, so one
# caller's odd header must never break anything (a long one once failed a whole group commit).
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,%d}" % wire.MAX_REQUEST_ID)


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value
    return None


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-request-id when it is well-formed, else a new one (the original is logged,
    truncated, so it can still be traced)."""
    sent = metadata_value(context, wire.REQUEST_ID_HEADER)
    if sent is not None and REQUEST_ID.fullmatch(sent):
        return sent
    generated = uuid.uuid4().hex
    if sent is not None:
        log.info("invalid x-request-id replaced", extra={"sent": sent[:64], "length": len(sent), "request_id": generated})
    return generated


def wrap_unary(
    handler: grpc.RpcMethodHandler, behaviour: Callable[[Callable, object, grpc.aio.ServicerContext], Awaitable]
) -> grpc.RpcMethodHandler:
    """A copy of a unary-unary handler whose behaviour is `behaviour(inner, request, context)`."""
    inner = handler.unary_unary

    async def call(request, context):
        return await behaviour(inner, request, context)

    return grpc.unary_unary_rpc_method_handler(
        call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def wrap_stream(
    handler: grpc.RpcMethodHandler, behaviour: Callable[[Callable, object, grpc.aio.ServicerContext], AsyncIterator]
) -> grpc.RpcMethodHandler:
    """A copy of a unary-stream handler whose messages are those of `behaviour(inner, request,
    context)`, an async generator."""
    inner = handler.unary_stream

    async def call(request, context):
        async for message in behaviour(inner, request, context):
            yield message

    return grpc.unary_stream_rpc_method_handler(
        call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class _Served:
    """One call's request id, metrics, access log and error mapping, for unary and streaming
    handlers alike: a ServiceError becomes its status (refusals before a stream's first
    message; the servicer turns later ones into error events)."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method, self.context = method, context
        self.code = grpc.StatusCode.OK

    async def __aenter__(self) -> _Served:
        self.token = request_id_var.set(request_id_of(self.context))
        self.started = time.perf_counter()
        return self

    async def __aexit__(self, kind, error, traceback) -> bool:
        try:
            if error is None:
                return False
            if isinstance(error, ServiceError):
                self.code, message, trailers = status_for(error)
                log.info("request refused", extra={"method": self.method, "code": self.code.name, "error": message})
                await self.context.abort(self.code, message, trailing_metadata=trailers)
            elif isinstance(error, asyncio.CancelledError):
                self.code = grpc.StatusCode.CANCELLED
                log.info("request cancelled by the client", extra={"method": self.method})
            elif isinstance(error, grpc.aio.AbortError):
                self.code = self.context.code() or grpc.StatusCode.UNKNOWN
            elif isinstance(error, Exception):
                self.code = grpc.StatusCode.INTERNAL
                log.error("unhandled error", extra={"method": self.method}, exc_info=(kind, error, traceback))
                await self.context.abort(grpc.StatusCode.INTERNAL, "internal error")
            return False
        finally:
            metrics.REQUESTS.labels(method=self.method, code=self.code.name).inc()
            metrics.REQUEST_LATENCY.labels(method=self.method).observe(time.perf_counter() - self.started)
            request_id_var.reset(self.token)


# Calls that take a GenerateImageRequest (SubmitJob runs it later, but is priced now).
GENERATION_METHODS = frozenset({wire.GENERATE_METHOD, wire.GENERATE_STREAM_METHOD, wire.SUBMIT_JOB_METHOD})


class ServingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, gate: Callable[[], Unavailable | None] = lambda: None) -> None:
        """`gate()`: why no generation can be taken right now, or None."""
        self.gate = gate

    def _pass_gate(self, full_method: str) -> None:
        if full_method in GENERATION_METHODS and (refusal := self.gate()) is not None:
            raise refusal

    @staticmethod
    def _check_route(full_method: str, request, context: grpc.aio.ServicerContext) -> None:
        """The REST image routes are GenerateImage(Stream) with a picture: one without is
        refused here, before billing (the transcoder names the REST path it rewrote)."""
        if full_method not in GENERATION_METHODS or request.init_image:
            return
        path = metadata_value(context, wire.ORIGINAL_PATH_HEADER) or ""
        if path.split("?", 1)[0] in wire.IMAGE_PATHS:
            raise InvalidArgument(
                "initImage", b"", f"is required on POST {path.split('?', 1)[0]}: the picture to start from, a base64 PNG, "
                "JPEG or WebP (text-to-image is POST /text-to-image/generate)",
            )

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            async def unary(inner, request, context):
                async with _Served(method, context):
                    self._pass_gate(details.method)
                    self._check_route(details.method, request, context)
                    return await inner(request, context)

            return wrap_unary(handler, unary)
        # Server streams written as async generators (GenerateImageStream); others, such as the
        # health service's Watch (a coroutine that calls context.write), pass through as they are.
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            async def stream(inner, request, context):
                async with _Served(method, context):
                    self._pass_gate(details.method)
                    self._check_route(details.method, request, context)
                    async for message in inner(request, context):
                        yield message

            return wrap_stream(handler, stream)
        return handler
