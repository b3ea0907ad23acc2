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

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import MAX_COMBINED_EDITORS, check_kl_target, check_strength
from ..editors.kl_curve import KLCurve
from ..errors import HpreditError
from ..hooks import SCOPES

__all__ = [
    "DEFAULT_EDITOR",
    "LIVE",
    "FrontSpec",
    "MAX_REQUEST_EDITORS",
    "REQUEST_KEYS",
    "SUPPORTED",
    "RequestEdit",
    "EditorStats",
    "ServeSettings",
    "content_id",
    "edited_name",
    "token_strengths",
    "validate_extra_args",
]

#: keys hpredit reads from ``extra_args``
REQUEST_KEYS = ("editor", "editors", "strength", "kl", "scope")
#: why ``--max-editors`` needs the edit outside CUDA graphs
RUNTIME_NEEDS_EAGER = (
    "hpredit: --max-editors (editors loaded at runtime) cannot run inside CUDA graphs, which replay the edits "
    "they captured: add --enforce-eager, or -O.cudagraph_mode=NONE to keep torch.compile"
)
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
#: the longest editor name (it is a metric label and part of every request naming it)
MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class FrontSpec:
    """What the server's front door (request check, validator) knows of its editors: their names (the
    default first), each one's largest measured KL (None: no curve; the whole tuple None: not
    checked), each one's content id (:func:`content_id`, folded into the cache salt), and for a server
    that loads editors at runtime its id (the key of :data:`LIVE`) and how many editors it may hold.

    Written into the names of the classes vLLM loads (:meth:`hex`), so that every process has it."""

    names: tuple[str, ...]
    max_kl: tuple[float | None, ...] | None = None
    ids: tuple[str, ...] = ()
    server: str | None = None
    capacity: int = 0
    #: for loading at runtime: each editor's directory, the model (path, the name its editors' fingerprints
    #: are checked against, whether strictly) and the server's default cost (each editor must reach it)
    paths: tuple[str, ...] = ()
    model: tuple[str, str, bool] | None = None
    kl: float | None = None

    def hex(self) -> str:
        spec = dataclasses.asdict(self)
        return json.dumps(spec).encode().hex()

    @classmethod
    def from_hex(cls, text: str) -> FrontSpec:
        """:meth:`hex` read back; ``ValueError`` for anything else."""
        try:
            spec = json.loads(bytes.fromhex(text).decode())
            max_kl, model, kl = spec["max_kl"], spec.get("model"), spec.get("kl")
            return cls(
                tuple(spec["names"]),
                None if max_kl is None else tuple(max_kl),
                tuple(spec.get("ids", ())),
                spec.get("server"),
                int(spec.get("capacity", 0)),
                tuple(spec.get("paths", ())),
                None if model is None else (str(model[0]), str(model[1]), bool(model[2])),
                None if kl is None else float(kl),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError, IndexError):
            raise ValueError(f"not an hpredit server spec: {text[:40]!r}") from None

    def with_editor(self, name: str, path: str, max_kl: float | None, content: str) -> FrontSpec:
        """These editors and one more, last (loaded at runtime)."""
        tops = self.max_kl or (None,) * len(self.names)
        return dataclasses.replace(
            self,
            names=(*self.names, name),
            max_kl=(*tops, max_kl),
            ids=(*self.ids, content),
            paths=(*self.paths, path),
        )

    def without(self, name: str) -> FrontSpec:
        """These editors less ``name``."""
        i = self.names.index(name)
        return dataclasses.replace(
            self,
            names=_without(self.names, i),
            max_kl=None if self.max_kl is None else _without(self.max_kl, i),
            ids=_without(self.ids, i),
            paths=_without(self.paths, i),
        )

    def current(self) -> FrontSpec:
        """The editors now: as loaded at runtime in this process (:data:`LIVE`), else as started."""
        return LIVE.get(self.server, self) if self.server is not None else self

    def content_ids(self, names: list[str]) -> list[str | None]:
        """The content id of each named editor (None: unknown here)."""
        found = dict(zip(self.names, self.ids))
        return [found.get(n) for n in names]


#: this process's front door, for servers that load editors at runtime: server id → its editors now
LIVE: dict[str, FrontSpec] = {}


def load_refusal(names: tuple[str, ...], capacity: int, name: str) -> tuple[int, str] | None:
    """Why an editor named ``name`` cannot be loaded beside ``names`` on a server holding ``capacity``
    (0: none loaded at runtime): ``(HTTP status, one line)``, or None. The front door and the workers
    apply the same rule."""
    if not capacity:
        return 400, "this server loads no editors at runtime: start it with --max-editors N"
    if name in names:
        return 409, f"an editor named {name!r} is loaded already: unload it first, or choose another name"
    if len(names) >= capacity:
        return 409, f"the server holds {len(names)} editors, its most (--max-editors {capacity}): unload one first"
    return None


