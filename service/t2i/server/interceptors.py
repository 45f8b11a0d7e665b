"""The outermost server interceptor: request id, error mapping, metrics and access logs.

Every unary RPC passes through here, billing included, so a domain exception raised anywhere
below (servicer, engine, billing interceptor) becomes its status code in one place.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc

from .. import metrics, wire
from ..errors import ServiceError
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


class ServingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]

        async def behaviour(inner, request, context):
            token = request_id_var.set(request_id_of(context))
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return await inner(request, context)
            except ServiceError as error:
                code, message, trailers = status_for(error)
                log.info("request refused", extra={"method": method, "code": code.name, "error": message})
                await context.abort(code, message, trailing_metadata=trailers)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                log.info("request cancelled by the client", extra={"method": method})
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error", extra={"method": method})
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                seconds = time.perf_counter() - started
                metrics.REQUESTS.labels(method=method, code=code.name).inc()
                metrics.REQUEST_LATENCY.labels(method=method).observe(seconds)
                request_id_var.reset(token)

        return wrap_unary(handler, behaviour)
