"""Editors on the Hugging Face Hub: resolving a repo id to a local snapshot, the model card, uploads.

An editor on the Hub is the directory :meth:`~hpredit.editors.base.Editor.save_pretrained` writes
(``config.json``, ``editor.safetensors`` and the model card ``README.md``) in a model repo. Loading
downloads those three files through ``huggingface_hub`` into its cache (``HF_HUB_CACHE``, default
``~/.cache/huggingface/hub``; ``HF_HUB_OFFLINE=1`` reads the cache only), then loads the snapshot
directory like any local artifact, with every check. The card is documentation: loading never reads
it, and the checksums in ``config.json`` do not cover it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ..errors import HpreditError, first_line

__all__ = ["base_model_id", "hub_repo_id", "model_card", "push_editor", "resolve_editor_dir", "split_revision"]

#: the tags every hpredit editor's card carries (the method's name is added)
CARD_TAGS = ("hpredit", "activation-steering")
#: a cached snapshot that misses files (huggingface_hub 2.x checks; earlier versions never raise it)
_INCOMPLETE: tuple[type[Exception], ...] = tuple(
    c for c in (getattr(hub_errors, "IncompleteSnapshotError", None),) if isinstance(c, type)
)


def _offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, as huggingface_hub reads it."""
    is_offline = getattr(hub_constants, "is_offline_mode", None)
    return bool(is_offline() if callable(is_offline) else hub_constants.HF_HUB_OFFLINE)


def _off(local_files_only: bool) -> bool:
    return local_files_only or _offline()


def _off_reason(local_files_only: bool) -> tuple[str, str]:
    """Why downloads are off, and how to turn them on."""
    if local_files_only:
        return "local_files_only=True", "pass local_files_only=False"
    return "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE"


def hub_repo_id(source: Any) -> str | None:
    """``source`` as a Hub repo id (``namespace/name``, by ``huggingface_hub``'s own validation), or
    None. A bare ``name`` is not taken: every repo an editor can be pushed to has a namespace, and a
    mistyped local directory name should not become a download."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    text = os.fspath(source)
    if not isinstance(text, str) or text.count("/") != 1:
        return None
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def split_revision(spec: str) -> tuple[str, str | None]:
    """``org/name@REVISION`` → ``("org/name", "REVISION")``; anything else → ``(spec, None)``. (A repo
    id cannot contain ``@``, so the first one starts the revision: a branch, tag or commit hash.)"""
    repo, sep, revision = spec.partition("@")
    if sep and revision and hub_repo_id(repo) is not None:
        return repo, revision
    return spec, None


def _refuse_local_revision(source: str | os.PathLike, path: Path, revision: str | None) -> None:
    """Refuse ``revision`` for an existing local directory: a revision only pins a Hub repo."""
    if revision is not None and path.is_dir():
        raise HpreditError(
            f"editor artifact {source}: revision={revision!r} pins a Hugging Face Hub repo, but this is a "
            "local directory (leave revision out, or give the repo id)"
        )


def _require_repo_id(source: str | os.PathLike) -> str:
    """``source`` as a Hub repo id, or an error (with a hint when it looks like ``org/name@REVISION``)."""
    repo_id = hub_repo_id(source)
    if repo_id is None:
        repo, pinned = split_revision(os.fspath(source)) if isinstance(source, str) else (None, None)
        hint = f" (to pin a revision of the Hub repo {repo}, pass revision={pinned!r})" if pinned else ""
        raise HpreditError(
            f"editor artifact {source} does not exist (expected a directory from save_pretrained) and is not a "
            f"Hugging Face Hub repo id (namespace/name) either{hint}"
        )
    return repo_id


def _download_command(repo_id: str, revision: str | None, cache: Path, cache_dir: str | os.PathLike | None) -> str:
    """The ``hf download`` command line that fetches the repo by hand, for the error messages."""
    return (
        f"hf download {repo_id}"
        + (f" --revision {revision}" if revision is not None else "")
        + (f" --cache-dir {cache}" if cache_dir is not None else "")
    )


def _download_error(
    e: Exception, repo_id: str, where: str, cache: Path, download: str, revision: str | None, local_files_only: bool
) -> HpreditError:
    """The one-line error for a failed ``snapshot_download``: what was tried and what to do."""
    if isinstance(e, _INCOMPLETE):
        state = (
            f"downloads are off ({_off_reason(local_files_only)[0]})"
            if _off(local_files_only)
            else "the Hub cannot be reached"
        )
        return HpreditError(
            f"{where} is only partly in the cache ({cache}) and {state}: download it again where the Hub is "
            f"reachable ({download})"
        )
    if isinstance(e, LocalEntryNotFoundError):
        if _off(local_files_only):
            why, undo = _off_reason(local_files_only)
            return HpreditError(
                f"{where} is not in the local cache ({cache}) and downloads are off ({why}): download it first "
                f"({download}) or {undo}"
            )
        return HpreditError(
            f"{where} could not be downloaded ({first_line(e.__cause__ or e)}) and is not in the local cache "
            f"({cache}): check the network connection (or HF_ENDPOINT), or download it first ({download})"
        )
    if isinstance(e, GatedRepoError):
        return HpreditError(
            f"{where} is gated: accept its conditions on the Hub, then log in (hf auth login) or pass token="
        )
    if isinstance(e, RevisionNotFoundError):
        return HpreditError(
            f"editor artifact {repo_id}: the Hugging Face Hub repo has no revision {revision or 'main'!r} "
            "(give a branch, a tag or a commit hash of the repo)"
        )
    if isinstance(e, RepositoryNotFoundError):
        return HpreditError(f"{where} was not found (or it is private: log in with hf auth login, or pass token=)")
    # HTTP errors, the connection, a bad token: huggingface_hub's own
    return HpreditError(f"{where} could not be downloaded: {first_line(e)}")


def resolve_editor_dir(
    source: str | os.PathLike,
    files: Sequence[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local directory holding the editor ``source`` names: ``source`` itself when it exists,
    else the snapshot of the Hub repo ``source`` (``namespace/name``) at ``revision`` (a branch, tag
    or commit hash; default ``main``), its ``files`` downloaded into the Hub cache (or found there).

    Every failure is one :class:`HpreditError` line saying what was tried and what to do.
    """
    path = Path(source)
    if path.exists():
        _refuse_local_revision(source, path, revision)
        return path
    repo_id = _require_repo_id(source)
    at = f" (revision {revision})" if revision is not None else ""
    cache = Path(cache_dir if cache_dir is not None else hub_constants.HF_HUB_CACHE).expanduser()
    download = _download_command(repo_id, revision, cache, cache_dir)
    where = f"editor artifact {repo_id}: not a local directory, and the Hugging Face Hub repo {repo_id}{at}"
    try:
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=None if cache_dir is None else Path(cache_dir),
                token=token,
                local_files_only=local_files_only,
                allow_patterns=list(files),
            )
        )
    except Exception as e:  # noqa: BLE001 (each failure gets its own message: see _download_error)
        raise _download_error(e, repo_id, where, cache, download, revision, local_files_only) from None
    if not (snapshot / files[0]).is_file():
        raise HpreditError(
            f"editor artifact {repo_id}: the Hugging Face Hub repo{at} has no {files[0]} (it holds no hpredit "
            "editor: one is uploaded with Editor.push_to_hub)"
        )
    return snapshot


