"""One contract per value: what the library, the CLI and the server accept, checked in one place.

Each check returns the value as the library uses it or raises :class:`HpreditError` with one line
saying what is wrong and what to pass. ``name`` is how the caller names the value (``"strength"``
in Python, ``"--strength"`` on the command line, ``"'strength'"`` in a request), so the rule and
its message are the same everywhere and only the name differs.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import HpreditError

__all__ = ["MAX_STRENGTH", "check_strength"]

#: The largest |strength| accepted anywhere (``attach``, the CLI, each served request). HPR's useful
#: range is about 0–2 and the additive methods' a few units; a bound keeps every per-token strength
#: finite in float16/bfloat16/float32 buffers (1e39 would be ``inf`` there and the edit would write NaN).
MAX_STRENGTH = 100.0


def check_strength(value: Any, name: str = "strength") -> float:
    """An edit strength: a real number (not a bool or a string) with ``|value| ≤ MAX_STRENGTH``;
    negative strengths turn the edit the other way and are allowed everywhere."""
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


# --------------------------------------------------------------------------- reliability: seeds, lists, environment
# (issue 21) Seeds, repeated list entries and the environment variables hpredit reads: one rule each.

__all__ += ["MAX_SEED", "check_seed", "check_unique", "env_number"]

#: The largest seed accepted: what NumPy's and Python's generators take alike (2**63 - 1).
MAX_SEED = 2**63 - 1


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed of a split or a bootstrap: an integer in ``0..2**63-1`` (NumPy refuses negative seeds,
    so they are refused everywhere, before any work)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise HpreditError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def check_unique(values: Any, name: str) -> list:
    """A list without repeated entries (a method or seed given twice would count twice in a mean)."""
    values = list(values)
    seen: set = set()
    repeated = [v for v in values if v in seen or seen.add(v)]  # type: ignore[func-returns-value]
    if repeated:
        raise HpreditError(f"{name} lists {', '.join(repr(v) for v in dict.fromkeys(repeated))} more than once")
    return values


def env_number(name: str, default: float, low: float = 0.0, integer: bool = False) -> float:
    """Environment variable ``name`` as a number ``> low`` (``default`` when unset or empty); anything
    else is one :class:`HpreditError` naming the variable."""
    import os

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
