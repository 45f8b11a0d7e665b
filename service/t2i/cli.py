"""The `t2i` command line: one command per verb.

Heavy modules (torch, diffusers, grpc) are imported inside the commands, after logging is
configured, so `t2i --help` is instant and import-time messages are formatted.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from . import logs, wire
from .cli_options import option_for, with_options
from .domain import PROMPT_SYNTAXES, RESIZE_MODES, UPSCALE_METHODS, GenerateRequest, HiresFix
from .settings import ServeSettings, UpSettings

REQUEST = GenerateRequest()
HIRES = HiresFix()

app = typer.Typer(help="Illustrious text-to-image service.", no_args_is_help=True, add_completion=False)

TARGET = typer.Option(f"localhost:{wire.GRPC_PORT}", "--target", envvar="T2I_TARGET", help="gRPC address of the service.")
API_KEY = typer.Option(None, "--api-key", envvar="T2I_API_KEY", help="API key (x-illustrious-api-key).")


@app.callback()
def main(
    log_level: str = typer.Option("info", envvar="T2I_LOG_LEVEL", help="debug, info, warning or error."),
    log_format: str = typer.Option("json", envvar="T2I_LOG_FORMAT", help="json (one object per line) or text."),
) -> None:
    """Illustrious text-to-image service."""
    logs.configure(log_level, log_format)


EXIT_BAD_CONFIG = 2  # what a bad option gets, too: nothing started


def check_models_file(path: Path | None) -> None:
    """Exit with EXIT_BAD_CONFIG and one log line naming the file, the key and what is
    allowed, before anything starts, when the models file cannot be used."""
    if path is None:
        return
    import logging

    from .models.config import ModelsFileError, load_models_file

    try:
        load_models_file(path)
    except ModelsFileError as error:
        logging.getLogger("t2i.cli").error(str(error))
        raise typer.Exit(EXIT_BAD_CONFIG) from None


DATA_DIR = option_for(ServeSettings, "data_dir")
DATABASE_URL = option_for(ServeSettings, "database_url")
BILLING_CONFIG = option_for(ServeSettings, "billing_config")


@app.command()
@with_options(ServeSettings)
def serve(settings: ServeSettings) -> None:
    """Run the gRPC service (and the adapters' HTTP port: the OpenAI Images API)."""
    check_models_file(settings.models_file)
    import asyncio
    import logging

    from .server.app import Server, run_until_signal
    from .server.catalog import ModelCatalog

    compat = None
    if settings.compat_port >= 0:
        from .compat.app import CompatServer, configuration_error

        problem = configuration_error(settings)
        if problem:
            logging.getLogger("t2i.cli").error(problem)
            raise typer.Exit(EXIT_BAD_CONFIG)
        compat = CompatServer(settings)

    async def main() -> int:
        catalog = ModelCatalog()
        interceptors = []
        if settings.billing:
            from .billing.interceptor import default_instance_id
            from .billing.setup import build_billing

            try:
                interceptor = build_billing(settings, catalog)
            except (RuntimeError, ValueError) as error:  # a bad config or an unreachable ledger
                logging.getLogger("t2i.cli").error(str(error))
                return 1
            interceptors.append(interceptor)
        server = Server(settings, catalog, interceptors, compat=compat)
        if settings.billing:
            interceptor.instance_id = settings.instance_id or default_instance_id(server.port)
        return await run_until_signal(server)

    raise typer.Exit(asyncio.run(main()))


@app.command()
@with_options(UpSettings)
def up(settings: UpSettings) -> None:
    """Run the service and the Envoy REST edge together (Ctrl-C stops both)."""
    check_models_file(settings.models_file)
    from .edge.launcher import run

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
    negative_prompt: str = typer.Option(REQUEST.negative_prompt, "--negative-prompt", "-n"),
    model_id: int = typer.Option(REQUEST.model_id, "--model-id"),
    # None: REQUEST's size, or 0 (the picture's own size) with --init-image.
    width: int | None = typer.Option(
        None, "--width", show_default=False, help=f"Default {REQUEST.width}; with --init-image 0: the picture's width."
    ),
    height: int | None = typer.Option(
        None, "--height", show_default=False, help=f"Default {REQUEST.height}; with --init-image 0: the picture's height."
    ),
    steps: int = typer.Option(REQUEST.steps, "--steps"),
    cfg_scale: float = typer.Option(REQUEST.cfg_scale, "--cfg-scale"),
    cfg_rescale: float = typer.Option(
        REQUEST.cfg_rescale, "--cfg-rescale", help="RescaleCFG multiplier, 0 (plain cfg) to 1; 0.7 is usual for v-pred models."
    ),
    seed: int = typer.Option(REQUEST.seed, "--seed", help="-1 picks a random seed."),
    sampler: str = typer.Option(REQUEST.sampler, "--sampler"),
    scheduler: str = typer.Option(REQUEST.scheduler, "--scheduler"),
    lora: list[str] = typer.Option([], "--lora", help="A LoRA as NAME[:STRENGTH[:STRENGTH_CLIP]]; repeatable."),
    init_image: Path | None = typer.Option(
        None, "--init-image", help="Image to image: the picture to start from (PNG, JPEG or WebP)."
    ),
    mask: Path | None = typer.Option(
        None, "--mask", help="Inpainting (with --init-image): white repaints, black keeps."
    ),
    denoise: float = typer.Option(
        REQUEST.denoise, "--denoise", help="How much of --init-image is re-drawn: 0.01 to 1 (1: all of it, from pure noise)."
    ),
    resize_mode: str | None = typer.Option(
        None, "--resize-mode", show_default=False,
        help=f"How --init-image fits another size: {', '.join(RESIZE_MODES)} (default {REQUEST.resize}).",
    ),
    hires_scale: float | None = typer.Option(
        None, "--hires-scale", help="Hires fix: a second pass at this scale of the size, more than 1 (e.g. 1.5).", show_default=False
    ),
    hires_steps: int | None = typer.Option(
        None, "--hires-steps", help="Hires fix steps (default: --steps).", show_default=False
    ),
    hires_denoise: float | None = typer.Option(
        None, "--hires-denoise", help=f"Hires fix denoise (default {HIRES.denoise}).", show_default=False
    ),
    hires_upscaler: str | None = typer.Option(
        None, "--hires-upscaler", show_default=False,
        help=f"Hires fix latent upscale method: {', '.join(UPSCALE_METHODS)} (default {HIRES.method}).",
    ),
    prompt_syntax: str | None = typer.Option(
        None, "--prompt-syntax", show_default=False,
        help=f"How the prompts are read: {', '.join(PROMPT_SYNTAXES)} (default {PROMPT_SYNTAXES[0]}; a1111: A1111's "
             "weights, BREAK and <lora:NAME:WEIGHT> tags).",
    ),
    job: bool = typer.Option(
        False, "--job", help="Submit it as a job instead and print the job (JSON); `t2i jobs fetch` gets its images."
    ),
    target: str = TARGET,
    api_key: str | None = API_KEY,
) -> None:
    """Generate one image over gRPC and write it as PNG (image to image with --init-image)."""
    from .client import Client, ClientError

    # A size left out: the request's default, or with a picture 0, the picture's own size.
    default_width, default_height = (0, 0) if init_image is not None else (REQUEST.width, REQUEST.height)
    options = dict(
        negative_prompt=negative_prompt, model_id=model_id, steps=steps, cfg_scale=cfg_scale, seed=seed,
        sampler=sampler, scheduler=scheduler, loras=tuple(map(_lora, lora)), cfg_rescale=cfg_rescale,
        width=default_width if width is None else width, height=default_height if height is None else height,
        denoise=denoise, **({} if resize_mode is None else {"resize_mode": resize_mode}),
        **({} if prompt_syntax is None else {"prompt_syntax": prompt_syntax}),
        **_pictures(init_image, mask), **_hires_fix(hires_scale, hires_steps, hires_denoise, hires_upscaler),
    )
    with Client(target, api_key=api_key) as client:
        try:
            if job:
                typer.echo(_job_json(client.submit_job(prompt, **options)))
                return
            result = client.generate(prompt, **options)
        except ClientError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
    out.write_bytes(result.images[0])
    typer.echo(json.dumps({
        "file": str(out), "seed": result.seeds[0], "stardustUsage": result.stardust_usage,
        "stardustBalance": result.stardust_balance,
    }))


