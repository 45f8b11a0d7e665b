"""A1111's `/sdapi/v1` routes on the adapters' port (translations: a1111_api).

Authentication is HTTP Basic with the API key as the password (what `webuiapi` and A1111's
`--api-auth` send; the user name is not read); `x-illustrious-api-key` and `Authorization:
Bearer` work too. The key goes to the service as its own header, so the service alone judges it.

/progress and /interrupt concern the caller's own calls that this replica's adapter is serving:
each txt2img/img2img runs through GenerateImageStream (the same path and charge as
GenerateImage) so that its progress is known here. An interrupted call is cancelled, so it stops
at its next step and is not charged; it answers 409. With several replicas behind the edge, a
/progress or /interrupt reaches one replica and sees the calls that replica serves.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import time
import uuid
from dataclasses import dataclass, field

from .. import wire
from ..server import convert
from . import a1111_api as a1
from .app import BodyTooLarge, ClientGone, Gateway, NotAJsonObject, Refused, echo, error_reply, read_json_object

TIMESTAMP = "%Y%m%d%H%M%S"  # A1111's job_timestamp


@dataclass
class Running:
    """One call of a caller, as /progress reports it."""

    job: str
    timestamp: str
    task: asyncio.Task | None = None
    step: int = 0
    total: int = 0
    evaluations: int = 0
    total_evaluations: int = 0
    remaining: float = 0.0
    interrupted: bool = False

    def as_dict(self) -> dict:
        return {"job": self.job, "timestamp": self.timestamp, "step": self.step, "total": self.total,
                "evaluations": self.evaluations, "total_evaluations": self.total_evaluations, "remaining": self.remaining}


@dataclass
class Callers:
    """The running calls of each caller (by a digest of its key: the key itself is not kept)."""

    calls: dict[str, dict[str, Running]] = field(default_factory=dict)

    def add(self, caller: str, running: Running) -> None:
        self.calls.setdefault(caller, {})[running.job] = running

    def remove(self, caller: str, running: Running) -> None:
        jobs = self.calls.get(caller, {})
        jobs.pop(running.job, None)
        if not jobs:
            self.calls.pop(caller, None)

    def of(self, caller: str) -> list[Running]:
        return list(self.calls.get(caller, {}).values())


class Unauthenticated(Exception):
    pass


def credentials(request) -> tuple[list[tuple[str, str]], str]:
    """(the metadata that carries the caller's key to the service, a digest naming the caller).
    Basic's password becomes x-illustrious-api-key; the other forms pass as they came."""
    headers = request.headers
    authorization = headers.get(wire.AUTHORIZATION_HEADER, "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            _, colon, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, ValueError):
            raise Unauthenticated("the Basic credentials are not base64 of user:password") from None
        if not colon or not password:
            raise Unauthenticated("give the API key as the Basic password")
        key = password
        extra = [(wire.API_KEY_HEADER, key)]
    elif headers.get(wire.API_KEY_HEADER) or authorization:
        key = headers.get(wire.API_KEY_HEADER) or authorization
        extra = []
    else:
        raise Unauthenticated("Not authenticated: use HTTP Basic auth with your API key as the password")
    return extra, hashlib.sha256(key.encode()).hexdigest()


class Routes:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.callers = Callers()

    @staticmethod
    def owns(path: str) -> bool:
        return a1.is_a1111_path(path)

    def routes(self) -> list:
        from starlette.routing import Route

        handlers = {
            ("POST", a1.TXT2IMG): self.generate, ("POST", a1.IMG2IMG): self.generate,
            ("GET", a1.SD_MODELS): self.sd_models, ("GET", a1.SAMPLERS_PATH): self.samplers,
            ("GET", a1.SCHEDULERS_PATH): self.schedulers, ("GET", a1.LORAS_PATH): self.loras,
            ("GET", a1.OPTIONS): self.options, ("GET", a1.PROGRESS): self.progress,
            ("POST", a1.INTERRUPT): self.interrupt, ("GET", a1.SCRIPTS): self.scripts,
        }
        assert set(handlers) == {(r.method, r.path) for r in a1.ADAPTER.routes}, "a handler per declared route"
        return [Route(path, self._answering(path, handler), methods=[method]) for (method, path), handler in handlers.items()]

    # --- replies -------------------------------------------------------------------------------

    error_response = staticmethod(error_reply)

    def _answering(self, route: str, handler):
        from starlette.responses import Response

        async def endpoint(request) -> Response:
            try:
                metadata, caller = self._metadata(request)
                return await handler(request, route, metadata, caller)
            except Unauthenticated as error:
                return self.error_response(a1.A1111Error(401, str(error), headers={"WWW-Authenticate": a1.AUTH_REALM}),
                                           request)
            except Refused as refused:
                return self.error_response(a1.service_error(refused.status, refused.message, refused.trailers), request)
            except BodyTooLarge as error:
                return self.error_response(a1.A1111Error(413, str(error)), request)
            except a1.A1111Error as error:
                return self.error_response(error, request)
            except ClientGone:
                return Response(status_code=499)
        return endpoint

    def _metadata(self, request) -> tuple[list[tuple[str, str]], str]:
        extra, caller = credentials(request)
        metadata = [(name, value) for name, value in self.gateway.metadata(request)
                    if not (extra and name == wire.AUTHORIZATION_HEADER)]
        return metadata + extra, caller

    def http_error(self, request, error):
        if error.status_code == 404:
            failure = a1.A1111Error(404, f"Not Found: {request.method} {request.url.path}; the A1111-compatible API has "
                                    + ", ".join(f"{r.method} {r.path}" for r in a1.ADAPTER.routes))
        elif error.status_code == 405:
            failure = a1.A1111Error(405, "Method Not Allowed")
        else:
            failure = a1.A1111Error(error.status_code, str(error.detail))
        failure.headers.update(error.headers or {})
        return self.error_response(failure, request)

    def crash(self, request):
        return self.error_response(a1.A1111Error(500, "internal error"), request)

    # --- generation ----------------------------------------------------------------------------

    async def generate(self, request, route: str, metadata, caller: str):
        from starlette.responses import JSONResponse

        try:
            body = await read_json_object(request, a1.ADAPTER.body_limit(route))
        except NotAJsonObject as bad:
            if bad.kind == "shape":
                raise a1.A1111Error(422, "the body must be a JSON object", kind="model_attributes_type") from None
            raise a1.A1111Error(422, f"POST {route} takes a JSON body (Content-Type: application/json)"
                                if bad.kind == "content_type" else f"JSON decode error: {bad.detail}",
                                kind="json_invalid") from None
        models = await self.gateway.models(request, metadata)  # authenticates the caller first
        translated = a1.translate(body, route, models)
        message = convert.request_to_pb(translated.request)
        # Its steps are known before the first progress event comes (after the first step).
        running = Running(job=uuid.uuid4().hex, timestamp=time.strftime(TIMESTAMP), total=translated.request.steps)

        def on_progress(event) -> None:
            running.step, running.total = event.step, event.total_steps
            running.evaluations, running.total_evaluations = event.evaluations, event.total_evaluations
            running.remaining = event.remaining_seconds

        running.task = asyncio.ensure_future(self.gateway.generate_streamed(message, request, metadata, on_progress))
        self.callers.add(caller, running)
        try:
            response, initial = await asyncio.shield(running.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if running.interrupted and not (current is not None and current.cancelling()):
                raise a1.A1111Error(409, "interrupted by POST /sdapi/v1/interrupt before the images were finished; "
                                    "nothing was charged") from None
            running.task.cancel()  # this handler itself is being stopped
            raise
        finally:
            self.callers.remove(caller, running)
        images = list(response.images)
        answer = a1.response(body, translated, images, list(response.seeds), [_infotext(image) for image in images],
                             translated.model, running.timestamp)
        headers = {
            a1.USAGE_HEADER: str(response.stardust_usage), a1.BALANCE_HEADER: str(response.stardust_balance),
            **{name: initial[name] for name in wire.RATE_LIMIT_HEADERS if name in initial},
        }
        return JSONResponse(answer, headers=echo(request, headers))

    # --- the rest ------------------------------------------------------------------------------

    async def progress(self, request, route: str, metadata, caller: str):
        from starlette.responses import JSONResponse

        await self.gateway.models(request, metadata)  # only a known key learns anything
        running = [r.as_dict() for r in self.callers.of(caller)]
        return JSONResponse(a1.progress_body(running, time.strftime(TIMESTAMP)), headers=echo(request, {}))

    async def interrupt(self, request, route: str, metadata, caller: str):
        from starlette.responses import JSONResponse

        await self.gateway.models(request, metadata)
        stopped = 0
        for running in self.callers.of(caller):
            if running.task is not None and not running.task.done():
                running.interrupted = True
                running.task.cancel()
                stopped += 1
        return JSONResponse({"interrupted": stopped}, headers=echo(request, {}))

    async def sd_models(self, request, route: str, metadata, caller: str):
        from starlette.responses import JSONResponse

        models = await self.gateway.models(request, metadata)
        return JSONResponse([a1.sd_model(m) for m in sorted(models, key=lambda m: m.id)], headers=echo(request, {}))

    async def samplers(self, request, route: str, metadata, caller: str):
        from starlette.responses import JSONResponse

        await self.gateway.models(request, metadata)
        return JSONResponse(a1.samplers_list(), headers=echo(request, {}))

    async def schedulers(self, request, route: str, metadata, caller: str):
        from starlette.responses import JSONResponse

        await self.gateway.models(request, metadata)
        return JSONResponse(a1.schedulers_list(), headers=echo(request, {}))

    async def loras(self, request, route: str, metadata, caller: str):
        from starlette.responses import JSONResponse

        loras = await self.gateway.loras(request, metadata)
        return JSONResponse(a1.loras_list(loras), headers=echo(request, {}))

    async def options(self, request, route: str, metadata, caller: str):
        from starlette.responses import JSONResponse

        models = await self.gateway.models(request, metadata)
        return JSONResponse(a1.options(sorted(models, key=lambda m: m.id)[0]), headers=echo(request, {}))

    async def scripts(self, request, route: str, metadata, caller: str):
        from starlette.responses import JSONResponse

        await self.gateway.models(request, metadata)
        return JSONResponse({"txt2img": [], "img2img": []}, headers=echo(request, {}))


def _infotext(image: bytes) -> str:
    """The `parameters` text the image carries (its recipe, engine/recipe.py)."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as opened:
        return opened.info.get("parameters", "")
