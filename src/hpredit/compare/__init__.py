"""One harness for every method: fit on train, choose strength on validation, report on test.

Rooms: :mod:`.methods` (the registry: how each method is fitted), :mod:`.strength` (the strength
search under a fluency-cost cap), :mod:`.harness` (per seed: collect, fit, choose, measure; merge),
:mod:`.report` (markdown table, figure, results.json).
"""

from .harness import PROTOCOLS, check_compare_args, compare, merge
from .methods import METHODS, Method, SeedFits
from .report import figure, markdown_table, summarise_matched, write_results
from .strength import KL_TOL, TARGETS, TargetHit, choose_strength, match_cost, match_targets

__all__ = [
    "KL_TOL",
    "METHODS",
    "PROTOCOLS",
    "TARGETS",
    "TargetHit",
    "Method",
    "SeedFits",
    "check_compare_args",
    "choose_strength",
    "compare",
    "figure",
    "markdown_table",
    "match_cost",
    "match_targets",
    "merge",
    "summarise_matched",
    "write_results",
]
