"""One contract per value: what the library, the CLI and the server accept, checked in one place.

Each check returns the value as the library uses it or raises :class:`HpreditError` with one line
saying what is wrong and what to pass. ``name`` is how the caller names the value (``"strength"``
in Python, ``"--strength"`` on the command line, ``"'strength'"`` in a request), so the rule and
its message are the same everywhere and only the name differs.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeGuard

from .errors import HpreditError

__all__ = [
    "MAX_SEED",
    "MAX_STRENGTH",
    "SCOPES",
    "STORE_DTYPES",
    "check_count",
    "check_editor_matches",
    "check_kl_cap",
    "DEFAULT_STRENGTH",
    "strength_given",
    "check_kl_target",
    "check_kl_targets",
    "check_kl_tol",
    "check_layers",
    "check_limit",
    "check_scope",
    "check_seed",
    "check_store_dtype",
    "check_strength",
    "check_strengths",
    "check_top_k",
    "is_int",
    "layer_list_problem",
    "named",
    "option_names",
]

#: The largest |strength| accepted anywhere (``attach``, the CLI, each served request). HPR's useful
#: range is about 0–2 and the additive methods' a few units; a bound keeps every per-token strength
#: finite in float16/bfloat16/float32 buffers (1e39 would be ``inf`` there and the edit would write NaN).
MAX_STRENGTH = 100.0
#: the most editors combined at once (:func:`hpredit.attach_editors`, a served request's ``editors``)
MAX_COMBINED_EDITORS = 8
#: The largest seed accepted: what NumPy's and Python's generators take alike (2**63 - 1).
MAX_SEED = 2**63 - 1


def check_strength(value: Any, name: str | None = None) -> float:
    """An edit strength: a real number (not a bool or a string) with ``|value| ≤ MAX_STRENGTH``;
    negative strengths turn the edit the other way and are allowed everywhere."""
    name = named(name or "strength")
    rule = f"{name} must be a number between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g}, got {value!r}"
    if value is None or isinstance(value, (bool, str, bytes)):
        raise HpreditError(rule)
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise HpreditError(rule) from None
    if not math.isfinite(s) or abs(s) > MAX_STRENGTH:
        raise HpreditError(rule)
    return s


# ------------------------------------------------------------------ the values of a job
# Layers, counts, the item limit, the token scope, seeds, the KL cap, the store dtype and the
# editor-vs-model match: each a function used by the library's own checks (run, fit, evaluate,
# compare, attach, collect_activations) and so, through them, by the CLI. ``name`` defaults to the
# value's name as the caller spells it (:func:`named`): ``top_k`` in Python, ``--top-k`` under the CLI.

_OPTION_NAMES: ContextVar[bool] = ContextVar("hpredit_option_names", default=False)

#: Which token positions an attached editor may edit (applied by :mod:`hpredit.hooks`).
#: ``all``: every token (each still gated by the editor); ``last-prompt-and-generated``: the last
#: real prompt token of each row and every generated token; ``generated``: generated tokens only.
SCOPES = ("all", "last-prompt-and-generated", "generated")
#: How activations may be stored (``auto``: float16, or bfloat16 where float16 would overflow).
STORE_DTYPES = ("auto", "float16", "bfloat16", "float32")


@contextmanager
def option_names() -> Iterator[None]:
    """Inside this block messages name values as command-line options (``--top-k``): the CLI's spelling."""
    token = _OPTION_NAMES.set(True)
    try:
        yield
    finally:
        _OPTION_NAMES.reset(token)


def named(name: str) -> str:
    """``name`` as the caller spells it: ``top_k`` in Python, ``--top-k`` inside :func:`option_names`
    (a name already spelled, such as ``"--top-k"`` or ``"'strength'"``, is kept)."""
    if not _OPTION_NAMES.get() or not name.isidentifier():
        return name
    return "--" + name.replace("_", "-")


