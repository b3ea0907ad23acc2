"""How a comparison chooses each method's strength: one class per protocol, behind one registry.

A protocol owns its search options (names, defaults, checks; an option of another protocol is
refused, never ignored), chooses strengths for a method's fitted candidates (typed
:class:`Choice` s, one per point the method is reported at), writes its entries of
``results.json``, and summarises, tabulates and draws its results. Everything that differs
between ``matched`` and ``grid`` is here; a third protocol is one more class registered in
:data:`PROTOCOLS`. The public report functions (:func:`markdown_table`, :func:`figure`,
:func:`write_results`) dispatch on the protocol a result was made with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..checks import check_count, check_kl_cap, check_kl_targets, check_kl_tol, named, not_for_protocol
from ..editors import Editor
from ..editors.kl_curve import KLCurve
from ..errors import HpreditError
from ..evaluation.side_effects import NeutralText
from ..evaluation.tasks import Task
from ..files import atomic_directory
from ..registry import Registry
from ..results import CompareResult, StrengthChoice, pyplot, write_json
from .report import grid_figure, grid_table, matched_figure, matched_tables, summarise_grid, summarise_matched
from .strength import KL_CAP, KL_TOL, TARGETS, Choice, choose_strength, match_cost, neutral_note

__all__ = [
    "DEFAULT_PROTOCOL",
    "PROTOCOLS",
    "Choice",
    "Grid",
    "MatchedCost",
    "Protocol",
    "figure",
    "markdown_table",
    "protocol_of",
    "resolve_search",
    "run_rule",
    "write_results",
]


@dataclass(frozen=True)
class SearchContext:
    """What every search of one comparison shares: the model, the task and the neutral text."""

    model: nn.Module
    tok: PreTrainedTokenizerBase
    task: Task
    neutral: NeutralText


class Protocol(ABC):
    """A rule choosing each method's strength. Subclasses set ``name``, ``options`` (each search
    option's default) and ``checks`` (each option's check), and implement the hooks."""

    name: ClassVar[str]
    options: ClassVar[dict[str, Any]]
    checks: ClassVar[dict[str, Callable[[Any], Any]]]
    #: an option of another protocol → this protocol's option meaning the same (its refusal says so)
    foreign_hint: ClassVar[dict[str, str]] = {}
    #: ``hpredit run``'s options of this protocol and their defaults (the main job reaches one cap)
    run_options: ClassVar[dict[str, Any]] = {}
    #: what the main job's log lines of this search are labelled
    log_label: ClassVar[str] = "search"

    def __init__(self, **settings: Any) -> None:
        self.settings = {o: settings.get(o, d) for o, d in self.options.items()}

    def __getattr__(self, option: str) -> Any:
        settings = self.__dict__.get("settings", {})
        if option in settings:
            return settings[option]
        raise AttributeError(option)

    @abstractmethod
    def choose(
        self,
        ctx: SearchContext,
        editors: Sequence[Editor],
        grid: Sequence[float],
        val_items: list,
        given_grid: bool,
        log: Callable[[str], None],
        progress: Callable[[str], None],
    ) -> list[Choice]:
        """The points a method with these fitted candidates is reported at (``grid``: its warm start or
        grid; ``given_grid``: the user gave it, to be tried as is where the protocol grows grids)."""

    def unedited(self) -> list[Choice]:
        """The points of the unedited model."""
        return [Choice(None, 0.0, status="unedited")]

    @classmethod
    @abstractmethod
    def choose_for_cap(
        cls,
        ctx: SearchContext,
        editor: Editor,
        grid: Sequence[float],
        val_items: list,
        kl_cap: float,
        options: dict[str, Any],
        log: Callable[[str], None],
        progress: Callable[[str], None],
    ) -> StrengthChoice:
        """The main job's strength for one editor and one cap (``options``: :attr:`run_options`, filled);
        the strengths measured become the editor's :attr:`~hpredit.editors.Editor.kl_curve`."""

    @abstractmethod
    def setting(self) -> dict:
        """This protocol's entries of ``results.json`` (every search option's key, None where unused)."""

    @abstractmethod
    def summarise(self, runs: list[dict], methods: Sequence[str], metrics: Sequence[str], primary: str) -> dict:
        """The summary of a result's rows."""

    @abstractmethod
    def tables(self, result: CompareResult) -> str:
        """The result as markdown."""

    @abstractmethod
    def draw(self, result: CompareResult, key: str, plt: Any, path: Path) -> None:
        """The figure of ``key`` (the primary metric) against the fluency cost, saved to ``path``."""


