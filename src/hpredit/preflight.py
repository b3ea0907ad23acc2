"""What is checked before a model loads: its source, where it goes, and an editor against its config.

Shared by every job (:mod:`hpredit.pipeline`, :func:`hpredit.evaluate`, :func:`hpredit.compare.compare`)
so that a mismatched editor or a missing model is refused before minutes of loading.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .artifacts import check_output_dir, remove_stale_temporaries
from .checks import check_editor_matches, check_layers, check_top_k

__all__ = ["check_editor_for", "check_model", "check_out", "check_top_k_and_layers"]


def check_model(
    model: str | os.PathLike | None, device: Any = None, device_map: Any = None, trust_remote_code: bool = False
) -> Any:
    """The device (or device map) is valid and ``model`` (a hub id, a local directory, None for the
    embedded default) is a causal LM; its config (no weights read)."""
    from .models import check_model_and_placement

    return check_model_and_placement(model, device, device_map, trust_remote_code=trust_remote_code)


def check_top_k_and_layers(config: Any, top_k: int, layers: list[int] | None = None) -> None:
    """``top_k`` and explicit ``layers`` against the model's layer count (from its config)."""
    from .models import num_layers

    n = num_layers(config)
    check_layers(layers, n)
    check_top_k(top_k, n)


def check_editor_for(editor: Any, config: Any, model: str | os.PathLike | None, strict: bool = True) -> Any:
    """An editor (or its directory, loaded and checked here) against the model's config, before
    the model loads; the editor. The weights' digest is compared once the model is loaded (attach)."""
    from .editors import Editor, load_editor
    from .models import fingerprint_from_config

    ed = editor if isinstance(editor, Editor) else load_editor(editor)
    check_editor_matches(ed.model_fingerprint, fingerprint_from_config(config, model), strict)
    return ed


def check_out(out: str | os.PathLike, force: bool, inputs: Iterable[Any] = ()) -> Path:
    """The output can be written (an existing file, a non-empty directory without ``force``, the
    current directory or a parent of it, one holding any of ``inputs`` and an unwritable place are
    refused); with ``force``, leftovers of an interrupted earlier write go."""
    out = Path(out)
    check_output_dir(out, force, [i for i in inputs if isinstance(i, (str, os.PathLike))])
    if force:
        remove_stale_temporaries(out)
    return out
