"""The OpenAI Images API's HTTP routes on the adapters' port (translations: openai_images)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from typing import Any

from illustrious.texttoimage.v1 import text_to_image_pb2 as pb

from .. import wire
from ..jobs.service import NO_BILLING
from ..server import convert
from . import openai_images as oa
from .app import (BodyTooLarge, ClientGone, Gateway, NotAJsonObject, Refused, echo, error_reply, media_type, read_body,
                  read_json_object)

MAX_FORM_FIELDS = 100


class Routes:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.started = int(time.time())

    @staticmethod
    def owns(path: str) -> bool:
        return path.startswith(oa.PREFIX)

    def routes(self) -> list:
        from starlette.routing import Route

        return [
            Route(oa.GENERATIONS, self._answering(oa.GENERATIONS, self.generations), methods=["POST"]),
            Route(oa.EDITS, self._answering(oa.EDITS, self.edits), methods=["POST"]),
            Route(oa.MODELS, self._answering(oa.MODELS, self.list_models), methods=["GET"]),
            Route(oa.MODELS + "/{model:path}", self._answering(oa.MODELS + "/{model}", self.get_model), methods=["GET"]),
        ]

    # --- replies -------------------------------------------------------------------------------

    error_response = staticmethod(error_reply)

    def _answering(self, route: str, handler):
        """Its OpenAIErrors, the service's refusals and a too-large body as OpenAI answers them."""
        from starlette.responses import Response

        async def endpoint(request) -> Response:
            try:
                return await handler(request, route)
            except Refused as refused:
                return self.error_response(oa.service_error(refused.status, refused.message, refused.trailers, route), request)
            except BodyTooLarge as error:
                return self.error_response(oa.OpenAIError(413, str(error), code="request_too_large"), request)
            except oa.OpenAIError as error:
                return self.error_response(error, request)
            except ClientGone:
                return Response(status_code=499)  # nobody reads it; the edge logs the disconnect
        return endpoint

    def http_error(self, request, error):
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
        return self.error_response(failure, request)

    def crash(self, request):
        return self.error_response(
            oa.OpenAIError(500, "internal error", type="server_error", code="server_error", retry=True), request)

    # --- handlers ------------------------------------------------------------------------------

    async def generations(self, request, route: str):
        try:
            body = await read_json_object(request, oa.ADAPTER.body_limit(route))
        except NotAJsonObject as bad:
            if bad.kind == "content_type":
                raise oa.OpenAIError(400, f"POST {route} takes a JSON body (Content-Type: application/json)", param=None,
                                     code="invalid_request_body") from None
            raise oa.OpenAIError(400, f"the body is not valid JSON ({bad.detail})" if bad.kind == "syntax" else
                                 "the body must be a JSON object", code="invalid_json") from None
        return await self.generate(request, route, body, form=False)

    async def edits(self, request, route: str):
        if not media_type(request).startswith("multipart/form-data"):
            raise oa.OpenAIError(400, f"POST {route} takes multipart/form-data (the picture and the mask as files)",
                                 code="invalid_request_body")
        limit = oa.ADAPTER.body_limit(route)
        body = await _form(request, await read_body(request, limit), limit)
        return await self.generate(request, route, body, form=True)

    async def generate(self, request, route: str, body: dict, form: bool):
        from starlette.responses import JSONResponse

        gateway = self.gateway
        models = await gateway.models(request)  # authenticates the caller first
        translated = oa.translate(body, route, models, form=form)
        message = convert.request_to_pb(translated.request)
        if translated.links:
            return await self.generate_linked(request, message, translated)
        response, initial = await gateway.call(gateway.stub.GenerateImage, message, request)
        images = list(response.images)
        headers = {
            oa.USAGE_HEADER: str(response.stardust_usage), oa.BALANCE_HEADER: str(response.stardust_balance),
            oa.SEEDS_HEADER: ",".join(str(seed) for seed in response.seeds),
            **{name: initial[name] for name in wire.RATE_LIMIT_HEADERS if name in initial},
        }
        answer = oa.images_response(images, translated.request.prompt, int(time.time()),
                                    response.output_format or translated.request.image_format, _size_of(images))
        return JSONResponse(answer, headers=echo(request, headers))

    async def generate_linked(self, request, message, translated: oa.Translated):
        """response_format url: the same generation as a job (the same money path: reserved,
        charged with its stored images), waited for here, answered with its images' URLs. A
        caller that goes away cancels it, uncharged, as a dropped synchronous call is."""
        from starlette.responses import JSONResponse

        gateway = self.gateway
        metadata = gateway.metadata(request)
        try:
            job, initial = await gateway.call(gateway.stub.SubmitJob, message, request, metadata)
        except Refused as refused:
            if refused.status == "FAILED_PRECONDITION" and refused.message.startswith(NO_BILLING):
                raise oa.invalid("response_format", "url", "needs stored results, and this server keeps none (it runs "
                                 "without billing): use b64_json") from None
            raise
        try:
            ended = await gateway.job_ended(job.id, request, metadata)
        except BaseException:
            # The caller went away, or following the job failed (a replica stopping, say): the
            # caller gets no URLs, so the job must not run on and be charged. Shielded: it goes
            # out even when this handler is being cancelled.
            await asyncio.shield(self._abandon(job.id, metadata))
            raise
        if ended.status != "succeeded":
            if ended.status == "failed":
                raise Refused(ended.error.status, ended.error.message, {})
            raise Refused("ABORTED", f"job {job.id} was {ended.status} before it could answer", {})
        base = link_base(request, gateway.public_url)
        headers = {
            oa.USAGE_HEADER: str(ended.stardust_usage), oa.BALANCE_HEADER: str(ended.stardust_balance),
            **{name: initial[name] for name in wire.RATE_LIMIT_HEADERS if name in initial},
        }
        size = (translated.request.width, translated.request.height) if translated.request.width else None
        answer = oa.images_response([], translated.request.prompt, int(time.time()), translated.request.image_format,
                                    size, urls=[base + path for path in ended.image_urls])
        return JSONResponse(answer, headers=echo(request, headers))

    async def _abandon(self, job_id: str, metadata) -> None:
        """Cancel a job nobody will collect, unless it already ended (cancelling a finished job
        would delete the images it was charged for)."""
        stub = self.gateway.stub
        with contextlib.suppress(Exception):
            job = await stub.GetJob(pb.GetJobRequest(id=job_id), metadata=metadata, timeout=30)
            if job.status in ("queued", "running"):
                await stub.CancelJob(pb.CancelJobRequest(id=job_id), metadata=metadata, timeout=30)

    async def list_models(self, request, route: str):
        from starlette.responses import JSONResponse

        models = await self.gateway.models(request)
        return JSONResponse(oa.models_list(models, self.started), headers=echo(request, {}))

    async def get_model(self, request, route: str):
        from starlette.responses import JSONResponse

        models = await self.gateway.models(request)
        model = oa.resolve_model(request.path_params["model"], models)
        ordered = sorted(models, key=lambda m: m.id)
        return JSONResponse(oa.model_object(model, ordered, self.started), headers=echo(request, {}))


def link_base(request, public_url: str) -> str:
    """Where links to this API start: --public-url, else the scheme and host the caller used
    (X-Forwarded-Proto, which the edge sets, and Host)."""
    if public_url:
        return public_url
    scheme = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    return f"{scheme if scheme in ('http', 'https') else 'http'}://{request.headers.get('host', request.url.netloc)}"


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