def unload_refusal(names: tuple[str, ...], capacity: int, name: str) -> tuple[int, str] | None:
    """Why the editor ``name`` cannot be unloaded (the first is the default: requests that name none get
    it): ``(HTTP status, one line)``, or None."""
    if not capacity:
        return 400, "this server unloads no editors at runtime: start it with --max-editors N"
    if name not in names:
        return 404, f"no editor named {name!r} is loaded (loaded: {', '.join(names)})"
    if name == names[0]:
        return 400, f"editor {name!r} is the server's default (requests that name no editor get it): it stays"
    return None


def _without(values: tuple, i: int) -> tuple:
    """``values`` less its ``i``-th entry (an empty tuple stays empty)."""
    return values[:i] + values[i + 1 :] if values else values


@functools.cache
def specialised(base: type, prefix: str, spec: FrontSpec) -> type:
    """``base`` for a server with these editors (class attribute ``spec``), named ``prefix +
    spec.hex()`` in ``base``'s module, so that vLLM can load it by name in any process."""
    return type(prefix + spec.hex(), (base,), {"spec": spec, "__module__": base.__module__})


def specialised_by_name(base: type, prefix: str, name: str) -> type:
    """The class :func:`specialised` names ``name`` (a module ``__getattr__``); ``AttributeError`` else."""
    if name.startswith(prefix):
        try:
            return specialised(base, prefix, FrontSpec.from_hex(name[len(prefix) :]))
        except ValueError:
            pass
    raise AttributeError(f"module {base.__module__!r} has no attribute {name!r}")


def content_id(directory: str | Path) -> str:
    """An editor artifact's content id: the SHA-256 of its ``config.json`` (which holds the weights'
    checksum, verified whenever the artifact loads), shortened. Folded into the cache salt, so that a
    cached edited prompt is reused only by the same editor, whatever its name."""
    return hashlib.sha256((Path(directory) / "config.json").read_bytes()).hexdigest()[:16]


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
    """An editor name: letters, digits, ``_`` and ``-``, at most :data:`MAX_NAME` (it names the editor in
    requests and in the server's counters)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > MAX_NAME:
        shown = repr(name)
        shown = shown if len(shown) <= 80 else shown[:60] + f"... ({len(name)} characters)"
        raise HpreditError(f"an editor name must be letters, digits, '_' or '-', at most {MAX_NAME}, got {shown}")
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
    """One request's edit: ``(editor's strength row, strength)`` per editor it asks for, in the server's
    editor order (the order they apply in), and the first token position edited."""

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
    ``ids``: each editor's content id (:func:`content_id`; empty: not known). ``capacity``: how many
    editors the engine may hold, loaded at runtime too (0: the editors given, none loaded later);
    ``server``: the id of a server that loads editors at runtime. ``slots``: each editor's row in the
    engine's per-token strengths (empty: its position), which stays when others are unloaded.
    """

    editors: tuple[tuple[str, str], ...]
    strength: float = 1.0
    scope: str = "all"
    kl: float | None = None
    curves: tuple[KLCurve | None, ...] = ()
    ids: tuple[str, ...] = ()
    capacity: int = 0
    server: str | None = None
    slots: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.curves and len(self.curves) != len(self.editors):
            raise HpreditError(f"{len(self.curves)} strength → KL curves for {len(self.editors)} editors")
        for what, values in (("content ids", self.ids), ("slots", self.slots)):
            if values and len(values) != len(self.editors):
                raise HpreditError(f"{len(values)} {what} for {len(self.editors)} editors")
        if self.capacity and len(self.editors) > self.capacity:
            raise HpreditError(f"{len(self.editors)} editors given, but the server holds at most {self.capacity}")
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

    @property
    def rows(self) -> int:
        """The rows of the engine's per-token strengths: one per editor it may hold."""
        return self.capacity or len(self.editors)

    def slot(self, position: int) -> int:
        """The strength row of the editor at ``position``."""
        return self.slots[position] if self.slots else position

    def front(self, model: tuple[str, str, bool] | None = None) -> FrontSpec:
        """What the front door checks requests against (``model``: path, name and strictness, with which
        editors loaded at runtime are checked)."""
        paths = tuple(p for _, p in self.editors)
        return FrontSpec(self.names, self.max_kl, self.ids, self.server, self.capacity, paths, model, self.kl)

    def loaded(self, name: str, path: str, curve: KLCurve | None, content: str) -> ServeSettings:
        """These settings with one more editor (last in order, in the first free row)."""
        refusal = load_refusal(self.names, self.capacity, name)
        if refusal:
            raise HpreditError(refusal[1])
        used = {self.slot(i) for i in range(len(self.editors))}
        free = min(set(range(self.capacity)) - used)
        curves = (*(self.curves or (None,) * len(self.editors)), curve)
        return dataclasses.replace(
            self,
            editors=(*self.editors, (name, path)),
            curves=curves if any(c is not None for c in curves) else (),
            ids=(*(self.ids or ("",) * len(self.editors)), content),
            slots=(*(self.slot(i) for i in range(len(self.editors))), free),
        )

    def unloaded(self, name: str) -> ServeSettings:
        """These settings without the editor ``name`` (not the default: requests that name none use it)."""
        refusal = unload_refusal(self.names, self.capacity, name)
        if refusal:
            raise HpreditError(refusal[1])
        i = self.names.index(name)
        curves = _without(self.curves, i)
        return dataclasses.replace(
            self,
            editors=_without(self.editors, i),
            curves=curves if any(c is not None for c in curves) else (),
            ids=_without(self.ids, i),
            slots=_without(tuple(self.slot(j) for j in range(len(self.editors))), i),
        )

    def overrides(self, architecture: str) -> dict[str, Any]:
        """The ``hf_overrides`` that select the edited architecture and carry these settings."""
        return {
            "architectures": [edited_name(architecture)],
            "hpredit_editors": [list(e) for e in self.editors],
            "hpredit_strength": self.strength,
            "hpredit_scope": self.scope,
            "hpredit_kl": self.kl,
            "hpredit_kl_curves": [None if c is None else c.to_json() for c in self.curves],
            "hpredit_ids": list(self.ids),
            "hpredit_capacity": self.capacity,
            "hpredit_server": self.server,
        }

    @classmethod
    def from_config(cls, hf_config: Any) -> ServeSettings:
        """The settings an engine was started with (its ``hf_config`` after the overrides)."""

        def value(key: str, default: Any) -> Any:  # a JSON string, as some config round trips leave it
            v = getattr(hf_config, key, default)
            lists = ("hpredit_editors", "hpredit_kl_curves", "hpredit_ids")
            return json.loads(v) if isinstance(v, str) and key in lists else v

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
            tuple(str(i) for i in value("hpredit_ids", None) or ()),
            int(value("hpredit_capacity", 0) or 0),
            value("hpredit_server", None),
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
            order = sorted((self.names.index(n), s) for n, s in chosen.items())  # the server's order
            return RequestEdit(tuple((self.slot(i), s) for i, s in order), start)
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
        return RequestEdit.one(self.slot(editor), strength, start)


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