# ----------------------------------------------------------------------------- the model card


def _cell(value: Any) -> str:
    """A Markdown table cell: numbers to 4 significant digits, lists as JSON, ``|`` escaped."""
    if isinstance(value, float):
        text = f"{value:.4g}" if math.isfinite(value) else str(value)
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows),
    ]


def _site_key(key: str) -> tuple:
    """Sorts ``"2"`` before ``"15"`` and ``"15.3"`` (a layer, a head) by number."""
    parts = key.split(".")
    return (0, *map(int, parts)) if all(p.isdigit() for p in parts) else (1, key)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _metrics_section(metrics: dict) -> list[str]:
    """The validation metrics: every per-layer (per-head) table of numbers side by side, then the
    single values (the split used, data sizes); the training history is left to ``config.json``."""
    tables = {
        k: {str(s): x for s, x in v.items()}
        for k, v in metrics.items()
        if isinstance(v, dict) and v and all(_is_number(x) for x in v.values())
    }
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    if not tables and not scalars:
        return []
    lines = ["## Validation metrics", "", "Measured when the editor was fitted (held-out data of the fit).", ""]
    if tables:
        sites = sorted({s for t in tables.values() for s in t}, key=_site_key)
        first = "head" if any("." in s for s in sites) else "layer"
        lines += _table([first, *tables], [[s, *(t.get(s, "") for t in tables.values())] for s in sites]) + [""]
    lines += [f"- {k}: {_cell(v)}" for k, v in scalars.items()]
    return lines + ([""] if scalars else [])


def base_model_id(name: str) -> str | None:
    """The fitted model's name when it is a Hub repo id (not a local directory): the card's ``base_model``."""
    return hub_repo_id(name) if not Path(name).exists() else None


