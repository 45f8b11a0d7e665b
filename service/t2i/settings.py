"""Settings of a serving process: each stated once, with its default, help and environment name.

The `t2i serve` options are built from these dataclasses (t2i.cli_options), the README's flag
table is rendered from them (scripts/render.py), and a test checks the Kubernetes env file
against them. A field declared with `setting(...)` becomes `--field-name` / `T2I_FIELD_NAME`
unless `flag` or `env` say otherwise; a plain field is not on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import wire

DATA_DIR = Path("data")
GRACE_PERIOD = 60.0  # seconds in-flight requests get after SIGTERM


def setting(default, help: str, *, flag: str | None = None, env: str | None = "", doc_default: str | None = None):
    """A field that is also a command-line option. env=None: no environment variable;
    doc_default: how the README shows a default that is not a plain value."""
    return field(default=default, metadata={"help": help, "flag": flag, "env": env, "doc_default": doc_default})


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = setting(
        8, "Images per UNet evaluation (a request of numImages N counts N; each image is two rows, cond and uncond); "
        "with fair sharing, an API key with nothing running may join a full batch, up to twice this."
    )
    admission_window_ms: float = setting(20.0, "How long an idle engine waits for companions of a first request, at most.")
    admission_gap_ms: float = setting(
        2.0, "The idle engine's wait for companions ends when none arrived for this long (a lone request starts at once)."
    )
    max_queue: int = setting(64, "Waiting requests before RESOURCE_EXHAUSTED.")
    # OpenMP teams spinning against the gRPC and decode threads on a fully booked machine cost
    # more than the extra thread gains (measured: 2x at batch 1 on 2 cores), hence cores - 1.
    torch_threads: int = setting(
        0, "PyTorch intra-op threads; 0: cores - 1 on a CPU, PyTorch's default on CUDA.", doc_default="0 (auto)"
    )
    max_consecutive_failures: int = setting(
        3, "UNet evaluations failing in a row after which the engine gives up (a broken device) and the process exits."
    )
    max_loop_failures: int = setting(3, "Engine loop failures within the window after which the process exits.")
    loop_failure_window: float = setting(60.0, "Seconds over which engine loop failures are counted.")
    fair_share: bool = setting(True, "Admit and alternate requests by each API key's share of the work done (off: first come, first served).")
    oldest_first: bool = setting(
        True, "Within an API key, the latent size of its oldest running request runs next, so none of its requests "
        "waits on work sent after it (the shortest tail); off: each running request's size in turn (all progress at "
        "once, and a request's latency grows with the work running beside it)."
    )
    progress_interval_ms: float = setting(250.0, "Streams: the least time between two queued or progress events of a request.")
    preview_interval_ms: float = setting(
        500.0, "Streams: the least time between two previews of a request (on top of its previewEverySteps)."
    )
    png_compress_level: int = 4
    png_workers: int = 2
    # Benchmarks only: split batches by LoRA set (the policy this engine is measured against).
    lora_sets_apart: bool = False


@dataclass(frozen=True)
class ServeSettings:
    grpc_host: str = setting(
        "127.0.0.1", "Address to bind the gRPC port to (0.0.0.0 in a container, where the edge is another pod)."
    )
    grpc_port: int = setting(wire.GRPC_PORT, "gRPC port, health and reflection included (0 picks a free one).")
    metrics_host: str = setting("127.0.0.1", "Address to bind the Prometheus port to.")
    metrics_port: int = setting(wire.METRICS_PORT, "Prometheus /metrics port; -1 disables it.")
    models_file: Path | None = setting(
        None, "Models file (YAML); without one the demo model is served as modelId 1.", flag="--models", env="T2I_MODELS",
        doc_default="none",
    )
    data_dir: Path = setting(DATA_DIR, "Writable folder: demo model cache, SQLite ledger.", doc_default="`data`")
    device: str = setting("auto", "auto, cpu (fp32) or cuda (fp16 weights, fp32 VAE decode).")
    attention: str = setting("auto", "auto (xformers when installed on CUDA, else PyTorch SDPA), sdpa or xformers.")
    grace_period: float = setting(GRACE_PERIOD, "Seconds to finish in-flight work after SIGTERM.")
    billing: bool = setting(True, "API keys, stardust and rate limits (see Billing).", doc_default="on")
    database_url: str | None = setting(
        None, "Billing database (postgresql://user:pass@host/db). Default: SQLite in the data dir.",
        doc_default="SQLite in the data dir",
    )
    redis_url: str | None = setting(
        None, "Shared rate limits (redis://host:6379/0). Default: in-process.", doc_default="in-process"
    )
    billing_config: Path | None = setting(None, "Pricing and rate-limit tiers (YAML).", doc_default="built-in")
    instance_id: str | None = setting(None, "Stable name of this replica for crash recovery.", doc_default="host:port")
    trusted_proxies: str = setting(
        "127.0.0.1/32,::1/128",
        "Peers (comma-separated CIDRs) whose x-forwarded-for names the client; other peers are the client themselves.",
    )
    webhook_allow: str = setting(
        "", "Hosts and CIDRs (comma-separated) that job webhooks may reach although they are not public addresses "
        "(loopback, private, link-local); by default only public addresses are.", doc_default="none",
    )
    compat_host: str = setting(
        "127.0.0.1", "Address to bind the adapters' HTTP port to (0.0.0.0 in a container, where the edge is another pod)."
    )
    compat_port: int = setting(
        wire.COMPAT_PORT,
        "HTTP port of the adapters (the OpenAI Images API under /v1/, which the edge routes here); 0 picks a free "
        "one, -1 turns them off. They call the gRPC port over loopback, so --trusted-proxies must include 127.0.0.1.",
    )
    public_url: str = setting(
        "", "The API's public base URL (https://api.example.com): links to stored job images start with it (the OpenAI "
        "adapter's response_format url). By default they are built from the request's Host and X-Forwarded-Proto.",
        doc_default="from the request",
    )
    print_usage: bool = setting(False, "Print how to call the service once it is ready.", env=None, doc_default="off")
    engine: EngineConfig = field(default_factory=EngineConfig)
    # The edge's largest body (the image routes' and native gRPC's cap), so that whatever the
    # edge lets through is received, and calling the service directly gains nothing. gRPC's
    # default (4 MiB) would refuse most pictures.
    max_receive_message_bytes: int = wire.MAX_IMAGE_REQUEST_BYTES
    max_send_message_bytes: int = wire.MAX_RESPONSE_BYTES


@dataclass(frozen=True)
class UpSettings:
    """`t2i up`: the service and the Envoy edge together on one machine."""

    http_port: int = setting(wire.HTTP_PORT, "Envoy port: the REST API and gRPC.")
    host: str = setting("127.0.0.1", "Address Envoy listens on.", env="T2I_HTTP_HOST")
    grpc_port: int = setting(wire.GRPC_PORT, "The service's own gRPC port (bound to 127.0.0.1).")
    metrics_port: int = setting(wire.METRICS_PORT, "The service's Prometheus port (bound to 127.0.0.1).")
    compat_port: int = setting(
        wire.COMPAT_PORT, "The service's adapter port (the OpenAI Images API; bound to 127.0.0.1), behind Envoy's /v1/."
    )
    admin_port: int = setting(wire.ENVOY_ADMIN_PORT, "Envoy's admin port (127.0.0.1 only).", env="T2I_ENVOY_ADMIN_PORT")
    data_dir: Path = setting(DATA_DIR, "Writable folder: demo model cache, SQLite ledger, the edge's files.")
    route_timeout: float = setting(wire.ROUTE_TIMEOUT, "Seconds Envoy waits for a generation.")
    billing: bool = setting(True, "API keys, stardust and rate limits.")
    database_url: str | None = setting(None, "Billing database (default: SQLite in the data dir).")
    models_file: Path | None = setting(None, "Models file (default: the demo model).", flag="--models", env="T2I_MODELS")
    demo_key: bool = setting(True, "Create (or reuse) a demo API key and print it.", env=None)
    edge_config: Path | None = setting(None, "Envoy config to run (default: edge/envoy.yaml).", env=None)
    grace_period: float = setting(GRACE_PERIOD, "Seconds in-flight requests get to finish on Ctrl-C or SIGTERM.")
    webhook_allow: str = setting("", "Passed to `t2i serve --webhook-allow`: non-public hosts and CIDRs job webhooks may reach.",
                                 doc_default="none")
