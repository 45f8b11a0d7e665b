"""The real interceptor stack (request ids, error mapping, billing) around a servicer that
does no work, to measure what the interceptors themselves cost per request.

    python -m benchmarks.noop_server PORT [--database-url URL] [--redis-url URL] [--no-billing]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from types import SimpleNamespace

import grpc
from illustrious.texttoimage.v1 import text_to_image_pb2 as pb
from illustrious.texttoimage.v1 import text_to_image_pb2_grpc as pb_grpc

from t2i.billing.interceptor import BillingInterceptor
from t2i.billing.ledger import Ledger
from t2i.billing.database import open_database
from t2i.billing.ratelimit import create_limiter
from t2i.billing.settings import BillingSettings
from t2i.models.config import ModelSpec
from t2i.sampling import SigmaTable
from t2i.server.interceptors import ServingInterceptor
from t2i.validation import validate

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8ffff3f0005fe02fea7d6a4a60000000049454e44ae426082")


class NoWorkCatalog:
    """Stands in for the engine: validates like it, generates nothing."""

    spec_ = ModelSpec(id=1, name="no-op", path=Path("."), min_size=64)

    def model(self, model_id: int) -> SimpleNamespace:
        return SimpleNamespace(spec=self.spec_, sigma_table=SigmaTable.sdxl())

    def check(self, request) -> None:
        validate(request, self.spec_.info())

    def admission_check(self) -> None:
        pass  # no engine: never shutting down, never full


class NoWork(pb_grpc.TextToImageServiceServicer):
    async def GenerateImage(self, request, context):
        return pb.GenerateImageResponse(images=[PNG], seeds=[request.seed])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--no-billing", action="store_true")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics (e.g. ledger batch sizes)")
    args = parser.parse_args()
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr="127.0.0.1")
    interceptors = [ServingInterceptor()]
    if not args.no_billing:
        settings = BillingSettings()
        billing = BillingInterceptor(
            Ledger(open_database(args.database_url)), create_limiter(args.redis_url, settings), settings, NoWorkCatalog(),
            instance_id=f"noop:{args.port}",
        )
        await billing.start()
        interceptors.append(billing)
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_TextToImageServiceServicer_to_server(NoWork(), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