#: Every protocol by name (``--protocol``). Results files made before protocols were recorded are grid.
PROTOCOLS: Registry[type[Protocol]] = Registry("protocol", Protocol, classes=True)
DEFAULT_PROTOCOL = "matched"
#: ``--kl-tol``'s help, for every command that takes it.
KL_TOL_HELP = (
    f"Matched cost only: relative tolerance on each target KL (default {KL_TOL:g}: within {KL_TOL:.0%}); "
    "refused with --protocol grid."
)
#: What ``--protocol`` means, for every command that takes it.
PROTOCOL_HELP = (
    "How the strength is chosen: matched (the strength whose KL hits each target cost) or grid "
    "(the best validation score among a grid under --kl-cap: the published numbers). An option of the "
    "other protocol is refused, never ignored."
)
_LEGACY_PROTOCOL = "grid"


class MatchedCost(Protocol):
    """Each method at each target fluency cost: the strength whose KL on neutral text is within
    ``kl_tol`` (relative) of the target (:func:`~hpredit.compare.match_cost`, at most ``steps``
    measurements per target after the method's grid)."""

    name = "matched"
    options: ClassVar[dict[str, Any]] = {"targets": TARGETS, "kl_tol": KL_TOL, "steps": 4}
    checks: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "targets": lambda v: tuple(check_kl_targets(v)),
        "kl_tol": check_kl_tol,
        "steps": lambda v: check_count(v, "steps", 0),
    }
    #: a cap means a cost to reach here
    foreign_hint: ClassVar[dict[str, str]] = {"kl_cap": "targets"}

    def choose(self, ctx, editors, grid, val_items, given_grid, log, progress) -> list[Choice]:
        return match_cost(
            ctx.model,
            ctx.tok,
            editors,
            grid,
            ctx.neutral,
            self.targets,
            self.kl_tol,
            self.steps,
            val_items,
            ctx.task,
            log=log,
            progress=lambda what: progress(f"KL search, {what}"),
        )

    run_options: ClassVar[dict[str, Any]] = {"kl_tol": KL_TOL}
    log_label = "KL search"

    @classmethod
    def choose_for_cap(cls, ctx, editor, grid, val_items, kl_cap, options, log, progress) -> StrengthChoice:
        """The strength whose KL is ``kl_cap`` within ``kl_tol`` (validation is not scored); one that
        cannot reach it: the largest cost reached (``unreachable``); a search out of steps: the
        measured KL nearest the cap (``closest``)."""
        tol = options["kl_tol"]
        (hit,) = match_cost(
            ctx.model, ctx.tok, [editor], list(grid), ctx.neutral, [kl_cap], tol, log=log, progress=progress
        )
        kl = cast(float, hit.kl)  # the search measured it
        tried = [{**t, "val": None} for t in hit.tried]
        return StrengthChoice(hit.strength, kl > kl_cap * (1 + tol), tried, kl_cap, cls.name, hit.status, kl, tol)

    def setting(self) -> dict:
        return {
            "kl_cap": None,
            "refine": None,
            "protocol": self.name,
            "targets": list(self.targets),
            "kl_tol": self.kl_tol,
            "steps": self.steps,
        }

    def summarise(self, runs, methods, metrics, primary) -> dict:
        return summarise_matched(runs, methods, metrics, primary, self.targets)

    def tables(self, result: CompareResult) -> str:
        return matched_tables(result)

    def draw(self, result, key, plt, path) -> None:
        matched_figure(result, key, plt, path)


class Grid(Protocol):
    """The published numbers: the best validation score among a grid's strengths under the KL cap,
    the grid grown toward the cap (``max_doublings``) and refined by bisection (``refine``);
    one point per method (:func:`~hpredit.compare.choose_strength`)."""

    name = "grid"
    options: ClassVar[dict[str, Any]] = {"kl_cap": KL_CAP, "max_doublings": 3, "refine": 0}
    checks: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "kl_cap": check_kl_cap,
        "max_doublings": lambda v: check_count(v, "max_doublings", 0),
        "refine": lambda v: check_count(v, "refine", 0),
    }

    def choose(self, ctx, editors, grid, val_items, given_grid, log, progress) -> list[Choice]:
        choice = choose_strength(
            ctx.model,
            ctx.tok,
            editors,
            grid,
            val_items,
            ctx.neutral,
            self.kl_cap,
            0 if given_grid else self.max_doublings,
            log=log,
            task=ctx.task,
            refine=0 if given_grid else self.refine,
            progress=lambda what: progress(f"strength search, {what}"),
        )
        return [choice]

    def unedited(self) -> list[Choice]:
        return [Choice(None, 0.0, over_kl_cap=False)]

    #: the main job halves its grid while all of it is over the cap, and never doubles it past the top
    #: (``compare`` does, up to 3 times): the published main-job numbers were made so
    run_options: ClassVar[dict[str, Any]] = {"max_halvings": 3}
    run_max_doublings: ClassVar[int] = 0
    log_label = "validation"

    @classmethod
    def choose_for_cap(cls, ctx, editor, grid, val_items, kl_cap, options, log, progress) -> StrengthChoice:
        """The best validation score among the grid's strengths whose cost is under ``kl_cap``,
        halving the grid while all of it is over, at most ``max_halvings`` times."""
        pick = choose_strength(
            ctx.model,
            ctx.tok,
            [editor],
            list(grid),
            val_items,
            ctx.neutral,
            kl_cap,
            max_doublings=cls.run_max_doublings,
            log=log,
            task=ctx.task,
            progress=progress,
            max_halvings=options["max_halvings"],
        )
        points = [(t["strength"], t["kl"]) for t in pick.tried]
        editor.kl_curve = KLCurve.from_points(points, neutral_note(ctx.neutral))
        return StrengthChoice(pick.strength, bool(pick.over_kl_cap), pick.tried, kl_cap)

    def setting(self) -> dict:
        return {"kl_cap": self.kl_cap, "refine": self.refine}

    def summarise(self, runs, methods, metrics, primary) -> dict:
        return summarise_grid(runs, methods, metrics, primary)

    def tables(self, result: CompareResult) -> str:
        return grid_table(result)

    def draw(self, result, key, plt, path) -> None:
        grid_figure(result, key, plt, path)


