"""What the commands print: tables built from the library's results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

__all__ = ["accuracy_table", "side_by_side_table"]


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
    title = f"{ed.method.upper()} layers {ed.layers}, strength {result.strength}, scope {result.scope}"
    table = Table(title=title, show_lines=True)
    for column in ("prompt", "unedited", "edited"):
        table.add_column(column)
    for row in result.rows:
        table.add_row(*row)
    return table