def _use_section(editor: Any, repo: str, base: str | None) -> list[str]:
    """The card's "Use" section: loading the editor in Python and serving it with vLLM."""
    fp = editor.model_fingerprint
    model_arg = f'"{base}"' if base else f'"{fp.name}"'
    serve_model = f" --model {base or fp.name}"
    return [
        "## Use",
        "",
        "```python",
        "import hpredit",
        "",
        f"model, tok = hpredit.load_model({model_arg})",
        f'editor = hpredit.Editor.from_pretrained("{repo}")  # or revision="<branch, tag or commit>"',
        "with editor.attach(model, strength=1.0):",
        '    out = model.generate(**tok(["Q: ..."], return_tensors="pt"), max_new_tokens=40)',
        "```",
        "",
        "Served with vLLM (one or several editors; each request picks its editor and strength):",
        "",
        "```bash",
        f"hpredit serve{serve_model} --editor {editor.method}={repo}",
        "```",
        "",
    ]


def _editor_section(editor: Any, site: str) -> list[str]:
    """The card's "Editor" section: the method, the edited site and layers, the fingerprint, the config."""
    fp = editor.model_fingerprint
    return [
        "## Editor",
        "",
        *_table(
            ["", ""],
            [
                ["method", editor.method],
                ["edits", site],
                ["layers", editor.layers],
                ["fitted on", f"{fp.name} ({fp.architecture}, hidden size {fp.hidden_size}, {fp.num_layers} layers)"],
            ],
        ),
        "",
        "Attaching checks the model against this fingerprint (architecture, sizes, a weight digest, the name).",
        "",
        "### Config",
        "",
        *_table(["field", "value"], [[k, v] for k, v in dataclasses.asdict(editor.config).items()]),
        "",
    ]


def _kl_curve_section(curve: Any) -> list[str]:
    """The card's strength → KL table, when the editor has a curve (none otherwise)."""
    if curve is None:
        return []
    return [
        "## Strength → KL curve",
        "",
        "The fluency cost measured at each strength tried, in nats per token on neutral text"
        + (f" ({curve.text})" if curve.text else " (mean KL(unedited ‖ edited))")
        + '. `editor.attach(model, kl=0.25)` (or `"kl"` in a served request) converts a cost into a '
        "strength through it.",
        "",
        *_table(["strength", "KL (nats/token)"], list(zip(curve.strengths, curve.kl))),
        "",
    ]


def model_card(editor: Any, repo_id: str | None = None) -> ModelCard:
    """The model card (``README.md``) of ``editor``: the Hub's metadata (``library_name: hpredit``,
    ``base_model`` when the fitted model is a Hub repo, the tags) and what the editor is, its
    strength → KL curve and validation metrics, and how to load it (from ``repo_id`` when given)."""
    fp = editor.model_fingerprint
    base = base_model_id(fp.name)
    data = ModelCardData(library_name="hpredit", base_model=base, tags=[*CARD_TAGS, editor.method])
    repo = repo_id or "org/name"
    site = "attention heads (the output projection's input)" if editor.site == "heads" else "residual stream"
    lines = [
        f"# {editor.method} editor for {fp.name}",
        "",
        f"An hpredit activation editor (method `{editor.method}`): it edits "
        f"the {site} of `{fp.name}` at inference, through forward hooks, at a strength chosen per call or per "
        "request; the model's weights are not changed.",
        "",
        *_use_section(editor, repo, base),
        *_editor_section(editor, site),
    ]
    lines += _kl_curve_section(editor.kl_curve)
    lines += _metrics_section(editor.metrics or {})
    lines += [
        "## Files",
        "",
        "`config.json` (method, config, layers, the fingerprint, metrics, the curve, checksums) and "
        "`editor.safetensors` (the learned tensors): loading runs no code and refuses a file that does not "
        "match its checksum. This card is documentation only: it is not checksummed and loading never reads it.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ----------------------------------------------------------------------------- upload


def push_editor(
    save: Callable[[Path, str], Path],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload hpredit editor",
) -> Any:
    """Create ``repo_id`` if needed (``private``; and the branch ``revision``), write the editor with
    ``save(directory, repo_id)`` into a temporary directory and upload it as one commit. Returns
    ``huggingface_hub``'s ``CommitInfo``."""
    if hub_repo_id(repo_id) is None:
        raise HpreditError(f"push_to_hub: {repo_id!r} is not a Hugging Face Hub repo id (namespace/name)")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hpredit-push-") as tmp:
        folder = save(Path(tmp) / "editor", repo_id)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message
            )
        except Exception as e:  # noqa: BLE001 (HTTP errors, the connection, a token: huggingface_hub's own)
            raise HpreditError(f"push_to_hub {repo_id}: {first_line(e)}") from None
