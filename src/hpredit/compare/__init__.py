"""One harness for every method: fit on train, choose strength on validation, report on test.

Rooms: :mod:`.methods` (the registry: how each method is fitted), :mod:`.strength` (the strength
search under a fluency-cost cap), :mod:`.harness` (per seed: collect, fit, choose, measure; merge),
:mod:`.report` (markdown table, figure, results.json).
"""

from .harness import check_compare_args, compare, merge
from .methods import METHODS, Method, SeedFits
from .report import figure, markdown_table, write_results
from .strength import choose_strength

__all__ = [
    "METHODS",
    "Method",
    "SeedFits",
    "check_compare_args",
    "choose_strength",
    "compare",
    "figure",
    "markdown_table",
    "merge",
    "write_results",
]
