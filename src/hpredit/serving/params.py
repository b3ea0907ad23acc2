"""Per-request edit parameters: what a request may put in ``SamplingParams.extra_args``.

A request carries ``{"strength": s, "scope": ...}`` (OpenAI API: ``vllm_xargs``; offline:
``SamplingParams(extra_args=...)``). Both are optional; the server's defaults fill the gaps.
Pure Python, no vLLM import: the frontend validates with it, the model runner resolves with it.
"""

from __future__ import annotations

from typing import Any

from ..checks import check_strength
from ..errors import HpreditError
from ..hooks import SCOPES

__all__ = [
    "ARCHITECTURES",
    "REQUEST_KEYS",
    "REQUEST_PARAMS",
    "resolve_request",
    "validate_extra_args",
    "check_default_strength",
]

#: keys hpredit reads from ``extra_args``
REQUEST_KEYS = ("strength", "scope")
#: the Hugging Face architecture served → hpredit's edited vLLM class (hpredit.serving.model)
ARCHITECTURES = {"LlamaForCausalLM": "HPREditLlamaForCausalLM"}
#: the ``--logits-processors`` value that validates per-request arguments at admission
REQUEST_PARAMS = "hpredit.serving.plugin:RequestParams"
#: keys vLLM itself puts into ``extra_args`` (passed through untouched)
VLLM_KEYS = ("kv_transfer_params", "ec_transfer_params")


def _strength(value: Any) -> float:
    try:
        return check_strength(value, "'strength'")
    except HpreditError as e:
        raise ValueError(f"hpredit: {e}") from None


def _scope(value: Any) -> str:
    if value not in SCOPES:
        raise ValueError(f"hpredit: 'scope' must be one of {', '.join(SCOPES)}, got {value!r}")
    return value


def validate_extra_args(extra_args: dict[str, Any] | None) -> None:
    """Raise ``ValueError`` (one clear line) for anything hpredit cannot apply."""
    if not extra_args:
        return
    unknown = sorted(k for k in extra_args if k not in REQUEST_KEYS and k not in VLLM_KEYS)
    if unknown:
        raise ValueError(
            f"hpredit: unknown extra argument(s) {unknown}: this server accepts "
            f"{', '.join(REQUEST_KEYS)} (in vllm_xargs / SamplingParams.extra_args)"
        )
    if "strength" in extra_args:
        _strength(extra_args["strength"])
    if "scope" in extra_args:
        _scope(extra_args["scope"])


def resolve_request(
    extra_args: dict[str, Any] | None, default_strength: float, default_scope: str
) -> tuple[float, str]:
    """``(strength, scope)`` of one request: its own values, else the server's defaults."""
    validate_extra_args(extra_args)
    extra_args = extra_args or {}
    strength = _strength(extra_args["strength"]) if "strength" in extra_args else default_strength
    scope = extra_args.get("scope", default_scope)
    return strength, scope


def check_default_strength(value: Any) -> float:
    """The server's default strength, or ``ValueError``."""
    return _strength(value)
