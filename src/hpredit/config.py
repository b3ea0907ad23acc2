"""The jobs' configs: each setting's default and help written once, on a dataclass field.

A job (``run``, ``fit``, ``generate``, ``evaluate``, ``compare``) takes one frozen config whole;
its fields carry their default and their help (as PEFT's ``field(metadata={"help": ...})``), and
the command line is built from them (:mod:`hpredit.cli.configs`), so a default or a help text
cannot drift between the library and the CLI. A config checks its values when it is made
(:mod:`hpredit.checks`), before any data or model loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .checks import MAX_STRENGTH
from .errors import HpreditError

__all__ = ["JobConfig", "LoadOptions", "comma_list", "editor_dir", "editor_strengths", "given_path", "option"]

C = TypeVar("C", bound="JobConfig")


def option(
    default: Any = dataclasses.MISSING,
    help: str | Callable[[], str] = "",
    *,
    flags: tuple[str, ...] = (),
    parse: Callable[[str, str], Any] | None = None,
    cli: bool = True,
    argument: bool = False,
    metavar: str | None = None,
    cli_default: Any = dataclasses.MISSING,
) -> Any:
    """A config field with its ``default`` and ``help`` (a callable: built when the CLI is, e.g. from a
    registry). ``flags``: the option's spellings (default ``--field-name``); ``parse``: how the CLI turns
    the option's text into the value (``parse(text, flag)``; e.g. :func:`comma_list`); ``cli=False``:
    the library's only (a callable, an object); ``argument``: a positional CLI argument;
    ``cli_default``: where the command line needs a default the library does not have (an output
    directory the CLI writes to, where the library writes nothing)."""
    metadata = {"help": help, "flags": flags, "parse": parse, "cli": cli, "argument": argument, "metavar": metavar}
    if cli_default is not dataclasses.MISSING:
        metadata["cli_default"] = cli_default
    if isinstance(default, (list, dict, set)):
        raise TypeError("give a mutable default as a tuple or None")
    return field(default=default, metadata=metadata)


def comma_list(kind: Callable[[str], Any], what: str, *, empty: Any = dataclasses.MISSING) -> Callable[[str, str], Any]:
    """A parser of comma-separated option text (``"0.25,0.5"`` → ``(0.25, 0.5)``): refused when a value is
    not a ``kind`` or none is given (``empty``, if given, is what an empty text means instead)."""

    def parse(text: str, flag: str) -> Any:
        if not text.strip() and empty is not dataclasses.MISSING:
            return empty
        try:
            values = tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise HpreditError(f"{flag} must be comma-separated {what}, got {text!r}") from None
        if not values:
            raise HpreditError(f"{flag} needs at least one value")
        return values

    return parse


def given_path(what: str) -> Callable[[str, str], Path]:
    """A parser of a path option, refusing empty text (``Path("")`` would be the current directory, and
    an empty ``--data`` would fall back to the default source unseen): ``{flag}: no {what} given``."""

    def parse(text: str, flag: str) -> Path:
        if not text.strip():
            raise HpreditError(f"{flag}: no {what} given")
        return Path(text)

    return parse


#: ``--editor DIR``
editor_dir = given_path("directory")


def editor_strengths(text: str, flag: str) -> tuple[tuple[Path, float], ...]:
    """``DIR=STRENGTH[,DIR=STRENGTH...]`` → ``((Path(DIR), strength), ...)`` (a directory may hold ``=``:
    the last one splits; empty text: none, the option's default); the strengths are checked with the config."""
    if not text.strip():
        return ()
    pairs = []
    for part in (x for x in text.split(",") if x.strip()):
        path, sep, value = part.rpartition("=")
        try:
            strength = float(value)
        except ValueError:
            strength = None
        if not sep or not path.strip() or strength is None:
            raise HpreditError(f"{flag} takes DIR=STRENGTH pairs, comma-separated, got {part!r}")
        pairs.append((Path(path), strength))
    if not pairs:
        raise HpreditError(f"{flag} needs at least one DIR=STRENGTH")
    return tuple(pairs)


# --------------------------------------------------------------------------- help shared by several jobs

MODEL_HELP = "Hub id or local directory; default: the embedded SmolLM2-135M-Instruct."
EDITOR_HELP = "Editor directory (from fit / run), or a Hugging Face Hub repo id (org/name; offline: from the cache)."
STRENGTH_HELP = f"Edit strength α (|α| ≤ {MAX_STRENGTH:g}); default 1 unless --kl is given."
KL_HELP = (
    "Instead of --strength: the fluency cost wanted (KL nats/token on neutral text), converted to a "
    "strength through the editor's measured strength → KL curve."
)
STRICT_HELP = "Refuse a model whose name differs from the editor's."
FORCE_HELP = "Replace a non-empty --out (as a whole)."
STORE_DTYPE_HELP = (
    "Activation store type: auto (float16, or bfloat16 where float16 would overflow), float16, bfloat16 or float32."
)
LIMIT_HELP = "Use only the first N questions (items) of each split (quick runs)."
TASK_DATA_HELP = "The task's data file (TruthfulQA: default $HPREDIT_TRUTHFULQA, else the hub; see docs/tasks.md)."


# --------------------------------------------------------------------------- the configs


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """A job's settings, checked when made (``check`` runs from ``__post_init__``)."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse a bad value with one line (:class:`~hpredit.errors.HpreditError`); fill in derived defaults."""

    def _set(self, name: str, value: Any) -> None:
        """Normalise a field while checking (the config is frozen once made)."""
        object.__setattr__(self, name, value)

    @classmethod
    def of(cls: type[C], config: C | None = None, fields: Mapping[str, Any] | None = None) -> C:
        """``config`` (default: the defaults) with ``fields`` replaced: how a job takes either a config or
        its fields as keywords (``run(cfg)``, ``run(out=...)``, ``run(cfg, limit=4)``)."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        unknown = sorted(set(fields or {}) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
        if config is None:
            return cls(**dict(fields or {}))
        return dataclasses.replace(config, **dict(fields or {})) if fields else config


@dataclass(frozen=True, kw_only=True)
class LoadOptions(JobConfig):
    """How a job's model loads (:func:`hpredit.load_model`)."""

    model: str | Path | None = option(None, MODEL_HELP, flags=("--model", "-m"))
    dtype: str = option("float32", "The model's dtype: float32, float16, bfloat16 or auto.")
    device: str | None = option(None, "cpu, cuda, cuda:1, mps (default: cpu).")
    device_map: str | dict | None = option(
        None,
        "Spread the model over devices with accelerate: auto, balanced, sequential, or a JSON "
        '{module: device} map (text or file; "disk" offloads). Excludes --device.',
    )
