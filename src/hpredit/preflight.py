"""What is checked before a model loads: its source, where it goes, and an editor against its config.

Shared by every job (:mod:`hpredit.pipeline`, :func:`hpredit.evaluate`, :func:`hpredit.compare.compare`)
so that a mismatched editor or a missing model is refused before minutes of loading.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from .checks import check_editor_matches, check_layers, check_top_k
from .editors import Editor, load_editor
from .errors import HpreditError
from .files import check_output_dir, remove_stale_temporaries
from .models import check_model_and_placement, fingerprint_from_config, num_layers

__all__ = ["check_editor_for", "check_model", "check_out", "check_top_k_and_layers", "loaded_model_given"]


def check_model(
    model: str | os.PathLike | None, device: Any = None, device_map: Any = None, trust_remote_code: bool = False
) -> Any:
    """The device (or device map) is valid and ``model`` (a hub id, a local directory, None for the
    embedded default) is a causal LM; its config (no weights read)."""
    return check_model_and_placement(model, device, device_map, trust_remote_code=trust_remote_code)


def check_top_k_and_layers(config: Any, top_k: int, layers: list[int] | None = None) -> None:
    """``top_k`` and explicit ``layers`` against the model's layer count (from its config)."""
    n = num_layers(config)
    check_layers(layers, n)
    check_top_k(top_k, n)


def check_editor_for(editor: Any, config: Any, model: str | os.PathLike | None, strict: bool = True) -> Any:
    """An editor (or its directory, loaded and checked here) against the model's config, before
    the model loads; the editor. The weights' digest is compared once the model is loaded (attach)."""
    ed = editor if isinstance(editor, Editor) else load_editor(editor)
    check_editor_matches(ed.model_fingerprint, fingerprint_from_config(config, model), strict)
    return ed


def loaded_model_given(model: Any, tokenizer: Any) -> bool:
    """Whether ``model`` is a loaded model (True; its tokenizer must come with it) or one to load by
    name (False: a hub id, a local directory or None, the embedded default); anything else is refused."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return False
    if not isinstance(model, nn.Module):
        raise HpreditError(f"model must be a name, a path or a loaded model, got {type(model).__name__}")
    if tokenizer is None:
        raise HpreditError("pass the tokenizer together with a loaded model")
    return True


def model_and_fields(model: Any, tokenizer: Any, fields: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A job's ``model`` argument: a loaded model is returned as is (its tokenizer required); a name, a
    path or None goes to the config's fields as ``model`` (the model returned is then None)."""
    if loaded_model_given(model, tokenizer):
        return model, fields
    return None, fields if model is None else {**fields, "model": model}


def check_out(out: str | os.PathLike, force: bool, inputs: Iterable[Any] = ()) -> Path:
    """The output can be written (an existing file, a non-empty directory without ``force``, the
    current directory or a parent of it, one holding any of ``inputs`` and an unwritable place are
    refused); with ``force``, leftovers of an interrupted earlier write go."""
    out = Path(out)
    check_output_dir(out, force, [i for i in inputs if isinstance(i, (str, os.PathLike))])
    if force:
        remove_stale_temporaries(out)
    return out
