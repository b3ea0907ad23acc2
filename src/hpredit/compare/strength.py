"""The strength search, two rules.

- Matched cost (the default): for each target fluency cost (KL nats/token on neutral text), the
  strength whose cost hits it within a relative tolerance, found by a bracketing search
  (:func:`match_targets`); methods are then compared at equal cost.
- Grid (``protocol="grid"``, the published numbers): each setting's fluency cost first, then the
  task's metric on validation for those under the KL cap; the grid grows or shrinks toward the cap
  and can be refined by bisection (:func:`choose_strength`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..checks import MAX_STRENGTH, check_count, check_kl_targets, check_kl_tol
from ..editors import Editor
from ..editors.kl_curve import KLCurve
from ..evaluation.side_effects import NeutralText, fluency_cost, fluency_costs
from ..evaluation.tasks import Task, get_task
from ..variants import Variant

__all__ = [
    "KL_TOL",
    "Choice",
    "TARGETS",
    "TargetHit",
    "choose_strength",
    "fluency_at",
    "fluency_with",
    "match_cost",
    "match_targets",
    "neutral_note",
    "scores_at",
]


def fluency_at(model: nn.Module, neutral: NeutralText, editor: Editor, strengths: Sequence[float]) -> list[dict]:
    """:func:`fluency_with` at each of ``strengths``, in one widened pass (:func:`fluency_costs`)."""
    return fluency_costs(model, neutral, [Variant(editor, s) for s in strengths])


def scores_at(model: nn.Module, tok, task: Task, items: list, editor: Editor, strengths: Sequence[float]) -> list[dict]:
    """The task's metrics on ``items`` with ``editor`` at each of ``strengths``, scored together
    (:meth:`Task.score_variants`)."""
    return [metrics for metrics, _ in task.score_variants(model, tok, items, [Variant(editor, s) for s in strengths])]


def fluency_with(model: nn.Module, neutral: NeutralText, editor: Editor | None, strength: float) -> dict[str, float]:
    """The fluency cost (KL, perplexities on neutral text) with ``editor`` attached at ``strength``."""
    if editor is None:
        return fluency_cost(model, neutral)
    with editor.attach(model, strength=strength, scope="all"):
        return fluency_cost(model, neutral)


@dataclass(frozen=True)
class Choice:
    """One point a method is reported at: the editor (None: unedited, or nothing reached the
    target) and its strength, with what the search measured.

    ``kl``: the fluency cost the search measured there (None where it measured none: unedited,
    grid); ``tried``: every setting the search measured; ``target``, ``status`` (``hit``,
    ``closest``, ``unreachable``, ``unedited``), ``val`` (the validation score that chose among
    candidates): matched only; ``over_kl_cap``: grid only.
    """

    editor: Editor | None
    strength: float
    kl: float | None = None
    tried: list[dict] = field(default_factory=list)
    target: float | None = None
    status: str | None = None
    val: float | None = None
    over_kl_cap: bool | None = None


class _Search:
    """The settings tried so far (one row each) and the editor of each."""

    def __init__(
        self,
        model,
        tok,
        task: Task,
        val_items: list,
        neutral: NeutralText,
        kl_cap: float,
        log: Callable[[str], None],
        progress=None,
    ):
        self.model, self.tok, self.task, self.val_items = model, tok, task, val_items
        self.neutral, self.kl_cap, self.log, self.progress = neutral, kl_cap, log, progress
        self.tried: list[dict] = []
        self.editors: list[Editor] = []

    def attempt(self, ed: Editor, s: float) -> bool:
        """Measure one setting; whether it is under the cap."""
        return self.attempt_all(ed, [s])[0]

    def attempt_all(self, ed: Editor, strengths: list[float]) -> list[bool]:
        """Measure several settings of ``ed`` (their KL in one widened pass, then the validation
        score of those under the cap in another); whether each is under the cap."""
        key = self.task.primary
        if self.progress is not None:
            self.progress(f"strength {', '.join(f'{s}' for s in strengths)}: KL")
        costs = fluency_at(self.model, self.neutral, ed, strengths)
        under = [s for s, c in zip(strengths, costs) if c["kl"] <= self.kl_cap]
        if self.progress is not None and under:
            self.progress(f"strength {', '.join(f'{s}' for s in under)}: val {key}")
        vals = dict(zip(under, scores_at(self.model, self.tok, self.task, self.val_items, ed, under) if under else []))
        k = len(getattr(ed, "heads", [])) or None
        for s, cost in zip(strengths, costs):
            val = vals.get(s)
            self.tried.append({"strength": s, "k": k, "kl": cost["kl"], "val": val})
            self.editors.append(ed)
            self.log(
                f"strength {s}{f' K={k}' if k else ''} KL {cost['kl']:.4f} "
                + (f"val {key} {val[key]:.4f}" if val else f"over the cap {self.kl_cap}")
            )
        return [s in vals for s in strengths]

    def grid(self, ed: Editor, grid: list[float], max_doublings: int, max_halvings: int) -> list[dict]:
        """The grid, doubled past its top while still under the cap (``max_doublings`` times at
        most), halved below its bottom while all is over it (``max_halvings`` times); the rows of ``ed``."""
        under = self.attempt_all(ed, grid)
        s, n = grid[-1], 0
        while under[-1] and n < max_doublings:  # still under the cap: go stronger
            s, n = 2 * s, n + 1
            under.append(self.attempt(ed, s))
        s, n = grid[0], 0
        while not any(under) and n < max_halvings:  # all over the cap: go weaker
            s, n = s / 2, n + 1
            under.append(self.attempt(ed, s))
        return self.tried[len(self.tried) - len(under) :]

    def refine(self, ed: Editor, mine: list[dict], steps: int) -> None:
        """Bisect between the strongest strength under the cap and the weakest above it."""
        below = [t["strength"] for t in mine if t["val"] is not None]
        above = [t["strength"] for t in mine if t["val"] is None and below and t["strength"] > max(below)]
        if not (below and above):
            return
        lo, hi = max(below), min(above)
        for _ in range(steps):
            mid = (lo + hi) / 2
            if mid in (lo, hi):  # down to float resolution: nothing left to bisect
                break
            if self.attempt(ed, mid):
                lo = mid
            else:
                hi = mid

    def best(self) -> int:
        """The best validation score under the cap (ties: the weaker strength), else the lowest KL."""
        key = self.task.primary
        ok = [i for i, t in enumerate(self.tried) if t["val"] is not None]
        if ok:
            return max(ok, key=lambda i: (self.tried[i]["val"][key], -self.tried[i]["strength"]))
        return min(range(len(self.tried)), key=lambda i: self.tried[i]["kl"])


def choose_strength(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    editors: Sequence[Editor],
    grid: Sequence[float],
    val_items: list,
    neutral: NeutralText,
    kl_cap: float,
    max_doublings: int = 0,
    log: Callable[[str], None] = lambda s: None,
    task: Task | str = "truthfulqa-mc",
    refine: int = 0,
    progress: Callable[[str], None] | None = None,
    max_halvings: int | None = None,
) -> Choice:
    """Choose an editor (e.g. one of ITI's head counts) and strength on the validation items.

    Each setting's fluency cost (KL on ``neutral`` text) is measured first; among those under
    ``kl_cap`` the best validation score of the task's primary metric (MC2 for TruthfulQA) wins
    (ties: the weaker strength). While the grid's largest strength is still under the cap it is
    doubled, and while every strength is over it the smallest is halved, at most
    ``max_doublings`` times each way (``max_halvings``, when given, bounds the halving alone), so
    that no method stops short of the cap or is judged only above it. ``refine`` bisection steps
    then narrow the gap between the strongest setting under the cap and the weakest above it, so
    that a coarse grid does not favour a method whose grid point happens to land near the cap.
    When no setting qualifies, the lowest-KL one is taken and flagged. ``progress`` (optional) is
    told each step as it starts (e.g. to label a progress bar).

    Returns:
        A :class:`Choice` (``over_kl_cap``; ``tried``: ``[{strength, k, kl, val}]``).
    """
    search = _Search(
        model, tok, get_task(task) if isinstance(task, str) else task, val_items, neutral, kl_cap, log, progress
    )
    for ed in editors:
        halvings = max_doublings if max_halvings is None else max_halvings
        mine = search.grid(ed, list(grid), max_doublings, halvings)
        search.refine(ed, mine, refine)
    best = search.best()
    over = all(t["val"] is None for t in search.tried)
    return Choice(search.editors[best], search.tried[best]["strength"], tried=search.tried, over_kl_cap=over)


# --------------------------------------------------------------------------- matched cost

#: The default fluency-cost targets (KL nats/token on neutral text) of a matched-cost comparison.
TARGETS: tuple[float, ...] = (0.1, 0.25, 0.5)
#: The default relative tolerance: a strength hits a target when |KL − target| ≤ KL_TOL · target.
KL_TOL = 0.05
#: The default fluency cost of one chosen strength: the grid rule's cap, and the cost ``hpredit run`` aims at.
KL_CAP = 0.5


@dataclass(frozen=True)
class TargetHit:
    """Where a search landed for one target: the strength and its measured KL.

    ``status``: ``hit`` (within the tolerance), ``closest`` (the budget ran out first: the measured
    point nearest the target) or ``unreachable`` (no strength tried reached the target: ``strength``
    and ``kl`` are then the largest cost reached and where).
    """

    target: float
    strength: float
    kl: float
    status: str

    @property
    def reached(self) -> bool:
        return self.status != "unreachable"

    def to_json(self) -> dict:
        return {"target": self.target, "strength": self.strength, "kl": self.kl, "status": self.status}


def match_targets(
    cost: Callable[[float], float],
    targets: Sequence[float],
    start: Sequence[float],
    tol: float = KL_TOL,
    steps: int = 4,
    max_doublings: int = 6,
    max_strength: float = MAX_STRENGTH,
    costs: Callable[[list[float]], list[float]] | None = None,
) -> tuple[list[TargetHit], list[tuple[float, float]]]:
    """For each target, a strength ``s > 0`` with ``|cost(s) − target| ≤ tol · target``.

    ``cost`` is measured at the ``start`` strengths (a method's grid: the warm start), then at the
    top strength doubled while every cost is below the largest target (``max_doublings`` times at
    most, never past ``max_strength``); a cost measured below 0 (float rounding of a cost of almost
    nothing) counts as 0. Each target is then bracketed between the strongest
    measured strength below it and the weakest at or above it (``cost(0) = 0``, the edit being the
    identity there) and narrowed for at most ``steps`` measurements: each step measures where
    ``sqrt(cost)``, interpolated linearly in the strength, meets the target (a small edit costs
    about ``c·s²``), kept at least a tenth of the bracket away from its ends, so that a bracket
    always shrinks (bisection where the interpolation would stall; once it is down to float
    resolution the search stops there, whatever the budget). A cost that is not monotone is
    handled by bracketing the first crossing. Targets beyond every measured cost are reported as
    ``unreachable`` with the largest cost reached. ``costs`` (optional): the cost of several
    strengths at once (``costs(strengths)``), used for the ``start`` strengths.

    Returns:
        ``(hits, points)``: one :class:`TargetHit` per target (in the order given) and every
        ``(strength, cost)`` measured, in order (the editor's strength → KL curve).
    """
    check_kl_targets(targets)
    check_kl_tol(tol)
    check_count(steps, "steps", 0)
    measured: dict[float, float] = {}
    points: list[tuple[float, float]] = []

    def measure(s: float) -> float:
        if s not in measured:
            # KL is ≥ 0; a cost of (almost) nothing can be measured a little below 0 by float rounding
            measured[s] = max(0.0, float(cost(s)))
            points.append((s, measured[s]))
        return measured[s]

    first = sorted({float(x) for x in start if x > 0})
    if costs is not None and first:
        for s, c in zip(first, costs(first)):
            measured[s] = max(0.0, float(c))
            points.append((s, measured[s]))
    else:
        for s in first:
            measure(s)
    if not measured:
        measure(min(1.0, max_strength))
    top = max(targets)
    for _ in range(max_doublings):
        if max(measured.values()) >= top * (1 - tol) or 2 * max(measured) > max_strength:
            break
        measure(2 * max(measured))
    return [_hit(measure, measured, t, tol, steps) for t in targets], points


def _hit(
    measure: Callable[[float], float], measured: dict[float, float], t: float, tol: float, steps: int
) -> TargetHit:
    """Narrow one target's bracket (see :func:`match_targets`)."""

    def near() -> tuple[float, float] | None:
        close = [(abs(k - t), s) for s, k in measured.items() if abs(k - t) <= tol * t]
        return None if not close else (min(close)[1], measured[min(close)[1]])

    for step in range(steps + 1):
        found = near()
        if found:
            return TargetHit(t, found[0], found[1], "hit")
        above = [s for s, k in measured.items() if k >= t]
        if not above:
            s_max = max(measured, key=lambda s: (measured[s], -s))
            return TargetHit(t, s_max, measured[s_max], "unreachable")
        hi = min(above)
        lo = max([s for s in measured if s < hi], default=0.0)
        r_lo, r_hi = math.sqrt(measured.get(lo, 0.0)), math.sqrt(measured[hi])
        guess = lo + (hi - lo) * (math.sqrt(t) - r_lo) / (r_hi - r_lo) if r_hi > r_lo else (lo + hi) / 2
        margin = 0.1 * (hi - lo)
        if step == steps:
            break
        s_next = min(max(guess, lo + margin), hi - margin)
        if s_next in measured:  # the bracket is down to float resolution: it cannot shrink any more
            break
        measure(s_next)
    best = min(measured, key=lambda s: (abs(measured[s] - t), s))
    return TargetHit(t, best, measured[best], "closest")


def match_cost(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    editors: Sequence[Editor],
    start: Sequence[float],
    neutral: NeutralText,
    targets: Sequence[float] = TARGETS,
    tol: float = KL_TOL,
    steps: int = 4,
    val_items: list | None = None,
    task: Task | str = "truthfulqa-mc",
    log: Callable[[str], None] = lambda s: None,
    progress: Callable[[str], None] | None = None,
) -> list[Choice]:
    """The matched-cost choice: per target, the editor and strength whose fluency cost hits it.

    Each candidate editor (e.g. one of ITI's head counts) is searched with :func:`match_targets`
    (``start``: the method's grid); its measured points become its :attr:`~hpredit.editors.Editor.kl_curve`.
    With more than one candidate reaching a target, the best validation score on ``val_items``
    (the task's primary metric; ties: the first) decides; with one, no validation scoring is needed.

    Returns:
        One :class:`Choice` per target, in order (``status`` as :class:`TargetHit`; ``tried``:
        ``[{strength, k, kl}]``; ``editor`` None when the target is unreachable for every candidate,
        ``strength``/``kl`` then the largest cost reached).
    """
    the_task = get_task(task) if isinstance(task, str) else task
    tried: list[dict] = []
    per_editor: list[list[TargetHit]] = []
    for ed in editors:
        k = len(getattr(ed, "heads", [])) or None

        def measured(strengths: list[float], kls: list[float], k: int | None = k) -> list[float]:
            for s, kl in zip(strengths, kls):
                log(f"strength {s:.4g}{f' K={k}' if k else ''} KL {kl:.4f}")
            return kls

        def cost(s: float, ed: Editor = ed) -> float:
            if progress is not None:
                progress(f"strength {s:.4g}: KL")
            return measured([s], [fluency_with(model, neutral, ed, s)["kl"]])[0]

        def costs(strengths: list[float], ed: Editor = ed) -> list[float]:
            if progress is not None:
                progress(f"strength {', '.join(f'{s:.4g}' for s in strengths)}: KL")
            return measured(strengths, [c["kl"] for c in fluency_at(model, neutral, ed, strengths)])

        hits, points = match_targets(cost, targets, start, tol, steps, costs=costs)
        ed.kl_curve = KLCurve.from_points(points, neutral_note(neutral))
        tried += [{"strength": s, "k": k, "kl": kl} for s, kl in points]
        per_editor.append(hits)
    choices: list[Choice] = []
    for i, target in enumerate(check_kl_targets(targets)):
        reached = [(ed, hits[i]) for ed, hits in zip(editors, per_editor) if hits[i].reached]
        val = None
        if not reached:
            far = max((hits[i] for hits in per_editor), key=lambda h: h.kl)
            choices.append(Choice(None, far.strength, far.kl, tried, far.target, far.status))
            log(f"target KL {target}: unreachable (largest cost reached {far.kl:.4f} at strength {far.strength:.4g})")
            continue
        ed, hit = reached[0]
        if len(reached) > 1 and val_items:
            together = [Variant(e, h.strength) for e, h in reached]
            scores = [
                metrics[the_task.primary] for metrics, _ in the_task.score_variants(model, tok, val_items, together)
            ]
            best = max(range(len(reached)), key=lambda j: (scores[j], -j))
            (ed, hit), val = reached[best], scores[best]
        choices.append(Choice(ed, hit.strength, hit.kl, tried, hit.target, hit.status, val))
        log(f"target KL {target}: strength {hit.strength:.4g} (KL {hit.kl:.4f}, {hit.status})")
    return choices


def neutral_note(neutral: NeutralText) -> str:
    """What a strength → KL curve was measured on (its ``text``)."""
    return (
        "KL(unedited ‖ edited) per token on the model's greedy continuations of "
        f"hpredit.evaluation.side_effects.NEUTRAL_PROMPTS ({int(neutral.scored.sum())} tokens), scope all"
    )
