"""The ``hpredit`` command: a thin layer over the Python API.

Rooms: :mod:`.options` (every option, declared once), :mod:`.commands` (fit, generate, run, eval,
compare: a call into the library and printing), :mod:`.passthrough` (lm-eval, serve), :mod:`.show`
(tables), :mod:`.app` (the app and its consoles), and here the entry point.

The library checks every value (:mod:`hpredit.checks`) before a model loads; inside :func:`main`
its messages name values as options (``--top-k``). User mistakes (:class:`HpreditError`) and
usage errors print one ``error:`` line and exit with status 2; Ctrl-C prints ``interrupted`` and
exits with 130, SIGTERM ``terminated`` and 143, both after removing temporary files.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.markup import escape

from .. import distributed
from ..checks import option_names
from ..errors import HpreditError
from . import app as _app_module
from . import commands, passthrough  # noqa: F401  (registers the commands)
from .app import app, console, err

__all__ = ["Interrupted", "Terminated", "app", "main"]


class Interrupted(BaseException):
    """Ctrl-C (SIGINT): not a KeyboardInterrupt, so that Click does not swallow it."""


class Terminated(BaseException):
    """SIGTERM, raised so that every ``finally`` (temporary directories) runs."""


def _raise(kind: type[BaseException]) -> Callable:
    def handler(signum, frame):
        raise kind()

    return handler


@contextmanager
def _signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise exceptions (cleaning up on the way out); the old handlers come back after."""
    installed = {}
    for sig, kind in ((signal.SIGINT, Interrupted), (signal.SIGTERM, Terminated)):
        try:
            installed[sig] = signal.signal(sig, _raise(kind))
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _usage_message(e: typer.TyperException) -> str:
    format_message = getattr(e, "format_message", None)
    message = " ".join((format_message() if callable(format_message) else str(e)).split())
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "hpredit"
    return f"{message} (see '{where} --help')"


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user mistakes into one line and exit status 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _app_module.argv = None if argv is None else list(argv)
    code: Any = 0
    try:
        if distributed.init() and not distributed.is_main():  # torchrun / accelerate launch: rank 0 speaks
            console.quiet = err.quiet = True
        with _signals(), option_names():
            code = app(args=argv, standalone_mode=False, prog_name="hpredit")
    except HpreditError as e:
        _fail(str(e))
    except typer.TyperException as e:  # Click's usage errors (unknown option, bad number, missing value)
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:  # plain `hpredit`: the help
            console.print(ctx.get_help())
        else:
            _fail(_usage_message(e))
    except (Interrupted, KeyboardInterrupt, typer.Abort):
        err.print("interrupted", highlight=False)
        sys.exit(130)
    except Terminated:
        err.print("terminated", highlight=False)
        sys.exit(143)
    sys.exit(code if isinstance(code, int) else 0)