#: the counters :class:`EditorStats` keeps per editor, in order (the Prometheus names add ``hpredit_``
#: and ``_total``)
COUNTERS = ("requests", "edited_tokens", "guard_fallback_tokens", "guard_fallback_requests")


class EditorStats:
    """Per-editor counters of one worker process, by strength row (:data:`COUNTERS`): requests served
    with the editor (at any strength, counted when the request enters the running batch, so a request
    vLLM preempts and recomputes counts again), tokens given a nonzero strength for it (the editor's
    own gate may leave some as they are), tokens whose edit the non-finite guard left undone, and
    requests with at least one such token."""

    def __init__(self, rows: int) -> None:
        self.reset(rows)

    def reset(self, rows: int) -> None:
        """Every counter zero, for an engine with ``rows`` strength rows."""
        self.counts = np.zeros((rows, len(COUNTERS)), dtype=np.int64)
        self._fell: dict[int, RequestEdit] = {}  # requests with a fallback already counted (by identity)

    def admitted(self, edit: RequestEdit) -> None:
        for row, _ in edit.edits:
            self.counts[row, 0] += 1

    def step(self, rows: list[RequestEdit], counts: np.ndarray, tokens: np.ndarray, fell: np.ndarray) -> None:
        """One forward pass: the batch's requests, their token counts, each token's strengths
        ``(rows, tokens)`` and where the guard fell back ``(rows, tokens)`` bool."""
        self.counts[:, 1] += (tokens != 0).sum(axis=1)
        self.counts[:, 2] += fell.sum(axis=1)
        live = {id(r): r for r in rows}
        self._fell = {k: v for k, v in self._fell.items() if k in live}  # bounded by the batch
        if not fell.any():
            return
        ends = np.cumsum(counts)
        for edit, end, count in zip(rows, ends, counts):
            hit = fell[:, end - count : end].any(axis=1)
            if hit.any() and id(edit) not in self._fell:
                self._fell[id(edit)] = edit
                self.counts[hit, 3] += 1

    def clear(self, row: int) -> None:
        """Zero a row (an editor loaded into it starts its counters anew)."""
        self.counts[row] = 0

    def report(self, settings: ServeSettings) -> dict[str, dict[str, int]]:
        """Editor name → counter → value, for the editors loaded now."""
        return {
            name: dict(zip(COUNTERS, map(int, self.counts[settings.slot(i)]))) for i, name in enumerate(settings.names)
        }
