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


DATA_DIR = typer.Option(Path("data"), "--data-dir", envvar="T2I_DATA_DIR", help="Writable folder: demo model cache, SQLite ledger.")
DATABASE_URL = typer.Option(
    None, "--database-url", envvar="T2I_DATABASE_URL",
    help="Billing database (postgresql://user:pass@host/db). Default: SQLite in the data dir.",
)
BILLING_CONFIG = typer.Option(None, "--billing-config", envvar="T2I_BILLING_CONFIG", help="Pricing and rate-limit tiers (YAML).")


@app.command()
def serve(
    grpc_port: int = typer.Option(50051, envvar="T2I_GRPC_PORT", help="gRPC port (0 picks a free one)."),
    grpc_host: str = typer.Option("0.0.0.0", envvar="T2I_GRPC_HOST", help="Address to bind the gRPC port to."),
    metrics_port: int = typer.Option(9464, envvar="T2I_METRICS_PORT", help="Prometheus port; -1 disables it."),
    models: Path | None = typer.Option(
        None, "--models", envvar="T2I_MODELS", help="Models file (YAML). Without it the demo model is served as modelId 1."
    ),
    data_dir: Path = DATA_DIR,
    device: str = typer.Option("auto", envvar="T2I_DEVICE", help="auto, cpu or cuda."),
    attention: str = typer.Option("auto", envvar="T2I_ATTENTION", help="auto, sdpa or xformers."),
    max_batch_size: int = typer.Option(8, envvar="T2I_MAX_BATCH_SIZE", help="Requests per UNet evaluation."),
    admission_window_ms: float = typer.Option(
        20.0, envvar="T2I_ADMISSION_WINDOW_MS", help="How long an idle engine waits for companions of a first request."
    ),
    max_queue: int = typer.Option(64, envvar="T2I_MAX_QUEUE", help="Waiting requests before RESOURCE_EXHAUSTED."),
    torch_threads: int = typer.Option(
        0, envvar="T2I_TORCH_THREADS", help="PyTorch intra-op threads; 0: cores - 1 on a CPU, PyTorch's default on CUDA."
    ),
    grace_period: float = typer.Option(60.0, envvar="T2I_GRACE_PERIOD", help="Seconds to finish in-flight work on SIGTERM."),
    billing: bool = typer.Option(True, "--billing/--no-billing", envvar="T2I_BILLING", help="API keys, stardust and rate limits."),
    database_url: str | None = DATABASE_URL,
    redis_url: str | None = typer.Option(
        None, "--redis-url", envvar="T2I_REDIS_URL", help="Shared rate limits (redis://host:6379/0). Default: in-process."
    ),
    billing_config: Path | None = BILLING_CONFIG,
    instance_id: str | None = typer.Option(
        None, "--instance-id", envvar="T2I_INSTANCE_ID", help="Stable name of this replica (default: host:port)."
    ),
    print_usage: bool = typer.Option(False, "--print-usage", help="Print how to call the service once it is ready."),
) -> None:
    """Run the gRPC service."""
    import asyncio

    from .engine.engine import EngineConfig
    from .server.app import Server, run_until_signal
    from .server.catalog import ModelCatalog
    from .settings import ServeSettings

    settings = ServeSettings(
        grpc_host=grpc_host,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        models_file=models,
        data_dir=data_dir,
        device=device,
        attention=attention,
        engine=EngineConfig(
            max_batch_size=max_batch_size, admission_window=admission_window_ms / 1000, max_queue=max_queue,
            torch_threads=torch_threads or None,
        ),
        grace_period=grace_period,
        print_usage=print_usage,
    )

    async def main() -> None:
        catalog = ModelCatalog()
        interceptors = []
        if billing:
            from .billing.interceptor import default_instance_id
            from .billing.setup import build_billing

            interceptor = build_billing(
                data_dir=data_dir, database_url=database_url, redis_url=redis_url, config_file=billing_config, catalog=catalog
            )
            interceptors.append(interceptor)
        server = Server(settings, catalog, interceptors)
        if billing:
            interceptor.instance_id = instance_id or default_instance_id(server.port)
        await run_until_signal(server)

    asyncio.run(main())


@app.command()
def up(
    http_port: int = typer.Option(8080, envvar="T2I_HTTP_PORT", help="Envoy port: the REST API and gRPC."),
    grpc_port: int = typer.Option(50051, envvar="T2I_GRPC_PORT", help="The service's own gRPC port."),
    metrics_port: int = typer.Option(9464, envvar="T2I_METRICS_PORT", help="The service's Prometheus port."),
    admin_port: int = typer.Option(9901, envvar="T2I_ENVOY_ADMIN_PORT", help="Envoy's admin port (127.0.0.1 only)."),
    host: str = typer.Option("127.0.0.1", envvar="T2I_HTTP_HOST", help="Address Envoy listens on."),
    data_dir: Path = DATA_DIR,
    route_timeout: float = typer.Option(300.0, envvar="T2I_ROUTE_TIMEOUT", help="Seconds Envoy waits for a generation."),
    billing: bool = typer.Option(True, "--billing/--no-billing", envvar="T2I_BILLING"),
    database_url: str | None = DATABASE_URL,
    demo_key: bool = typer.Option(True, "--demo-key/--no-demo-key", help="Create (or reuse) a demo API key and print it."),
    edge_config: Path | None = typer.Option(None, "--edge-config", help="Envoy config to run (default: edge/envoy.yaml)."),
    models: Path | None = typer.Option(None, "--models", envvar="T2I_MODELS", help="Models file (default: the demo model)."),
) -> None:
    """Run the service and the Envoy REST edge together (Ctrl-C stops both)."""
    from .edge.envoy_config import CANONICAL
    from .edge.launcher import UpSettings, run

    settings = UpSettings(
        data_dir=data_dir, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        admin_port=admin_port, route_timeout=route_timeout, billing=billing, database_url=database_url,
        demo_key=demo_key, edge_config=edge_config or CANONICAL, serve_args=["--models", str(models)] if models else [],
    )
    raise typer.Exit(run(settings))


