"""Commands that hand their arguments to another program: ``lm-eval`` and ``serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..checks import DEFAULT_STRENGTH, check_strength
from ..config import MODEL_HELP
from ..errors import HpreditError
from ..preflight import check_editor_for, check_model
from ..serving import parse_editors
from ..serving import serve as run_server
from .app import app


def _lm_eval_model_args(args: list[str]) -> dict[str, str]:
    """``--model_args k=v,k=v`` of an lm-eval command line, as a dict."""
    for i, a in enumerate(args):
        if a == "--model_args" and i + 1 < len(args):
            text = args[i + 1]
        elif a.startswith("--model_args="):
            text = a.split("=", 1)[1]
        else:
            continue
        return dict(kv.split("=", 1) for kv in text.split(",") if "=" in kv)
    return {}


def _check_hpredit_model_args(model_args: dict[str, str]) -> None:
    """The ``hpredit`` model type's arguments, checked before lm-eval loads anything."""
    pretrained = model_args.get("pretrained") or None
    config = check_model(pretrained, model_args.get("device"))
    if model_args.get("strength"):
        try:
            check_strength(float(model_args["strength"]), "strength")
        except ValueError:
            raise HpreditError(f"strength must be a number, got {model_args['strength']!r}") from None
    if model_args.get("editor"):
        strict = model_args.get("strict", "true").lower() not in ("false", "0", "no")
        check_editor_for(Path(model_args["editor"]), config, pretrained, strict)


@app.command(
    "lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
)
def lm_eval_(ctx: typer.Context) -> None:
    """lm-evaluation-harness's own command line, with the model type `hpredit` registered.

    Every argument goes to lm-eval, for example: hpredit lm-eval run --model hpredit --model_args
    pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,editor=out/run/editor,strength=0.5 --tasks
    truthfulqa_mc2. Needs the lm-eval extra: pip install "hpredit[lm-eval]".
    """
    args = list(ctx.args)
    if "hpredit" in args:  # our model type
        _check_hpredit_model_args(_lm_eval_model_args(args))
    # optional: lm-eval is an extra (importing the backend without it raises); importing registers the model type
    from ..evaluation import lm_eval_backend

    lm_eval_backend.run_cli(args)


@app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    editor: Annotated[
        list[str],
        typer.Option(
            "--editor",
            help="Editor directory (from fit/run) or Hub repo id (org/name[@REVISION]), or NAME=either; "
            "repeat for several editors (the first is the default).",
        ),
    ],
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    strength: Annotated[
        float | None, typer.Option("--strength", help="Default strength (1 unless --kl); a request may set its own.")
    ] = None,
    kl: Annotated[
        float | None,
        typer.Option(
            "--kl",
            help="Instead of --strength: the default fluency cost (KL nats/token on neutral text), converted "
            "per editor through its measured strength → KL curve; a request may set its own.",
        ),
    ] = None,
    scope: Annotated[
        str, typer.Option("--scope", help="Default token scope: all, last-prompt-and-generated, generated.")
    ] = "all",
    no_strict: Annotated[
        bool, typer.Option("--no-strict", help="Do not require the model name to match the editor's.")
    ] = False,
    max_editors: Annotated[
        int | None,
        typer.Option(
            "--max-editors",
            help="Editors may be loaded and unloaded while serving (POST /v1/load_editor, /v1/unload_editor), "
            "this many at most, those given included (on GPU: with --enforce-eager or -O.cudagraph_mode=NONE).",
        ),
    ] = None,
    kill_after: Annotated[
        float,
        typer.Option(
            "--kill-after",
            help="Seconds the server may take to stop after SIGTERM/SIGINT before its processes are killed.",
        ),
    ] = 30.0,
) -> None:
    """vLLM's OpenAI-compatible server with the editor inside the engine (see docs/serving.md).

    Any other option goes to `vllm serve` (e.g. --port 8000 --dtype float32 --enforce-eager). Requests
    choose their editor and strength with the extra body {"vllm_xargs": {"editor": "NAME", "strength": 0.5}},
    or a cost instead of the strength: {"vllm_xargs": {"kl": 0.25}}.
    """
    default = DEFAULT_STRENGTH if strength is None else strength
    editors = parse_editors(editor)
    code = run_server(
        editors,
        model,
        default,
        scope,
        list(ctx.args),
        strict=not no_strict,
        kl=kl,
        grace=kill_after,
        max_editors=max_editors,
    )
    if code:
        raise typer.Exit(code)
