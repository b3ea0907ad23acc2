"""What a served request may ask for, the server's settings, and each token's strength per editor.

A request carries ``{"editor": name, "strength": s, "scope": ...}`` (OpenAI API: ``vllm_xargs``;
offline: ``SamplingParams(extra_args=...)``), or ``"kl": c`` instead of a strength: the fluency cost
wanted, converted through the editor's measured strength → KL curve
(:class:`~hpredit.editors.kl_curve.KLCurve`, carried in the server's settings). All are optional;
the server's defaults fill the gaps. ``{"editors": {name: strength, ...}}`` instead asks for several
editors at once (at most :data:`MAX_REQUEST_EDITORS`): where they edit the same layer, they apply in
the server's editor order, each to the output of the one before.
Pure Python and NumPy, no vLLM import: the front end validates with it, both model runners resolve
requests and compute per-token strengths with it (:func:`token_strengths`).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checks import MAX_COMBINED_EDITORS, check_kl_target, check_strength
from ..editors.kl_curve import KLCurve
from ..errors import HpreditError
from ..hooks import SCOPES

__all__ = [
    "DEFAULT_EDITOR",
    "MAX_REQUEST_EDITORS",
    "REQUEST_KEYS",
    "SUPPORTED",
    "RequestEdit",
    "ServeSettings",
    "edited_name",
    "token_strengths",
    "validate_extra_args",
]

#: keys hpredit reads from ``extra_args``
REQUEST_KEYS = ("editor", "editors", "strength", "kl", "scope")
#: the most editors one request may combine (``"editors"``)
MAX_REQUEST_EDITORS = MAX_COMBINED_EDITORS
#: keys vLLM itself puts into ``extra_args`` (passed through untouched)
VLLM_KEYS = ("kv_transfer_params", "ec_transfer_params")
#: the Hugging Face architectures served: those tests/test_vllm.py runs against Hugging Face + attach
SUPPORTED = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "GPT2LMHeadModel",
)
#: the name of an editor given without one (``--editor DIR``)
DEFAULT_EDITOR = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def spec_hex(editor_names: tuple[str, ...], max_kl: tuple[float | None, ...] | None) -> str:
    """The server's editor names and each one's largest measured KL (None: no curves), as hex: the
    suffix of the class names vLLM loads in each process (the validator, the request check)."""
    spec = {"editors": list(editor_names), "max_kl": None if max_kl is None else list(max_kl)}
    return json.dumps(spec).encode().hex()


def spec_from_hex(text: str) -> tuple[tuple[str, ...], tuple[float | None, ...] | None]:
    """:func:`spec_hex` read back; ``ValueError`` for anything else."""
    try:
        spec = json.loads(bytes.fromhex(text).decode())
        names, max_kl = tuple(spec["editors"]), spec["max_kl"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(f"not an hpredit server spec: {text[:40]!r}") from None
    return names, None if max_kl is None else tuple(max_kl)


@functools.cache
def specialised(
    base: type, prefix: str, editor_names: tuple[str, ...], max_kl: tuple[float | None, ...] | None = None
) -> type:
    """``base`` for a server with these editors (class attributes ``editor_names``, ``max_kl``), named
    ``prefix + spec_hex(...)`` in ``base``'s module, so that vLLM can load it by name in any process."""
    attrs = {"editor_names": editor_names, "max_kl": max_kl, "__module__": base.__module__}
    return type(prefix + spec_hex(editor_names, max_kl), (base,), attrs)


def specialised_by_name(base: type, prefix: str, name: str) -> type:
    """The class :func:`specialised` names ``name`` (a module ``__getattr__``); ``AttributeError`` else."""
    if name.startswith(prefix):
        try:
            return specialised(base, prefix, *spec_from_hex(name[len(prefix) :]))
        except ValueError:
            pass
    raise AttributeError(f"module {base.__module__!r} has no attribute {name!r}")


def edited_name(architecture: str) -> str:
    """The vLLM architecture name of hpredit's edited version of ``architecture``."""
    return "HPREdit" + architecture


def _request_error(e: HpreditError) -> ValueError:
    return ValueError(f"hpredit: {e}")


def _strength(value: Any) -> float:
    try:
        return check_strength(value, "'strength'")
    except HpreditError as e:
        raise _request_error(e) from None


def _kl(value: Any) -> float:
    try:
        return check_kl_target(value, "'kl'")
    except HpreditError as e:
        raise _request_error(e) from None


def _scope(value: Any) -> str:
    if value not in SCOPES:
        raise ValueError(f"hpredit: 'scope' must be one of {', '.join(SCOPES)}, got {value!r}")
    return value


