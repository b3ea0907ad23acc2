"""The ``hpredit`` Typer app, its consoles, and the command line being run (for the records)."""

from __future__ import annotations

import typer
from rich.console import Console

from ..provenance import command_line as quoted_command_line

__all__ = ["app", "command_line", "console", "err"]

app = typer.Typer(
    help="Householder Pseudo-Rotation (HPR) activation editing for Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)

#: The arguments :func:`hpredit.cli.main` was called with (None: ``sys.argv``).
argv: list[str] | None = None


def command_line() -> str:
    """The command line being run, for the records (``hpredit ARGS``)."""
    return quoted_command_line(None if argv is None else ["hpredit", *argv])