edge_app = typer.Typer(help="The Envoy edge's generated files.", no_args_is_help=True)
app.add_typer(edge_app, name="edge")


@edge_app.command("descriptor")
def edge_descriptor(out: Path = typer.Option(..., "--out", help="Where to write the descriptor set.")) -> None:
    """Write the descriptor set that Envoy's gRPC-JSON transcoder loads."""
    from .edge.descriptor import write_descriptor

    typer.echo(str(write_descriptor(out)))


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


keys_app = typer.Typer(help="Administer API keys and their stardust (same database as `t2i serve`).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
JSON = typer.Option(False, "--json", help="Print JSON.")


def _ledger(data_dir: Path, database_url: str | None, billing_config: Path | None = None):
    from .billing.settings import load_billing_settings
    from .billing.setup import open_ledger

    settings = load_billing_settings(billing_config)
    return open_ledger(data_dir, database_url, settings), settings


def _key_json(record) -> dict:
    return {
        "id": record.id, "prefix": record.prefix, "name": record.name, "tier": record.tier, "balance": record.balance,
        "reserved": record.reserved, "created_at": record.created_at.isoformat(),
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
    }


def _run_admin(action):
    from .errors import ServiceError

    try:
        return action()
    except (ServiceError, ValueError, RuntimeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., "--name", help="Owner of the key."),
    balance: int = typer.Option(0, "--balance", help="Opening stardust balance."),
    tier: str | None = typer.Option(None, "--tier", help="Rate-limit tier (default: the config's default_tier)."),
    as_json: bool = JSON, data_dir: Path = DATA_DIR, database_url: str | None = DATABASE_URL,
    billing_config: Path | None = BILLING_CONFIG,
) -> None:
    """Create a key. The key is printed once and stored only as a hash."""
    def action():
        ledger, settings = _ledger(data_dir, database_url, billing_config)
        chosen = tier or settings.default_tier
        if chosen not in settings.tiers:
            raise ValueError(f"unknown tier {chosen!r}; tiers are: {', '.join(settings.tiers)}")
        return ledger.create_key(name, balance, chosen)

    record, key = _run_admin(action)
    if as_json:
        typer.echo(json.dumps({**_key_json(record), "key": key}))
    else:
        typer.echo(f"created {record.id} for {record.name!r} (tier {record.tier}, balance {record.balance})")
        typer.echo(f"key: {key}")
        typer.echo("This is the only time the key is shown; store it now.")


@keys_app.command("list")
def keys_list(as_json: bool = JSON, data_dir: Path = DATA_DIR, database_url: str | None = DATABASE_URL) -> None:
    """List keys (ids and prefixes, never the keys)."""
    records = _run_admin(lambda: _ledger(data_dir, database_url)[0].list_keys())
    if as_json:
        typer.echo(json.dumps([_key_json(r) for r in records]))
        return
    for r in records:
        state = "revoked" if r.revoked else "active"
        typer.echo(f"{r.id}  {r.prefix}...  {state:7}  {r.tier:9}  balance {r.balance:>10}  reserved {r.reserved:>6}  {r.name}")


@keys_app.command("revoke")
def keys_revoke(key_id: str, as_json: bool = JSON, data_dir: Path = DATA_DIR, database_url: str | None = DATABASE_URL) -> None:
    """Revoke a key: it is refused from now on (PERMISSION_DENIED)."""
    record = _run_admin(lambda: _ledger(data_dir, database_url)[0].revoke(key_id))
    typer.echo(json.dumps(_key_json(record)) if as_json else f"revoked {record.id}")


@keys_app.command("topup")
def keys_topup(
    key_id: str, amount: int, as_json: bool = JSON, data_dir: Path = DATA_DIR, database_url: str | None = DATABASE_URL
) -> None:
    """Add stardust to a key."""
    record = _run_admin(lambda: _ledger(data_dir, database_url)[0].topup(key_id, amount))
    typer.echo(json.dumps(_key_json(record)) if as_json else f"{record.id} balance is now {record.balance}")


@keys_app.command("balance")
def keys_balance(key_id: str, as_json: bool = JSON, data_dir: Path = DATA_DIR, database_url: str | None = DATABASE_URL) -> None:
    """Show a key's spendable and reserved stardust."""
    record = _run_admin(lambda: _ledger(data_dir, database_url)[0].get_key(key_id))
    if as_json:
        typer.echo(json.dumps({"id": record.id, "balance": record.balance, "reserved": record.reserved}))
    else:
        typer.echo(f"{record.id} balance {record.balance} (reserved {record.reserved})")


@keys_app.command("usage")
def keys_usage(
    key_id: str, limit: int = typer.Option(20, "--limit", help="How many recent ledger entries."), as_json: bool = JSON,
    data_dir: Path = DATA_DIR, database_url: str | None = DATABASE_URL,
) -> None:
    """Show a key's totals and its recent ledger entries."""
    record, entries, totals = _run_admin(lambda: _ledger(data_dir, database_url)[0].usage(key_id, limit))
    if as_json:
        typer.echo(json.dumps({"key": _key_json(record), "totals": totals, "entries": entries}, default=str))
        return
    typer.echo(f"{record.id}: credited {totals.get('credit', 0)}, charged {totals.get('commit', 0)}, balance {record.balance}")
    for e in entries:
        typer.echo(f"  {e['created_at']}  {e['kind']:8} {e['amount']:>8}  model {e['model_id'] or '-'}  {e['note'] or ''}")