def check_editor_name(name: Any) -> str:
    """An editor name: letters, digits, ``_`` and ``-`` (it names the editor in requests)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise HpreditError(f"an editor name must be letters, digits, '_' or '-', got {name!r}")
    return name


def validate_extra_args(
    extra_args: dict[str, Any] | None,
    editors: tuple[str, ...] | None = None,
    max_kl: tuple[float | None, ...] | None = None,
) -> None:
    """Raise ``ValueError`` (one clear line) for anything hpredit cannot apply; ``editors``: the
    server's editor names (None: any name passes, as where the server is not known); ``max_kl``:
    each editor's largest measured KL, None for an editor without a curve (None: not checked)."""
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
    if "editor" in extra_args:
        _editor_name(extra_args["editor"], editors)
    if "editors" in extra_args:
        both = sorted(k for k in ("editor", "strength", "kl") if k in extra_args)
        if both:
            raise ValueError(
                f"hpredit: give 'editors' (names → strengths) or {' and '.join(repr(k) for k in both)}, not both"
            )
        editor_strengths(extra_args["editors"], editors)
    if "kl" in extra_args:
        if "strength" in extra_args:
            raise ValueError("hpredit: give 'strength' or 'kl', not both")
        kl = _kl(extra_args["kl"])
        if editors is not None and max_kl is not None:
            name = extra_args.get("editor", editors[0])
            problem = _unreachable(name, max_kl[editors.index(name)], kl)
            if problem:
                raise ValueError(f"hpredit: {problem}")


def _editor_name(name: Any, editors: tuple[str, ...] | None) -> str:
    if not isinstance(name, str) or (editors is not None and name not in editors):
        served = "any name" if editors is None else ", ".join(editors)
        raise ValueError(f"hpredit: unknown editor {name!r}: this server has {served}")
    return name


def editor_strengths(value: Any, editors: tuple[str, ...] | None = None) -> dict[str, float]:
    """A request's ``"editors"``: a JSON object ``{name: strength}`` (or the flat list ``[name, strength,
    ...]`` the server's front door hands vLLM, whose request schema has no nested objects) → names →
    strengths, each name known (``editors``; None: any) and given once, each strength checked, at
    least one and at most :data:`MAX_REQUEST_EDITORS`. ``ValueError`` (one line) otherwise."""
    if isinstance(value, list) and len(value) % 2 == 0:
        pairs = list(zip(value[::2], value[1::2]))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise ValueError(f"hpredit: 'editors' must be an object of editor names → strengths, got {value!r}")
    if not pairs:
        raise ValueError("hpredit: 'editors' is empty: name at least one editor and its strength")
    if len(pairs) > MAX_REQUEST_EDITORS:
        raise ValueError(f"hpredit: 'editors' names {len(pairs)} editors: at most {MAX_REQUEST_EDITORS} per request")
    out: dict[str, float] = {}
    for name, strength in pairs:
        _editor_name(name, editors)
        if name in out:
            raise ValueError(f"hpredit: 'editors' names editor {name!r} twice")
        try:
            out[name] = check_strength(strength, f"the strength of editor {name!r} in 'editors'")
        except HpreditError as e:
            raise _request_error(e) from None
    return out


def _unreachable(editor: str, max_kl: float | None, kl: float, key: str = "'kl'", strength: str = "'strength'") -> str:
    """Why ``kl`` (spelled ``key``) cannot be converted through the editor's measured curve, or ''."""
    if max_kl is None:
        return (
            f"editor {editor!r} has no measured strength → KL curve, so {key} cannot be converted: "
            f"pass {strength} (or serve an editor from hpredit run, which records the curve)"
        )
    if kl > max_kl:
        return (
            f"{key} {kl:g} is beyond editor {editor!r}'s measured strength → KL curve "
            f"(0 to {max_kl:.4g} nats/token): ask for a smaller cost, or pass {strength}"
        )
    return ""


@dataclass(frozen=True)
class RequestEdit:
    """One request's edit: ``(editor index, strength)`` per editor it asks for, in the server's editor
    order (the order they apply in), and the first token position edited."""

    edits: tuple[tuple[int, float], ...]
    start: int

    @classmethod
    def one(cls, editor: int, strength: float, start: int) -> RequestEdit:
        """The edit of one editor."""
        return cls(((editor, strength),), start)


