"""The strength search: each setting's fluency cost first, then the task's metric on validation
for those under the KL cap; the grid grows or shrinks toward the cap and can be refined by bisection."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..editors import Editor
from ..evaluation.side_effects import NeutralText, fluency_cost
from ..evaluation.tasks import Task, get_task

__all__ = ["choose_strength", "fluency_with", "score_with"]


def score_with(
    model: nn.Module, tok: PreTrainedTokenizerBase, task: Task, items: list, editor: Editor | None, strength: float
) -> dict:
    """The task's metrics on ``items`` with ``editor`` attached at ``strength`` (none: unedited)."""
    if editor is None:
        return task.score(model, tok, items)
    with editor.attach(model, strength=strength, scope="all"):
        return task.score(model, tok, items)


def fluency_with(model: nn.Module, neutral: NeutralText, editor: Editor | None, strength: float) -> dict[str, float]:
    """The fluency cost (KL, perplexities on neutral text) with ``editor`` attached at ``strength``."""
    if editor is None:
        return fluency_cost(model, neutral)
    with editor.attach(model, strength=strength, scope="all"):
        return fluency_cost(model, neutral)


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
        key = self.task.primary
        if self.progress is not None:
            self.progress(f"strength {s}: KL")
        cost = fluency_with(self.model, self.neutral, ed, s)
        if self.progress is not None and cost["kl"] <= self.kl_cap:
            self.progress(f"strength {s}: val {key}")
        val = score_with(self.model, self.tok, self.task, self.val_items, ed, s) if cost["kl"] <= self.kl_cap else None
        k = len(getattr(ed, "heads", [])) or None
        self.tried.append({"strength": s, "k": k, "kl": cost["kl"], "val": val})
        self.editors.append(ed)
        self.log(
            f"strength {s}{f' K={k}' if k else ''} KL {cost['kl']:.4f} "
            + (f"val {key} {val[key]:.4f}" if val else f"over the cap {self.kl_cap}")
        )
        return val is not None

    def grid(self, ed: Editor, grid: list[float], max_doublings: int, max_halvings: int) -> list[dict]:
        """The grid, doubled past its top while still under the cap (``max_doublings`` times at
        most), halved below its bottom while all is over it (``max_halvings`` times); the rows of ``ed``."""
        under = [self.attempt(ed, s) for s in grid]
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
) -> dict:
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
        ``{"editor", "strength", "over_kl_cap", "tried": [{strength, k, kl, val}]}``.
    """
    search = _Search(
        model, tok, get_task(task) if isinstance(task, str) else task, val_items, neutral, kl_cap, log, progress
    )
    for ed in editors:
        halvings = max_doublings if max_halvings is None else max_halvings
        mine = search.grid(ed, list(grid), max_doublings, halvings)
        search.refine(ed, mine, refine)
    best = search.best()
    return {
        "editor": search.editors[best],
        "strength": search.tried[best]["strength"],
        "over_kl_cap": all(t["val"] is None for t in search.tried),
        "tried": search.tried,
    }
