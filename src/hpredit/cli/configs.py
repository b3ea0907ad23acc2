"""Commands built from the jobs' configs: one option per config field, with the field's default and help.

``@job_command(RunConfig)`` over ``def run(cfg): ...`` registers ``hpredit run`` with an option for
every field of :class:`~hpredit.pipeline.RunConfig` (``--top-k`` for ``top_k``; a boolean as
``--flag/--no-flag``; a tuple as comma-separated text); the command's body receives the config
made from them, so the default and help of a setting are written once, on its field
(:func:`hpredit.config.option`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import JobConfig
from .app import app

__all__ = ["config_parameters", "flag_of", "job_command"]


def flag_of(f: dataclasses.Field) -> str:
    """The option's name on the command line: its first flag, or ``--field-name``."""
    flags = f.metadata.get("flags") or ()
    return flags[0] if flags else "--" + f.name.replace("_", "-")


def _cli_type(f: dataclasses.Field, hint: Any) -> Any:
    """The type Typer parses the option as: text where the field parses it, else the field's own type
    (``str`` where it may also be something the command line cannot give, such as a dict)."""
    optional = f.metadata.get("cli_default", f.default) is None
    if f.metadata.get("argument"):
        return list[str]
    if f.metadata.get("parse") is not None:
        return str | None if optional else str
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()
    kinds = [a for a in args if a is not type(None)] or [hint]
    kind = str if str in kinds else Path if Path in kinds else kinds[0]
    if kind not in (str, int, float, bool, Path):
        raise TypeError(f"field {f.name}: give it a parse= to read it from the command line")
    return kind | None if optional else kind


def _cli_default(f: dataclasses.Field) -> Any:
    """The field's default as the command line shows it (a tuple as comma-separated text)."""
    default = f.metadata.get("cli_default", f.default)
    if isinstance(default, tuple):
        return ",".join(str(x) for x in default)
    return default


def config_parameters(config: type[JobConfig]) -> list[inspect.Parameter]:
    """One keyword parameter per command-line field of ``config``, annotated for Typer."""
    hints = typing.get_type_hints(config)
    by_name = {f.name: f for f in dataclasses.fields(config)}
    own_first = [n for klass in config.__mro__ for n in vars(klass).get("__annotations__", {}) if n in by_name]
    params = []
    for f in (by_name[n] for n in dict.fromkeys(own_first)):  # the job's own options first, then shared ones
        if not f.metadata.get("cli", True):
            continue
        help_ = f.metadata.get("help", "")
        help_ = help_() if callable(help_) else help_
        kind = _cli_type(f, hints[f.name])
        if f.metadata.get("argument"):
            info: Any = typer.Argument(help=help_)
        else:
            flags = f.metadata.get("flags") or ()
            info = typer.Option(*flags, help=help_, metavar=f.metadata.get("metavar"))
        has_default = f.default is not dataclasses.MISSING or "cli_default" in f.metadata
        default = _cli_default(f) if has_default else inspect.Parameter.empty
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info])
        )
    return params


def _config_from(config: type[JobConfig], values: dict[str, Any]) -> JobConfig:
    """The config from the parsed options: each text a field parses turned into its value."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name, value in list(values.items()):
        if value is None and fields[name].default is not None:  # an option not given: the field's default
            del values[name]
            continue
        parse = fields[name].metadata.get("parse")
        if parse is not None and isinstance(value, str):
            values[name] = parse(value, flag_of(fields[name]))
    return config(**values)


def job_command(config: type[JobConfig], name: str | None = None) -> Callable[[Callable], Callable]:
    """Register ``body(cfg)`` as the command ``name`` (default: the body's name), with one option per
    field of ``config`` and the body's docstring as its help."""

    def register(body: Callable[[Any], None]) -> Callable:
        @functools.wraps(body)
        def command(**values: Any) -> None:
            body(_config_from(config, values))

        del command.__wrapped__  # Typer must read the signature below, not the body's
        command.__signature__ = inspect.Signature(config_parameters(config))  # type: ignore[attr-defined]
        command.__annotations__ = {}
        app.command(name or body.__name__.rstrip("_"))(command)
        return command

    return register
