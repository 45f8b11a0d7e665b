"""The `t2i` command line: one command per verb."""

from __future__ import annotations

import typer

app = typer.Typer(help="Illustrious text-to-image service.", no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """Illustrious text-to-image service."""


@app.command()
def info() -> None:
    """Print the samplers and schedulers this build supports."""
    from t2i.sampling import SAMPLER_NAMES, SCHEDULER_NAMES

    typer.echo("samplers:   " + ", ".join(SAMPLER_NAMES))
    typer.echo("schedulers: " + ", ".join(SCHEDULER_NAMES))
