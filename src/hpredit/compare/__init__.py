"""One harness for every method: fit on train, choose strength on validation, report on test.

Rooms: :mod:`.methods` (the registry: how each method is fitted), :mod:`.strength` (the strength
searches: matched cost, best under a cap), :mod:`.protocols` (the registry of protocols, each the
typed strategy choosing strengths and reporting them; markdown table, figure, results.json),
:mod:`.harness` (per seed: collect, fit, choose, measure; merge), :mod:`.report` (each protocol's
summaries, tables and figures).
"""

from .harness import CompareConfig, compare, merge
from .methods import METHODS, Method, SeedFits
from .protocols import PROTOCOLS, Choice, Protocol, figure, markdown_table, resolve_search, write_results
from .report import summarise_matched
from .strength import KL_CAP, KL_TOL, TARGETS, TargetHit, choose_strength, match_cost, match_targets

__all__ = [
    "KL_CAP",
    "KL_TOL",
    "METHODS",
    "PROTOCOLS",
    "TARGETS",
    "Choice",
    "CompareConfig",
    "Protocol",
    "TargetHit",
    "Method",
    "SeedFits",
    "choose_strength",
    "compare",
    "figure",
    "markdown_table",
    "match_cost",
    "match_targets",
    "merge",
    "resolve_search",
    "summarise_matched",
    "write_results",
]