@dataclass(frozen=True)
class ServeSettings:
    """The server's editors (name, directory; the default first), their strength → KL curves, and the
    default strength (or cost, ``kl``) and scope: written once into vLLM's ``hf_overrides`` and read
    back by every vLLM process from its config.

    ``curves``: one per editor (None: the editor has none), or empty where no editor has one.
    ``kl``: the default cost instead of ``strength``, converted per editor (each must reach it).
    """

    editors: tuple[tuple[str, str], ...]
    strength: float = 1.0
    scope: str = "all"
    kl: float | None = None
    curves: tuple[KLCurve | None, ...] = ()

    def __post_init__(self) -> None:
        if self.curves and len(self.curves) != len(self.editors):
            raise HpreditError(f"{len(self.curves)} strength → KL curves for {len(self.editors)} editors")
        if self.kl is not None:
            for name, top in zip(self.names, self.max_kl):
                problem = _unreachable(name, top, self.kl, "--kl", "--strength")
                if problem:
                    raise HpreditError(problem)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.editors)

    @property
    def max_kl(self) -> tuple[float | None, ...]:
        """Each editor's largest measured KL (None: no curve): the range a request's ``kl`` may ask for."""
        curves = self.curves or (None,) * len(self.editors)
        return tuple(None if c is None else c.max_kl for c in curves)

    def overrides(self, architecture: str) -> dict[str, Any]:
        """The ``hf_overrides`` that select the edited architecture and carry these settings."""
        return {
            "architectures": [edited_name(architecture)],
            "hpredit_editors": [list(e) for e in self.editors],
            "hpredit_strength": self.strength,
            "hpredit_scope": self.scope,
            "hpredit_kl": self.kl,
            "hpredit_kl_curves": [None if c is None else c.to_json() for c in self.curves],
        }

    @classmethod
    def from_config(cls, hf_config: Any) -> ServeSettings:
        """The settings an engine was started with (its ``hf_config`` after the overrides)."""

        def value(key: str, default: Any) -> Any:  # a JSON string, as some config round trips leave it
            v = getattr(hf_config, key, default)
            return json.loads(v) if isinstance(v, str) and key in ("hpredit_editors", "hpredit_kl_curves") else v

        editors = value("hpredit_editors", None)
        if not editors:
            raise ValueError(
                "hpredit: no editor configured (start the engine with hpredit serve or hpredit.serving.llm)"
            )
        kl = value("hpredit_kl", None)
        curves = value("hpredit_kl_curves", None) or []
        return cls(
            tuple((str(n), str(p)) for n, p in editors),
            float(value("hpredit_strength", 1.0)),
            str(value("hpredit_scope", "all")),
            None if kl is None else float(kl),
            tuple(None if c is None else KLCurve.from_json(c, "hpredit_kl_curves") for c in curves),
        )

    def resolve(self, extra_args: dict[str, Any] | None, prompt_len: int) -> RequestEdit:
        """One request's edit: its own values, else the server's defaults; a ``kl`` is converted
        through the request's editor's curve (as ``editor.attach(kl=...)`` converts it)."""
        validate_extra_args(extra_args, self.names, self.max_kl)
        extra_args = extra_args or {}
        scope = extra_args.get("scope", self.scope)
        start = first_edited_position(scope, prompt_len)
        if "editors" in extra_args:
            chosen = editor_strengths(extra_args["editors"], self.names)
            return RequestEdit(tuple(sorted((self.names.index(n), s) for n, s in chosen.items())), start)
        editor = self.names.index(extra_args.get("editor", self.names[0]))
        if "strength" in extra_args:
            strength = _strength(extra_args["strength"])
        elif "kl" in extra_args or self.kl is not None:
            kl = _kl(extra_args["kl"]) if "kl" in extra_args else self.kl
            curve = self.curves[editor] if self.curves else None
            assert curve is not None and kl is not None  # checked by validate_extra_args, or in __post_init__
            strength = curve.strength_for(kl)
        else:
            strength = self.strength
        return RequestEdit.one(editor, strength, start)


def first_edited_position(scope: str, prompt_len: int) -> int:
    """The first token position a request's scope edits (the prompt is positions 0..prompt_len-1)."""
    return {"all": 0, "last-prompt-and-generated": max(prompt_len - 1, 0), "generated": prompt_len}[scope]


def token_strengths(rows: list[RequestEdit], counts: np.ndarray, positions: np.ndarray, n_editors: int) -> np.ndarray:
    """Each scheduled token's strength for each editor, ``(n_editors, tokens)`` float32.

    ``rows``: the batch's requests in order; ``counts`` ``(requests,)``: tokens each has in this
    step; ``positions`` ``(tokens,)``: each token's position in its sequence. A token gets, in the row
    of each editor its request asks for, that editor's strength if its position is in the request's
    scope; 0 everywhere else (0 = unedited, bit for bit).
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    out = np.zeros((n_editors, n), dtype=np.float32)
    if not rows:
        return out
    start = np.repeat(np.array([r.start for r in rows], dtype=np.int64), counts)
    active = np.asarray(positions[:n]) >= start
    tokens = np.arange(n)
    for j in range(max(len(r.edits) for r in rows)):  # each request's j-th editor
        editor = np.repeat(np.array([r.edits[j][0] if j < len(r.edits) else -1 for r in rows]), counts)
        strength = np.repeat(np.array([r.edits[j][1] if j < len(r.edits) else 0.0 for r in rows]), counts)
        on = editor >= 0
        out[editor[on], tokens[on]] = np.where(active[on], strength[on], 0.0)
    return out
