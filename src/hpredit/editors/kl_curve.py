"""An editor's measured strength → fluency-cost curve, and the conversion of a cost into a strength.

The points are what a strength search measured (no extra forward passes): the mean per-token
KL(unedited ‖ edited) on hpredit's neutral text (:mod:`hpredit.evaluation.side_effects`), on the
model the editor was fitted on, at each strength tried. Strength 0 costs nothing (the edit is the
identity there), so ``(0, 0)`` is always part of the curve.

What a conversion promises: on that neutral text, with that model, the strength returned costs
about the KL asked for (between measured points the curve is interpolated, so the cost there is an
estimate). What it does not promise: the same cost on other text (prompts far from everyday prose,
chat templates, other languages), another scope than ``all`` tokens, or another model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..checks import MAX_STRENGTH, check_kl_target, named
from ..errors import HpreditError

__all__ = ["CURVE_SCOPE", "KLCurve", "scope_note"]


#: The token scope every curve hpredit measures is measured with: every token edited.
CURVE_SCOPE = "all"


def scope_note(kl: float, strength: float, scope: str) -> str | None:
    """One line saying that ``kl`` was converted through a curve measured with scope ``all`` while
    the edit runs with ``scope`` (fewer tokens edited: the curve does not promise that cost); None
    when the scopes agree."""
    if scope == CURVE_SCOPE:
        return None
    return (
        f"note: {named('kl')} {kl:g} converts to strength {strength:.4g} through the editor's strength → KL curve, "
        f"measured with scope {CURVE_SCOPE} (every token edited); with {named('scope')} {scope} fewer tokens are "
        "edited, so this strength costs less than that on neutral text"
    )


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class KLCurve:
    """Measured points ``strengths[i] → kl[i]`` (strengths in (0, MAX_STRENGTH], increasing; KL ≥ 0
    in nats/token), so that every strength a cost converts to is one ``attach`` takes.

    ``text`` says which neutral text the KL was measured on (and how many tokens).
    """

    strengths: tuple[float, ...]
    kl: tuple[float, ...]
    text: str = ""

    def __post_init__(self) -> None:
        problem = _problem(self.strengths, self.kl)
        if problem:
            raise HpreditError(f"strength → KL curve: {problem}")

    @classmethod
    def from_points(cls, points: Sequence[tuple[float, float]], text: str = "") -> KLCurve:
        """From measured ``(strength, kl)`` pairs in any order (positive strengths only; a repeat keeps
        the last). A KL measured below 0 (float rounding of a cost of almost nothing: KL is ≥ 0) is
        taken as 0; a curve given whole (the constructor, :meth:`from_json`) must hold KL ≥ 0."""
        by_strength = {float(s): _at_least_zero(float(k)) for s, k in points if s > 0}
        ordered = sorted(by_strength.items())
        return cls(tuple(s for s, _ in ordered), tuple(k for _, k in ordered), text)

    @property
    def max_kl(self) -> float:
        """The largest cost measured (the top of the range :meth:`strength_for` converts)."""
        return max(self.kl, default=0.0)

    def strength_for(self, kl: float, name: str = "kl") -> float:
        """The smallest strength at which the curve reaches ``kl`` (0 for 0).

        Between measured points ``sqrt(KL)`` is interpolated linearly in the strength (a small edit
        costs about ``c·strength²``, so this is exact near 0); where the measured curve is not
        monotone, the first crossing is taken. Beyond the largest KL measured: one clear error.
        """
        target = check_kl_target(kl, name)
        if target > self.max_kl:
            raise HpreditError(
                f"{name} {target:g} is beyond this editor's measured strength → KL curve "
                f"(0 to {self.max_kl:.4g} nats/token, up to strength {self.strengths[-1]:g}): "
                "ask for a smaller cost, or pass a strength"
            )
        if target == 0:
            return 0.0
        s0, r0, r = 0.0, 0.0, math.sqrt(target)
        for s1, k1 in zip(self.strengths, self.kl):
            r1 = math.sqrt(k1)
            if r1 >= r:
                s = s0 + (s1 - s0) * (r - r0) / (r1 - r0) if r1 > r0 else s1
                if s > MAX_STRENGTH:  # a curve's strengths are within the bound; said here, should one not be
                    raise HpreditError(
                        f"{name} {target:g} converts to strength {s:g} through this editor's curve, beyond the "
                        f"largest strength attach takes ({MAX_STRENGTH:g}): ask for a smaller cost"
                    )
                return s
            s0, r0 = s1, r1
        raise AssertionError("unreachable: target ≤ max_kl")  # pragma: no cover

    def to_json(self) -> dict[str, Any]:
        return {"strengths": list(self.strengths), "kl": list(self.kl), "text": self.text}

    @classmethod
    def from_json(cls, d: Any, where: str) -> KLCurve:
        """From an artifact's ``kl_curve`` entry; anything malformed is one error naming ``where``."""
        if not isinstance(d, dict) or not isinstance(d.get("strengths"), list) or not isinstance(d.get("kl"), list):
            raise HpreditError(f"{where}: 'kl_curve' must be an object with lists 'strengths' and 'kl'")
        problem = _problem(d["strengths"], d["kl"])
        if problem:
            raise HpreditError(f"{where}: 'kl_curve': {problem}")
        return cls(tuple(float(s) for s in d["strengths"]), tuple(float(k) for k in d["kl"]), str(d.get("text", "")))


def _at_least_zero(kl: float) -> float:
    """A measured KL below 0 is float rounding of (almost) nothing: 0. NaN stays NaN (refused)."""
    return 0.0 if kl < 0 else kl


def _problem(strengths: Sequence[Any], kl: Sequence[Any]) -> str | None:
    """Why these points are not a curve, or None."""
    if len(strengths) != len(kl) or not strengths:
        return f"needs as many KL values as strengths, at least one ({len(strengths)} strengths, {len(kl)} KL)"
    if not all(_finite_number(s) and 0 < s <= MAX_STRENGTH for s in strengths):
        return f"strengths must be positive finite numbers up to {MAX_STRENGTH:g} (the largest strength attach takes)"
    if any(b <= a for a, b in zip(strengths, strengths[1:])):
        return "strengths must be increasing"
    if not all(_finite_number(k) and k >= 0 for k in kl):
        return "KL values must be finite numbers ≥ 0"
    return None
