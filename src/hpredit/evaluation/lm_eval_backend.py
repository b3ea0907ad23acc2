"""An lm-evaluation-harness model backend: a Hugging Face model with an hpredit editor attached.

Importing this module registers the model type ``hpredit`` with lm-eval (no fork needed)::

    hpredit lm-eval run --model hpredit \\
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,editor=out/run/editor,strength=0.5 \\
        --tasks truthfulqa_mc2

or from Python: ``lm_eval.simple_evaluate(model=HpreditLM(editor="out/run/editor"), tasks=[...])``.
Needs the ``lm-eval`` extra (``pip install "hpredit[lm-eval]"``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..editors import load_editor
from ..errors import HpreditError, first_line
from ..hooks import EditHandle
from ..models import load_model

try:
    import lm_eval.models  # noqa: F401  (fills lm-eval's registry first: its lazy import skips a non-empty one)
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise HpreditError("lm-eval is not installed: pip install 'hpredit[lm-eval]'") from e

__all__ = ["HpreditLM", "run_cli"]


def run_cli(args: list[str]) -> None:
    """lm-eval's own command line (``lm-eval ARGS``) with the ``hpredit`` model type registered; its
    argument errors (an unknown task, a bad option value, a missing config file) are one
    :class:`HpreditError` instead of a traceback."""
    argv = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except (ValueError, FileNotFoundError) as e:
        raise HpreditError(f"lm-eval: {first_line(e)}") from None
    finally:
        sys.argv = argv


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise HpreditError(f"{name} must be true or false, got {value!r}")


@register_model("hpredit")
class HpreditLM(HFLM):
    """lm-eval's Hugging Face backend (``hf``) with an editor attached for the whole evaluation.

    Takes every ``hf`` argument plus ``editor`` (an editor directory; none: the unedited model),
    ``strength`` (default 1.0), ``scope`` (default ``all``; see :data:`hpredit.hooks.SCOPES`),
    ``strict`` (refuse an editor fit on another model name; default true) and ``layers``
    (``"15;16"``: override the editor's layers). Without ``pretrained`` it loads hpredit's
    embedded default model.
    """

    def __init__(
        self,
        pretrained=None,
        editor: str | Path | None = None,
        strength: float = 1.0,
        scope: str = "all",
        strict: bool | str = True,
        layers: str | None = None,
        **kwargs,
    ) -> None:
        if pretrained is None:  # an instance: lm-eval then takes its device from the model
            dtype = kwargs.pop("dtype", None)
            device = kwargs.pop("device", None) or "cuda"
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"
            pretrained, tok = load_model(None, dtype="float32" if dtype in (None, "auto") else dtype, device=device)
            kwargs.setdefault("tokenizer", tok)
        super().__init__(pretrained=pretrained, **kwargs)
        self.editor = None if editor in (None, "") else load_editor(editor)
        self.handle: EditHandle | None = None
        if self.editor is not None:
            chosen = None
            if layers not in (None, ""):
                try:
                    chosen = [int(x) for x in str(layers).replace(";", " ").replace(":", " ").split()]
                except ValueError:
                    raise HpreditError(f"layers must be integers separated by ';', got {layers!r}") from None
            self.handle = self.editor.attach(
                self.model, strength=strength, scope=scope, strict=_flag(strict, "strict"), layers=chosen
            )

    def detach(self) -> None:
        """Remove the editor from the model (the model is then unedited)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
