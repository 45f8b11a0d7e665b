"""The TextToImageService servicer: decode the proto, call the engine, encode the response.

Errors are not handled here: domain exceptions propagate to the ServingInterceptor, which
maps them to status codes (server/status.py); the one exception is a stream that already sent
events, which ends with an error event instead. Billing never appears here either.

A shutdown whose grace period ran out calls `stop_generations(error)`: every generation still
waiting here answers with that error (a unary call's status, a stream's last event) instead of
being cut off without a word when the gRPC server stops, and its engine request is dropped.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from google.api import httpbody_pb2
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from ..errors import NotConfigured, ServiceError, Unavailable
from ..jobs.service import NO_BILLING, submitted_charge
from ..logs import request_id_var
from ..tenancy import current_tenant
from . import convert
from .catalog import ModelCatalog, checked_for
from .status import failed_event


class TextToImageServicer(pb_grpc.TextToImageServiceServicer):
    def __init__(self, catalog: ModelCatalog) -> None:
        self.catalog = catalog
        self._stopped = asyncio.Event()
        self._stop_error: ServiceError = Unavailable("the server is shutting down")

    def stop_generations(self, error: ServiceError) -> None:
        """Answer every generation in progress with `error` now (see the module docstring)."""
        self._stop_error = error
        self._stopped.set()

    async def _unless_stopped(self, awaitable):
        """The awaitable's result, or the stop error if generations are stopped first (a result
        that is ready by then still wins: its work is done)."""
        task = asyncio.ensure_future(awaitable)
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()  # the caller went away, or the stop: no one waits for it any more
        if not task.done():
            raise self._stop_error
        return task.result()

    async def GenerateImage(self, request: pb.GenerateImageRequest, context: grpc.aio.ServicerContext) -> pb.GenerateImageResponse:
        tenant = current_tenant.get()
        result = await self._unless_stopped(self.catalog.engine().generate(
            convert.request_from_pb(request), request_id=request_id_var.get(), deadline=_deadline(context),
            tenant=tenant.id, weight=tenant.weight, checked=checked_for(request),
        ))
        return convert.result_to_pb(result)

    async def GenerateImageStream(self, request: pb.GenerateImageRequest, context: grpc.aio.ServicerContext):
        events: asyncio.Queue = asyncio.Queue()
        tenant = current_tenant.get()
        generation = asyncio.ensure_future(self.catalog.engine().generate(
            convert.request_from_pb(request), request_id=request_id_var.get(), deadline=_deadline(context),
            events=events.put_nowait, tenant=tenant.id, weight=tenant.weight, checked=checked_for(request),
        ))
        # The engine hands every event to this loop before it settles the future, so the end
        # marker the future leaves comes after the last event.
        generation.add_done_callback(lambda _: events.put_nowait(None))
        sent = False
        try:
            try:
                while (event := await self._unless_stopped(events.get())) is not None:
                    sent = True
                    yield convert.event_to_pb(event)
                result = generation.result()
            except ServiceError as error:
                if not sent:
                    raise  # refused before anything was sent: the call's status says why
                yield convert.event_to_pb(failed_event(error))
                return
            yield convert.event_to_pb(result)
        finally:
            # The caller went away (or the stream failed): the engine drops the request
            # before its next evaluation, as for a cancelled unary call.
            generation.cancel()

    # --- jobs (t2i.jobs): billing authenticated the call; the key is the tenant -----------------

    def _jobs(self):
        if self.catalog.jobs is None:
            raise NotConfigured(f"{NO_BILLING}: this server runs with --no-billing")
        return self.catalog.jobs

    async def SubmitJob(self, request: pb.GenerateImageRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        jobs = self._jobs()
        job, position = await jobs.submit(submitted_charge.get())
        return convert.job_to_pb(job, position)

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        job, position, deliveries, progress = await self._jobs().get(current_tenant.get().id, request.id)
        return convert.job_to_pb(job, position, deliveries, progress)

    async def WatchJob(self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext):
        jobs, key_id = self._jobs(), current_tenant.get().id
        with jobs.watching(key_id):
            events = await jobs.watch(key_id, request.id, request.after)
            # Headers now: the call was accepted, though the job may say nothing for a while
            # (the REST adapter answers 200 on them, and a refusal by its status).
            await context.send_initial_metadata(())
            async for number, event in events:
                yield convert.job_event_to_pb(number, event)

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return convert.job_to_pb(await self._jobs().cancel(current_tenant.get().id, request.id))

    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        jobs, cursor = await self._jobs().list(current_tenant.get().id, request.status, request.cursor, request.page_size)
        return pb.ListJobsResponse(jobs=[convert.job_to_pb(job) for job in jobs], next_cursor=cursor)

    async def GetJobImage(self, request: pb.GetJobImageRequest, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        data, content_type = await self._jobs().image(current_tenant.get().id, request.id, request.index)
        return httpbody_pb2.HttpBody(content_type=content_type, data=data)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return convert.models_to_pb(self.catalog.engine().model_infos())

    async def ListLoras(self, request: pb.ListLorasRequest, context: grpc.aio.ServicerContext) -> pb.ListLorasResponse:
        return convert.loras_to_pb(self.catalog.engine().lora_descriptions(request.model_id))


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as a time.monotonic() value."""
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None
