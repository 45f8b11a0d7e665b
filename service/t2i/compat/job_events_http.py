"""GET /jobs/{id}/events: a job's WatchJob stream as server-sent events that a client can resume.

The edge's transcoder turns server streams into `data:` lines without ids, so a client that lost
its connection could not say where it was. This route, on the adapters' port, calls WatchJob over
the service's own gRPC (authentication, rate limits and the key's own jobs as for every job
call) and writes each JobEvent as

    id: <its number>
    data: <the event as JSON, as the transcoder prints messages: lowerCamel, defaults printed>

Any SSE client resumes by sending the last id it saw as Last-Event-ID (browsers' EventSource
does it by itself); the stream then continues after that event, from any replica. A comment line
goes out when nothing happened for KEEP_ALIVE_SECONDS, so that proxies keep a quiet stream
(a long queue) open. The stream ends after the `ended` event. Refusals are the documented API's
JSON errors with their statuses, as the edge shapes every other REST error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re

import grpc
from google.protobuf.json_format import MessageToDict
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

from .. import wire
from ..errors import http_status_of
from .app import Gateway, echo

KEEP_ALIVE_SECONDS = 15.0
PATH = re.compile(r"/jobs/[^/]+/events/?")
LAST_EVENT_ID = "last-event-id"
EVENT_ID = re.compile(r"[0-9]{1,18}")  # within WatchJobRequest.after's int64


class Routes:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @staticmethod
    def owns(path: str) -> bool:
        return PATH.fullmatch(path) is not None

    def routes(self) -> list:
        from starlette.routing import Route

        return [Route(wire.JOB_EVENTS_PATH, self.events, methods=["GET"])]

    # --- replies -------------------------------------------------------------------------------

    @staticmethod
    def error(request, http: int, status: str, message: str, headers: dict[str, str] | None = None):
        from starlette.responses import JSONResponse

        request_id = request.headers.get(wire.REQUEST_ID_HEADER, "")
        body = {"error": {"code": http, "status": status, "message": message, "requestId": request_id}}
        return JSONResponse(body, status_code=http, headers=echo(request, headers or {}))

    def http_error(self, request, error):
        if error.status_code == 405:
            return self.error(request, 405, "UNIMPLEMENTED", f"method not allowed: use GET {request.url.path}",
                              {"allow": "GET"})
        return self.error(request, error.status_code, "NOT_FOUND" if error.status_code == 404 else "INVALID_ARGUMENT",
                          str(error.detail))

    def crash(self, request):
        return self.error(request, 500, "INTERNAL", "internal error")

    # --- the route -----------------------------------------------------------------------------

    async def events(self, request):
        from starlette.responses import StreamingResponse

        raw = request.headers.get(LAST_EVENT_ID, "").strip()
        if raw and not EVENT_ID.fullmatch(raw):
            return self.error(request, 400, "INVALID_ARGUMENT", f"Last-Event-ID: {raw[:40]!r} is not an event id: it must "
                              "be the id of an event this stream sent (a whole number), or left out to start from the start")
        after = int(raw) if raw else 0
        call = self.gateway.stub.WatchJob(pb.WatchJobRequest(id=request.path_params["id"], after=after),
                                          metadata=self.gateway.metadata(request))
        # The service sends its headers once it accepted the call, before the first event; a
        # refusal ends the call instead, and is answered with its status.
        await call.initial_metadata()
        if call.done() and await call.code() != grpc.StatusCode.OK:
            trailers = {k: v for k, v in (await call.trailing_metadata() or ()) if isinstance(v, str)}
            status = (await call.code()).name
            headers = {"retry-after": trailers["retry-after"]} if "retry-after" in trailers else {}
            return self.error(request, http_status_of(status), status, await call.details() or status, headers)
        return StreamingResponse(self._stream(call), media_type="text/event-stream",
                                 headers=echo(request, {"cache-control": "no-cache"}))

    async def _stream(self, call):
        messages: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            try:
                async for message in call:
                    messages.put_nowait(message)
            except grpc.aio.AioRpcError as error:
                messages.put_nowait(error)
            finally:
                messages.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                try:
                    message = await asyncio.wait_for(messages.get(), KEEP_ALIVE_SECONDS)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if message is None:
                    return
                if isinstance(message, grpc.aio.AioRpcError):
                    # Ended after events had gone out (the server stopping, say): a client
                    # reconnects with its Last-Event-ID and goes on, on another replica if need be.
                    status = message.code().name
                    error = {"error": {"code": http_status_of(status), "status": status, "message": message.details() or ""}}
                    yield f"event: error\ndata: {json.dumps(error)}\n\n".encode()
                    return
                data = json.dumps(MessageToDict(message, always_print_fields_with_no_presence=True), separators=(",", ":"))
                yield f"id: {message.id}\ndata: {data}\n\n".encode()
        finally:
            call.cancel()  # the caller went away: nobody watches any more
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