def is_int(value: Any) -> TypeGuard[int]:
    """A whole number (Python's or NumPy's), not a bool (JSON ``true`` is not a count or a layer)
    and not a float such as 15.7 or 15.0: the one integer rule of the checks and the file readers."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(value: Any, name: str, low: int = 1) -> int:
    """A whole number of at least ``low`` (epochs, batch sizes, steps, tokens)."""
    if not is_int(value) or value < low:
        raise HpreditError(f"{named(name)} must be at least {low} (a whole number), got {value!r}")
    return int(value)


def check_limit(value: Any, name: str | None = None) -> int | None:
    """The number of items (questions, groups) to keep: None for all, else a positive whole number."""
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise HpreditError(f"{named(name or 'limit')} must be positive, got {value!r} (a whole number of items)")
    return int(value)


def check_seed(value: Any, name: str | None = None) -> int:
    """A seed (of a split, of training, of the bootstrap): a whole number ≥ 0."""
    if not is_int(value) or not 0 <= value <= MAX_SEED:
        raise HpreditError(f"{named(name or 'seed')} must be a whole number ≥ 0, got {value!r}")
    return int(value)


def layer_list_problem(
    layers: Any, n_layers: int | None = None, name: str | None = None, required: bool = False
) -> str | None:
    """Why ``layers`` is not None (unless ``required``) or a list of distinct layer indices (whole
    numbers ≥ 0, each below the model's ``n_layers`` when it is known), or None when it is: the one
    rule of layer lists, for :func:`check_layers` (arguments, ``--layers``), editor configs and stored files."""
    if layers is None and not required:
        return None
    name = named(name or "layers")
    if not isinstance(layers, list):
        return f"{name} must be a list of layer indices such as [15, 16], got {layers!r}"
    if not all(is_int(i) for i in layers):
        return f"{name} must be integers, got {layers}"
    if not layers:
        return f"{name} is empty: give at least one layer"
    dupes = sorted({i for i in layers if layers.count(i) > 1})
    if dupes:
        return f"{name} lists layer(s) {dupes} more than once"
    bad = [i for i in layers if i < 0 or (n_layers is not None and i >= n_layers)]
    if not bad:
        return None
    if n_layers is None:
        return f"{name} {bad} out of range: layers are numbered from 0"
    return f"{name} {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})"


def check_layers(
    layers: Sequence[int] | None, n_layers: int | None = None, name: str | None = None
) -> list[int] | None:
    """Layer indices: None (the default choice), else distinct whole numbers ≥ 0, each below the
    model's ``n_layers`` when it is known (:func:`layer_list_problem`); the list, in the order given."""
    if layers is None:
        return None
    chosen = list(layers)
    problem = layer_list_problem(chosen, n_layers, name)
    if problem is not None:
        raise HpreditError(problem)
    return [int(i) for i in chosen]


def check_top_k(top_k: Any, n_layers: int | None = None, name: str | None = None) -> int:
    """How many layers to edit: at least 1 and at most the model's ``n_layers`` when it is known."""
    name = named(name or "top_k")
    k = check_count(top_k, name)
    if n_layers is not None and k > n_layers:
        raise HpreditError(f"{name} {k} is more than the model's {n_layers} layers")
    return k


def check_kl_cap(value: Any, name: str | None = None) -> float:
    """The largest fluency cost (KL nats/token on neutral text) a chosen strength may have: > 0, finite."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise HpreditError(f"{named(name or 'kl_cap')} must be a positive number, got {value!r}")
    return float(value)


def check_strengths(values: Sequence[Any], name: str | None = None) -> list[float]:
    """A grid of strengths to try: at least one, each a valid strength (:func:`check_strength`)."""
    name = named(name or "strengths")
    grid = list(values)
    if not grid:
        raise HpreditError(f"{name} needs at least one value")
    return [check_strength(s, f"each of {name}") for s in grid]


def check_scope(scope: Any) -> str:
    """A token scope: one of :data:`SCOPES`."""
    if scope not in SCOPES:
        raise HpreditError(f"unknown scope {scope!r}: use one of {', '.join(SCOPES)}")
    return scope


def check_store_dtype(value: Any, name: str | None = None) -> Any:
    """An activation store type by name (:data:`STORE_DTYPES`); a ``torch.dtype`` passes through."""
    if isinstance(value, str) and value not in STORE_DTYPES or value is None or isinstance(value, (int, float)):
        raise HpreditError(f"{named(name or 'store_dtype')} must be one of {', '.join(STORE_DTYPES)}, got {value!r}")
    return value


def check_editor_matches(
    editor_fingerprint: Any, model_fingerprint: Any, strict: bool = True, editor: str | None = None
) -> None:
    """The editor was fitted on this kind of model: architecture, sizes (and, with ``strict``, the
    name) agree. Both are :class:`~hpredit.architecture.ModelFingerprint` s: the model's may come
    from a loaded model or from its config alone (before loading). ``editor``: which editor (its
    directory), named in the message where several are checked (a server's)."""
    problems = editor_fingerprint.mismatches(model_fingerprint, check_name=strict)
    if problems:
        hint = (
            f" (pass {'--no-strict' if _OPTION_NAMES.get() else 'strict=False'} to ignore the name)"
            if strict and len(problems) == 1 and problems[0].startswith("name")
            else ""
        )
        which = f"editor {editor}" if editor else "editor"
        raise HpreditError(f"{which} does not match this model: " + "; ".join(problems) + hint)


# ------------------------------------------------------------------ lists and the environment
# Repeated list entries and the environment variables hpredit reads: one rule each.

__all__ += ["check_unique", "env_number"]


def check_unique(values: Any, name: str | None = None) -> list:
    """A list without repeated entries (a method or seed given twice would count twice in a mean)."""
    values = list(values)
    seen: set = set()
    repeated = [v for v in values if v in seen or seen.add(v)]  # type: ignore[func-returns-value]
    if repeated:
        raise HpreditError(
            f"{named(name or 'values')} lists {', '.join(repr(v) for v in dict.fromkeys(repeated))} more than once"
        )
    return values


def env_number(name: str, default: float, low: float = 0.0, integer: bool = False) -> float:
    """Environment variable ``name`` as a number ``> low`` (``default`` when unset or empty); anything
    else is one :class:`HpreditError` naming the variable."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= low:
        kind = "an integer" if integer else "a number"
        raise HpreditError(f"environment variable {name}={text!r} must be {kind} greater than {low:g}")
    return value


# ------------------------------------------------------------------ fluency-cost targets (matched-cost protocol)
# A cost asked for instead of a strength (``attach(kl=...)``, ``--kl``) and the targets of the
# matched-cost comparison: KL(unedited ‖ edited) in nats/token on neutral text.


class _DefaultStrength(float):
    """The default strength, 1, told apart (by identity) from a strength passed explicitly."""

    def __repr__(self) -> str:
        return "1.0"


#: The strength used when none is given (1); a caller who also gives ``kl`` must not give a strength.
DEFAULT_STRENGTH: float = _DefaultStrength(1.0)


def strength_given(value: Any) -> bool:
    """Whether ``value`` is a strength the caller passed (not :data:`DEFAULT_STRENGTH`)."""
    return value is not DEFAULT_STRENGTH


def check_kl_target(value: Any, name: str | None = None) -> float:
    """A fluency cost to reach: a finite number ≥ 0 (nats/token; 0 is the unedited model)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise HpreditError(f"{named(name or 'kl')} must be a number ≥ 0 (nats/token), got {value!r}")
    return float(value)


def check_kl_targets(values: Sequence[Any], name: str | None = None) -> list[float]:
    """The targets of a matched-cost comparison: at least one, each > 0 and finite, no repeats; sorted."""
    name = named(name or "targets")
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise HpreditError(f"{name} must be a list of KL targets (numbers), got {values!r}")
    targets = list(values)
    if not targets:
        raise HpreditError(f"{name} needs at least one KL target")
    for t in targets:
        if check_kl_target(t, f"each of {name}") == 0:
            raise HpreditError(f"each of {name} must be above 0 (the unedited model is the baseline), got {t!r}")
    if len(set(targets)) != len(targets):
        raise HpreditError(f"{name} lists a target twice: {targets}")
    return sorted(float(t) for t in targets)


def check_kl_tol(value: Any, name: str | None = None) -> float:
    """The relative tolerance of a matched cost: a number in (0, 1) (0.05: within 5 % of the target)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value < 1
    if not ok:
        raise HpreditError(f"{named(name or 'kl_tol')} must be a number between 0 and 1 (relative), got {value!r}")
    return float(value)


__all__ += ["not_for_protocol"]


def _protocol_named(protocol: str) -> str:
    """``--protocol grid`` on the command line, ``protocol='grid'`` in Python."""
    return f"--protocol {protocol}" if named("protocol").startswith("--") else f"protocol={protocol!r}"


def not_for_protocol(option: str, protocol: str, only: str, job: str, instead: str | None = None) -> str:
    """The message for a strength-search option given to a ``job`` (``comparison``, ``run``) whose
    ``protocol`` does not use it (it applies ``only`` under the other one): given is refused, never
    ignored. ``instead``: this protocol's option that means what the user wanted (e.g. a cap's cost
    is a target to reach)."""
    this = f"this {job} is {protocol}" if named("protocol").startswith("--") else f"this {job} is {protocol!r}"
    if instead is not None:
        example = f"{named(instead)} 0.3" if named(instead).startswith("--") else f"{instead}=[0.3]"
        return (
            f"{named(option)} applies only to {_protocol_named(only)} ({this}, which reaches given costs "
            f"instead of a cap): give the costs to reach as {named(instead)}, e.g. {example}"
        )
    return f"{named(option)} applies only to {_protocol_named(only)} ({this}): drop it, or use {_protocol_named(only)}"
