"""Typer options built from settings dataclasses, so each default is stated once (settings.py).

`options_of(Settings)` lists the command-line options of a dataclass's `setting(...)` fields
(nested dataclass fields are flattened); `with_options(Settings, ...)` turns a function that
takes a built Settings object into a Typer command whose signature has one option per field.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer


@dataclass(frozen=True)
class CliOption:
    name: str  # the Python parameter name (the field name)
    path: tuple[str, ...]  # where the field lives: ("engine", "max_batch_size")
    annotation: Any
    default: Any
    flag: str
    env: str | None
    help: str
    doc_default: str

    @property
    def is_bool(self) -> bool:
        return self.annotation is bool

    @property
    def flags(self) -> str:
        """How the README shows the flag."""
        if self.is_bool:
            return f"{self.flag}/--no-{self.flag.removeprefix('--')}"
        return self.flag


def options_of(cls: type, path: tuple[str, ...] = ()) -> list[CliOption]:
    hints = typing.get_type_hints(cls)
    found: list[CliOption] = []
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            found += options_of(annotation, (*path, f.name))
            continue
        if "help" not in f.metadata:
            continue
        env = f.metadata["env"]
        found.append(CliOption(
            name=f.name, path=(*path, f.name), annotation=annotation, default=f.default,
            flag=f.metadata["flag"] or "--" + f.name.replace("_", "-"),
            env=("T2I_" + f.name.upper()) if env == "" else env,
            help=f.metadata["help"], doc_default=f.metadata["doc_default"] or _shown(f.default),
        ))
    return found


def build(cls: type, values: dict[str, Any], path: tuple[str, ...] = ()):
    """An instance of `cls` from flattened option values (missing ones keep their defaults)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values, (*path, f.name))
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def typer_option(option: CliOption):
    decls = [f"{option.flag}/--no-{option.flag.removeprefix('--')}"] if option.is_bool else [option.flag]
    return typer.Option(option.default, *decls, envvar=option.env, help=option.help, show_default=True)


def option_for(cls: type, name: str):
    """The Typer option of one settings field, for commands that take only a few of them."""
    (option,) = [o for o in options_of(cls) if o.name == name]
    return typer_option(option)


def typer_parameter(option: CliOption) -> inspect.Parameter:
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=typer_option(option), annotation=option.annotation)


def with_options(cls: type, *extra: inspect.Parameter) -> Callable:
    """Decorate `command(settings, **extra)` into a Typer command with one option per field of
    `cls` (plus the `extra` parameters, passed through by name)."""
    options = options_of(cls)
    names = {o.name for o in options}

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(**kwargs):
            settings = build(cls, {k: v for k, v in kwargs.items() if k in names})
            return command(settings, **{k: v for k, v in kwargs.items() if k not in names})

        parameters = [typer_parameter(o) for o in options] + list(extra)
        wrapper.__signature__ = inspect.Signature(parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        del wrapper.__wrapped__  # Typer must read the new signature, not the wrapped one
        return wrapper

    return decorate


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