PROTOCOLS.register(MatchedCost.name, MatchedCost)
PROTOCOLS.register(Grid.name, Grid)


def resolve_search(protocol: str = DEFAULT_PROTOCOL, **given: Any) -> Protocol:
    """The protocol named ``protocol`` with the search options given (None: not given, the
    protocol's default): every value checked first, then an option of another protocol refused,
    never ignored."""
    if protocol not in PROTOCOLS:
        raise HpreditError(f"unknown {named('protocol')} {protocol!r}: use {' or '.join(PROTOCOLS.names())}")
    owners = {o: PROTOCOLS.get(n) for n in PROTOCOLS for o in PROTOCOLS.get(n).options}
    unknown = sorted(set(given) - set(owners))
    if unknown:
        raise TypeError(f"unknown search option(s) {unknown}")
    checked = {o: owners[o].checks[o](v) for o, v in given.items() if v is not None}
    cls = PROTOCOLS.get(protocol)
    for option in checked:
        if option not in cls.options:
            hint = cls.foreign_hint.get(option)
            raise HpreditError(not_for_protocol(option, protocol, owners[option].name, "comparison", hint))
    return cls(**checked)


def run_rule(protocol: str, given: dict[str, Any], job: str = "run") -> tuple[type[Protocol], dict[str, Any]]:
    """The main job's rule named ``protocol`` and its options: those ``given`` (None: not given) kept,
    the protocol's defaults filled in; an option of another protocol refused, never ignored."""
    if protocol not in PROTOCOLS:
        raise HpreditError(f"unknown {named('protocol')} {protocol!r}: use {' or '.join(PROTOCOLS.names())}")
    cls = PROTOCOLS.get(protocol)
    for option, value in given.items():
        if value is not None and option not in cls.run_options:
            owner = next(n for n in PROTOCOLS if option in PROTOCOLS.get(n).run_options)
            raise HpreditError(not_for_protocol(option, protocol, owner, job))
    return cls, {o: d if given.get(o) is None else given[o] for o, d in cls.run_options.items()}


def protocol_of(setting: dict) -> Protocol:
    """The protocol a result was made with, with its recorded options (older files: grid)."""
    cls = PROTOCOLS.get(setting.get("protocol") or _LEGACY_PROTOCOL)
    return cls(**{o: setting[o] for o in cls.options if setting.get(o) is not None})


# --------------------------------------------------------------------------- the report


def _typed(result: CompareResult | dict) -> CompareResult:
    return result if isinstance(result, CompareResult) else CompareResult.from_json(result)


def markdown_table(result: CompareResult | dict) -> str:
    """The summary as markdown: grid, one table (mean ± std over seeds, the primary metric's 95 %
    CI in brackets where there is one); matched, one table per target cost, the paired difference
    and each method's edit profile."""
    result = _typed(result)
    return protocol_of(result.setting).tables(result)


def figure(result: CompareResult | dict, path: Path) -> bool:
    """The primary metric (test) against the fluency cost (grid: one point per method with its std;
    matched: one curve per method through its targets, with its 95 % CI as a band). Methods with
    equal results do not hide each other (nested hollow markers, each point labelled with every
    method at it). False without matplotlib."""
    plt = pyplot()  # optional: matplotlib is only installed with the plot extra
    if plt is None:
        return False
    result = _typed(result)
    protocol_of(result.setting).draw(result, result.setting.get("primary", "mc2"), plt, path)
    return True


def write_results(result: CompareResult | dict, out: Path) -> None:
    """``results.json``, ``table.md`` and the figure ``<primary>_vs_kl.png``, written whole into ``out``."""
    result = _typed(result)
    key = result.setting.get("primary", "mc2")
    with atomic_directory(out) as tmp:
        write_json(tmp / "results.json", result.to_json())
        (tmp / "table.md").write_text(markdown_table(result) + "\n")
        figure(result, tmp / f"{key}_vs_kl.png")
