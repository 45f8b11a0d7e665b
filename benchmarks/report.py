"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections alone."""

from __future__ import annotations

import argparse
import platform
import re
import time
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Each section is written by the benchmark named in it; rerun the command to refresh it. Ratios
are measured side by side in the same run, so they hold better than the absolute figures,
which depend on the machine (and on whatever else it was doing).
"""


def machine() -> str:
    import os

    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}"


def write_section(name: str, body: str) -> None:
    text = DOC.read_text() if DOC.exists() else HEADER
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = time.strftime("%Y-%m-%d")
    section = f"{start}\n{body.rstrip()}\n\n_Measured {stamp} on {machine()}._\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line: its module docstring as help, and --no-write."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return parser


def publish(name: str, text: str, args: argparse.Namespace) -> None:
    """Print a benchmark's section and, unless --no-write, put it into docs/benchmarks.md."""
    print(text)
    if not args.no_write:
        write_section(name, text)


def fmt(value: float | None, digits: int = 2) -> str:
    """A figure for a table: "-" where there is none."""
    return "-" if value is None else f"{value:.{digits}f}"


def read_section(name: str) -> str | None:
    """The body of section `name` of docs/benchmarks.md as write_section left it (None: absent)."""
    text = DOC.read_text() if DOC.exists() else ""
    start, end = text.find(f"<!-- {name}:start -->"), text.find(f"<!-- {name}:end -->")
    return text[start:end] if 0 <= start < end else None
