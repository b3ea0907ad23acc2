"""What the commands print: tables built from the library's results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

__all__ = ["accuracy_table", "side_by_side_table", "strength_line"]


def accuracy_table(probe_accuracy: Mapping[int, float], edited: Sequence[int], title: str) -> Table:
    """Each layer's validation probe accuracy, the edited layers marked."""
    table = Table(title=title)
    table.add_column("layer", justify="right")
    table.add_column("val probe acc", justify="right")
    table.add_column("edited", justify="center")
    for layer, acc in sorted(probe_accuracy.items()):
        table.add_row(str(layer), f"{acc:.3f}", "●" if layer in edited else "")
    return table


def side_by_side_table(result: Any) -> Table:
    """A :class:`hpredit.pipeline.SideBySide`: each prompt, its unedited and its edited continuation."""
    ed = result.editor
    kl = getattr(result, "kl", None)
    strength = result.strength if kl is None else f"{result.strength:.4g} (from KL {kl:g})"
    title = f"{ed.method.upper()} layers {ed.layers}, strength {strength}"
    for other, s in getattr(result, "also", ()):  # applied after it, in this order
        title += f", then {other.method.upper()} layers {other.layers}, strength {s:g}"
    title += f", scope {result.scope}"
    table = Table(title=title, show_lines=True)
    for column in ("prompt", "unedited", "edited"):
        table.add_column(column)
    for row in result.rows:
        table.add_row(*row)
    return table


def strength_line(choice: Any) -> str:
    """What a :class:`hpredit.results.StrengthChoice` found, in one line (as ``summary.json`` says it)."""
    s = f"strength {choice.strength:.4g}"
    if choice.status is None:  # grid
        if choice.over_kl_cap:
            return f"{s}: no strength tried was under the KL cap {choice.kl_cap:g}; the lowest-KL one was taken"
        return f"{s}: the best validation score under the KL cap {choice.kl_cap:g}"
    kl, cap = choice.kl, choice.kl_cap
    if choice.status == "hit":
        return f"{s}: KL {kl:.4f}, the cap {cap:g} within ± {100 * choice.kl_tol:g} %"
    if choice.status == "closest":
        return (
            f"{s}: KL {kl:.4f}, {100 * (kl - cap) / cap:+.0f} % off the cap {cap:g} (closest: the search ran out "
            f"of steps before ± {100 * choice.kl_tol:g} %)"
        )
    return f"{s}: KL {kl:.4f}, the largest cost reached: the cap {cap:g} is unreachable"
