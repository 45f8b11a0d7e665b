"""The serving process: bind, load and warm the models, serve, and shut down gracefully.

Order matters for orchestrators: the port and the health service come up first (NOT_SERVING),
models load and warm up, and only then does health report SERVING. On SIGTERM health goes
back to NOT_SERVING, new requests are refused (UNAVAILABLE, before anything else looks at them:
a caller's rate limits must not answer 429 for a server that is going away), and in-flight ones
get `grace_period` to finish. Those still running after it are answered UNAVAILABLE, not
charged (a stream's last event says so), and get ANSWER_SECONDS to reach their callers before
the gRPC server stops.
Health follows the engine too: NOT_SERVING while its loop restarts after a failure, and for
good when it gives up, after which the process exits with EXIT_ENGINE_FAILED so that the
orchestrator replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc
from prometheus_client import start_http_server

from .. import metrics, wire
from ..engine.engine import AsyncEngine
from ..errors import Unavailable
from ..models.config import ModelSpec, load_models_file
from ..models.demo import demo_spec
from ..models.loader import LoadedModel, load_model, resolve_device
from ..settings import ServeSettings
from .catalog import ModelCatalog
from .interceptors import ServingInterceptor
from .servicer import TextToImageServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextToImageService"].full_name
assert SERVICE_NAME == wire.SERVICE, "t2i.wire.SERVICE must name the proto's service"
EXIT_ENGINE_FAILED = 70  # EX_SOFTWARE
# After the grace period: time for the UNAVAILABLE answers of the stopped generations to go out.
ANSWER_SECONDS = 2.0


def model_specs(settings: ServeSettings) -> list[ModelSpec]:
    if settings.models_file is None:
        return [demo_spec(settings.data_dir)]
    return load_models_file(settings.models_file)


def load_models(settings: ServeSettings) -> dict[int, LoadedModel]:
    device = resolve_device(settings.device)
    models = {}
    for spec in model_specs(settings):
        model = load_model(spec, device, settings.attention)
        metrics.MODEL_LOAD_SECONDS.labels(model=str(spec.id)).set(model.load_seconds)
        metrics.MODEL_INFO.labels(
            model=str(spec.id), name=spec.name, device=str(device), dtype=str(model.dtype).removeprefix("torch."),
            attention=model.attention,
        ).set(1)
        models[spec.id] = model
    return models


def usage_hint(port: int, model_id: int) -> str:
    return (
        f"\nThe service is ready on port {port}. Create an API key (t2i keys create --name me --balance 100), then:\n\n"
        f"  .venv/bin/t2i generate --target localhost:{port} --api-key ilx_... --model-id {model_id} --width 256 "
        f"--height 256 --steps 20 --prompt '1girl, masterpiece' --out image.png\n"
    )


class Server:
    """One serving process's gRPC server, engine and health state.

    `interceptors` run inside the ServingInterceptor (which maps their errors too); those with
    `start()`/`close()` coroutines are started after the models are up and closed on shutdown.
    """

    def __init__(
        self, settings: ServeSettings, catalog: ModelCatalog | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (), models: dict[int, LoadedModel] | None = None,
        compat=None,
    ) -> None:
        """`models`: already loaded models to serve instead of loading them from the settings;
        `compat`: the adapters' HTTP server (t2i.compat.app.CompatServer), started once the gRPC
        port is bound (it calls that port) and stopped after the gRPC server."""
        self.settings = settings
        self.compat = compat
        self.compat_port: int | None = None
        self._models = models
        self.catalog = catalog or ModelCatalog()
        self.interceptors = list(interceptors)
        self.servicer = TextToImageServicer(self.catalog)
        self.health = health.aio.HealthServicer()
        self.grpc = grpc.aio.server(
            interceptors=[ServingInterceptor(gate=self.catalog.unavailable), *interceptors],
            options=[
                ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
                ("grpc.max_send_message_length", settings.max_send_message_bytes),
                # Above what the edge forwards, so that its 431 is the only answer to big headers.
                ("grpc.max_metadata_size", wire.MAX_METADATA_BYTES),
                ("grpc.absolute_max_metadata_size", wire.MAX_METADATA_BYTES),
            ],
        )
        pb_grpc.add_TextToImageServiceServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self.port = self.grpc.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
        self.metrics_port: int | None = None
        self.engine: AsyncEngine | None = None
        self.failed = asyncio.Event()  # the engine gave up: the process should exit non-zero
        self._stopping = False
        self._background: set[asyncio.Future] = set()

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Bind and answer health checks (NOT_SERVING), then load and warm the models."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        if self.settings.metrics_port >= 0:
            http_server, _ = start_http_server(self.settings.metrics_port, addr=self.settings.metrics_host)
            self.metrics_port = http_server.server_address[1]
        if self.compat is not None:
            self.compat_port = await self.compat.start(self.port)
        log.info("listening", extra={"grpc_port": self.port, "metrics_port": self.metrics_port, "compat_port": self.compat_port})
        started = time.perf_counter()
        models = self._models or await asyncio.to_thread(load_models, self.settings)
        engine = AsyncEngine(models, self.settings.engine)
        loop = asyncio.get_running_loop()
        engine.on_health(lambda serving, reason: loop.call_soon_threadsafe(self._engine_health, serving, reason))
        engine.start()
        await engine.warm_up()
        self.engine = engine
        for interceptor in self.interceptors:
            if hasattr(interceptor, "start"):
                await interceptor.start()
        self.catalog.attach(engine)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"models": sorted(models), "startup_s": round(time.perf_counter() - started, 2)})
        if self.settings.print_usage:
            print(usage_hint(self.port, sorted(models)[0]), flush=True)

    def _engine_health(self, serving: bool, reason: str) -> None:
        """The engine's view of its health, on the event loop. SERVING is only restored once
        start-up is complete and while no shutdown is under way; a failed engine never is."""
        engine = self.engine
        fatal = engine is not None and engine.fatal.is_set()
        log.warning("engine health changed", extra={"serving": serving and not fatal, "reason": reason})
        if fatal:
            self.failed.set()
        if serving and (fatal or engine is None or self._stopping):
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        task = asyncio.ensure_future(self._set_health(status))
        self._background.add(task)  # referenced until done, so it cannot be collected mid-way
        task.add_done_callback(self._background.discard)

    async def stop(self, grace: float | None = None) -> None:
        """Stop admitting, let in-flight requests finish within the grace period, then stop."""
        grace = self.settings.grace_period if grace is None else grace
        self._stopping = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + grace
        answer = 0.5
        if self.engine is not None:
            self.engine.stop_admitting()
            drained = await self.engine.drain(grace)
            log.info("draining finished" if drained else "grace period over with requests in flight")
            if not drained:
                self.servicer.stop_generations(Unavailable(
                    f"the server is shutting down and this request did not finish within the {grace:g} s it was given; "
                    "it was stopped and not charged: retry it"
                ))
                answer = ANSWER_SECONDS
        # Let the answers of the last requests reach their callers before closing.
        await self.grpc.stop(max(answer, deadline - time.monotonic()))
        if self.compat is not None:
            await self.compat.stop()  # its last answers came from the gRPC calls that just ended
        if self.engine is not None:
            await self.engine.close()
        for interceptor in self.interceptors:
            if hasattr(interceptor, "close"):
                await interceptor.close()


async def run_until_signal(server: Server) -> int:
    """Run a server until SIGTERM or SIGINT (exit status 0) or until its engine gives up
    (EXIT_ENGINE_FAILED), then shut it down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP: re-read the LoRA folders (in a thread: registering a file reads and hashes it).
    loop.add_signal_handler(signal.SIGHUP, lambda: server.engine and loop.run_in_executor(None, server.engine.rescan_loras))
    starting = asyncio.create_task(server.start())
    stopper = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(server.failed.wait())
    done, _ = await asyncio.wait({starting, stopper, failed}, return_when=asyncio.FIRST_COMPLETED)
    if starting in done:
        try:
            starting.result()  # start-up errors end the process with their traceback
        except BaseException:
            # Stopped on this loop: left to its finalizer, the gRPC server would try to stop
            # itself on a loop already closed and add an "Event loop is closed" crash.
            await server.grpc.stop(None)
            if server.compat is not None:
                await server.compat.stop()
            raise
        done, _ = await asyncio.wait({stopper, failed}, return_when=asyncio.FIRST_COMPLETED)
    else:
        starting.cancel()
    stopper.cancel()
    failed.cancel()
    if server.failed.is_set():
        log.critical("the engine failed for good; exiting so that this replica is replaced")
        await server.stop(grace=5)
        return EXIT_ENGINE_FAILED
    log.info("shutting down", extra={"grace_period_s": server.settings.grace_period})
    await server.stop()
    return 0