def _read_picture(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise typer.BadParameter(f"cannot read {str(path)!r}: {error.strerror or error}", param_hint=flag) from None
    if not data:
        raise typer.BadParameter(f"{str(path)!r} is empty: a PNG, JPEG or WebP file is expected", param_hint=flag)
    return data


def _pictures(init_image: Path | None, mask: Path | None) -> dict:
    """The request's picture fields, read here so that a bad path is a usage error naming the
    flag before anything is sent."""
    if mask is not None and init_image is None:
        raise typer.BadParameter("a mask needs --init-image (the picture it applies to)", param_hint="--mask")
    pictures = {}
    if init_image is not None:
        pictures["init_image"] = _read_picture(init_image, "--init-image")
    if mask is not None:
        pictures["mask"] = _read_picture(mask, "--mask")
    return pictures


def _hires_fix(scale: float | None, steps: int | None, denoise: float | None, upscaler: str | None) -> dict:
    """hires_fix from the --hires-* flags: none without --hires-scale (the others only tune it);
    a flag left out takes HiresFix's default."""
    if scale is None:
        given = [flag for flag, value in (("--hires-steps", steps), ("--hires-denoise", denoise),
                                          ("--hires-upscaler", upscaler)) if value is not None]
        if given:
            raise typer.BadParameter(f"{', '.join(given)} tune the hires fix, which --hires-scale turns on",
                                     param_hint="--hires-scale")
        return {}
    tuned = {"steps": steps, "denoise": denoise, "upscale_method": upscaler}
    return {"hires_fix": HiresFix(scale=scale, **{name: value for name, value in tuned.items() if value is not None})}


def _lora(text: str):
    from .domain import LoraSpec

    name, *strengths = text.split(":")
    try:
        values = [float(v) for v in strengths]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: strengths must be numbers (NAME[:STRENGTH[:STRENGTH_CLIP]])") from None
    if len(values) > 2:
        raise typer.BadParameter(f"{text!r}: at most two strengths (NAME[:STRENGTH[:STRENGTH_CLIP]])")
    return LoraSpec(name, *values)


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
def loras(
    model_id: int = typer.Option(0, "--model-id", help="Only this model's LoRAs (0: every model's)."),
    target: str = TARGET, api_key: str | None = API_KEY,
) -> None:
    """List the LoRAs a running service offers (add files to a model's lora_dir, then SIGHUP it)."""
    from dataclasses import asdict

    from .client import Client, ClientError

    with Client(target, api_key=api_key) as client:
        try:
            found = client.list_loras(model_id)
        except ClientError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
    typer.echo(json.dumps([asdict(lora) for lora in found], indent=2))


jobs_app = typer.Typer(help="Jobs: generations submitted with `t2i generate --job`, collected later.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


def _job_json(message) -> str:
    from google.protobuf.json_format import MessageToJson

    return MessageToJson(message, indent=2)


def _job_call(action):
    from .client import Client, ClientError

    def run(target: str, api_key: str | None):
        with Client(target, api_key=api_key) as client:
            try:
                return action(client)
            except ClientError as error:
                typer.echo(f"error: {error}", err=True)
                raise typer.Exit(1) from None

    return run


@jobs_app.command("get")
def jobs_get(job_id: str, target: str = TARGET, api_key: str | None = API_KEY) -> None:
    """Print a job: its status, position or progress, charge, image URLs or error."""
    typer.echo(_job_json(_job_call(lambda client: client.get_job(job_id))(target, api_key)))


@jobs_app.command("watch")
def jobs_watch(
    job_id: str, after: int = typer.Option(0, "--after", help="Resume after this event id (0: from the start)."),
    target: str = TARGET, api_key: str | None = API_KEY,
) -> None:
    """Print a job's events as they happen, one JSON object per line, until it ends."""
    from google.protobuf.json_format import MessageToJson

    def watch(client) -> None:
        for event in client.watch_job(job_id, after, timeout=None):
            typer.echo(MessageToJson(event, indent=None))

    _job_call(watch)(target, api_key)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, target: str = TARGET, api_key: str | None = API_KEY) -> None:
    """Cancel a queued or running job (not charged), or delete a finished job's images."""
    typer.echo(_job_json(_job_call(lambda client: client.cancel_job(job_id))(target, api_key)))


@jobs_app.command("list")
def jobs_list(
    status: str = typer.Option("", "--status", help="Only jobs in this status."),
    cursor: str = typer.Option("", "--cursor", help="The nextCursor of the page before."),
    page_size: int = typer.Option(0, "--page-size", help="Jobs per page, 1 to 100 (0: 20)."),
    target: str = TARGET, api_key: str | None = API_KEY,
) -> None:
    """List your jobs, newest first."""
    typer.echo(_job_json(_job_call(lambda client: client.list_jobs(status, cursor, page_size))(target, api_key)))


@jobs_app.command("fetch")
def jobs_fetch(
    job_id: str, out: Path = typer.Option(Path("."), "--out", help="Folder to write the images to."),
    target: str = TARGET, api_key: str | None = API_KEY,
) -> None:
    """Write a succeeded job's images to --out as JOB_ID-N.EXT and print their paths."""
    extensions = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}

    def fetch(client) -> list[str]:
        job = client.get_job(job_id)
        if job.status != "succeeded":
            typer.echo(f"error: job {job_id} is {job.status}, not succeeded", err=True)
            raise typer.Exit(1)
        written = []
        for index in range(len(job.image_urls)):
            data, content_type = client.job_image(job_id, index)
            path = out / f"{job_id}-{index}.{extensions.get(content_type, 'bin')}"
            path.write_bytes(data)
            written.append(str(path))
        return written

    out.mkdir(parents=True, exist_ok=True)
    typer.echo(json.dumps(_job_call(fetch)(target, api_key)))


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


@keys_app.command("webhook-secret")
def keys_webhook_secret(
    key_id: str, rotate: bool = typer.Option(False, "--rotate", help="Replace it: webhooks are signed with the new one."),
    as_json: bool = JSON, data_dir: Path = DATA_DIR, database_url: str | None = DATABASE_URL,
) -> None:
    """Print the key's webhook signing secret (whsec_...), made on first use; verify job
    webhooks with it (README, "Webhooks")."""
    from .jobs.store import JobStore

    def secret() -> str:
        ledger = _ledger(data_dir, database_url)[0]
        ledger.get_key(key_id)  # NotFound for an unknown key
        return JobStore(ledger.db).secret(key_id, rotate=rotate)

    value = _run_admin(secret)
    typer.echo(json.dumps({"secret": value}) if as_json else value)


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
