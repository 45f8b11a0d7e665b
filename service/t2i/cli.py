"""The `t2i` command line: one command per verb.

Heavy modules (torch, diffusers, grpc) are imported inside the commands, after logging is
configured, so `t2i --help` is instant and import-time messages are formatted.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from . import logs

app = typer.Typer(help="Illustrious text-to-image service.", no_args_is_help=True, add_completion=False)

TARGET = typer.Option("localhost:50051", "--target", envvar="T2I_TARGET", help="gRPC address of the service.")
API_KEY = typer.Option(None, "--api-key", envvar="T2I_API_KEY", help="API key (x-illustrious-api-key).")


@app.callback()
def main(
    log_level: str = typer.Option("info", envvar="T2I_LOG_LEVEL", help="debug, info, warning or error."),
    log_format: str = typer.Option("json", envvar="T2I_LOG_FORMAT", help="json (one object per line) or text."),
) -> None:
    """Illustrious text-to-image service."""
    logs.configure(log_level, log_format)


@app.command()
def serve(
    grpc_port: int = typer.Option(50051, envvar="T2I_GRPC_PORT", help="gRPC port (0 picks a free one)."),
    grpc_host: str = typer.Option("0.0.0.0", envvar="T2I_GRPC_HOST", help="Address to bind the gRPC port to."),
    metrics_port: int = typer.Option(9464, envvar="T2I_METRICS_PORT", help="Prometheus port; -1 disables it."),
    models: Path | None = typer.Option(
        None, "--models", envvar="T2I_MODELS", help="Models file (YAML). Without it the demo model is served as modelId 1."
    ),
    data_dir: Path = typer.Option(Path("data"), envvar="T2I_DATA_DIR", help="Writable folder: demo model cache, ledger."),
    device: str = typer.Option("auto", envvar="T2I_DEVICE", help="auto, cpu or cuda."),
    attention: str = typer.Option("auto", envvar="T2I_ATTENTION", help="auto, sdpa or xformers."),
    max_batch_size: int = typer.Option(8, envvar="T2I_MAX_BATCH_SIZE", help="Requests per UNet evaluation."),
    admission_window_ms: float = typer.Option(
        20.0, envvar="T2I_ADMISSION_WINDOW_MS", help="How long an idle engine waits for companions of a first request."
    ),
    max_queue: int = typer.Option(64, envvar="T2I_MAX_QUEUE", help="Waiting requests before RESOURCE_EXHAUSTED."),
    grace_period: float = typer.Option(60.0, envvar="T2I_GRACE_PERIOD", help="Seconds to finish in-flight work on SIGTERM."),
    print_usage: bool = typer.Option(False, "--print-usage", help="Print how to call the service once it is ready."),
) -> None:
    """Run the gRPC service."""
    import asyncio

    from .engine.engine import EngineConfig
    from .server.app import serve as run_server
    from .settings import ServeSettings

    settings = ServeSettings(
        grpc_host=grpc_host,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        models_file=models,
        data_dir=data_dir,
        device=device,
        attention=attention,
        engine=EngineConfig(max_batch_size=max_batch_size, admission_window=admission_window_ms / 1000, max_queue=max_queue),
        grace_period=grace_period,
        print_usage=print_usage,
    )
    asyncio.run(run_server(settings))


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="What to draw."),
    out: Path = typer.Option(Path("image.png"), "--out", "-o", help="PNG file to write."),
    negative_prompt: str = typer.Option("", "--negative-prompt", "-n"),
    model_id: int = typer.Option(1, "--model-id"),
    width: int = typer.Option(1024, "--width"),
    height: int = typer.Option(1024, "--height"),
    steps: int = typer.Option(28, "--steps"),
    cfg_scale: float = typer.Option(7.0, "--cfg-scale"),
    seed: int = typer.Option(-1, "--seed", help="-1 picks a random seed."),
    sampler: str = typer.Option("euler", "--sampler"),
    scheduler: str = typer.Option("normal", "--scheduler"),
    target: str = TARGET,
    api_key: str | None = API_KEY,
) -> None:
    """Generate one image over gRPC and write it as PNG."""
    from .client import Client, ClientError

    with Client(target, api_key=api_key) as client:
        try:
            result = client.generate(
                prompt, negative_prompt=negative_prompt, model_id=model_id, width=width, height=height, steps=steps,
                cfg_scale=cfg_scale, seed=seed, sampler=sampler, scheduler=scheduler,
            )
        except ClientError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
    out.write_bytes(result.images[0])
    typer.echo(json.dumps({
        "file": str(out), "seed": result.seeds[0], "stardustUsage": result.stardust_usage,
        "stardustBalance": result.stardust_balance,
    }))


@app.command()
def models(target: str = TARGET, api_key: str | None = API_KEY) -> None:
    """List the models a running service offers."""
    from dataclasses import asdict

    from .client import Client, ClientError

    with Client(target, api_key=api_key) as client:
        try:
            infos = client.list_models()
        except ClientError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
    typer.echo(json.dumps([asdict(info) for info in infos], indent=2))


@app.command()
def info() -> None:
    """Print the samplers and schedulers this build supports."""
    from .sampling import SAMPLER_NAMES, SCHEDULER_NAMES

    typer.echo("samplers:   " + ", ".join(SAMPLER_NAMES))
    typer.echo("schedulers: " + ", ".join(SCHEDULER_NAMES))
