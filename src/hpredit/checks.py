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
