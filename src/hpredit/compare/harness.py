"""The harness: per split seed, collect once, fit every method, choose its strength, report it on
test; and merging results run in several processes.

Two protocols choose the strength: ``matched`` (the default) finds, for each target fluency cost,
the strength whose KL on neutral text hits it and reports every method at each target;
``grid`` (the published numbers) takes the best validation score among a grid's strengths under
the KL cap, one point per method.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .. import distributed
from ..activations import ActivationStore, collect_activations
from ..checks import (
    check_limit,
    check_seed,
    check_store_dtype,
    check_unique,
    named,
)
from ..config import (
    FORCE_HELP,
    LIMIT_HELP,
    STORE_DTYPE_HELP,
    TASK_DATA_HELP,
    LoadOptions,
    comma_list,
    given_path,
    option,
)
from ..data import ContrastivePairs, split_questions
from ..errors import HpreditError
from ..evaluation.side_effects import EditProfile, fluency_costs, neutral_text, norm_drift
from ..evaluation.tasks import Task, get_task, task_help
from ..models import fingerprint, load_model
from ..preflight import check_model, check_out, model_and_fields
from ..results import CompareResult, CompareRow, Provenance
from ..variants import Variant
from .methods import METHODS, SeedFits
from .protocols import (
    DEFAULT_PROTOCOL,
    KL_TOL_HELP,
    PROTOCOL_HELP,
    Choice,
    Protocol,
    SearchContext,
    protocol_of,
    resolve_search,
    write_results,
)

__all__ = ["CompareConfig", "compare", "merge"]


def _methods_help() -> str:
    return f"Comma-separated, of: {', '.join(METHODS)} (docs/methods.md)."


def _methods(text: str, flag: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


@dataclass(frozen=True, kw_only=True)
class CompareConfig(LoadOptions):
    """``compare``'s settings (``hpredit compare``'s options), checked when made. The search options of
    one protocol are refused under the other (None: not given, the protocol's default)."""

    methods: tuple[str, ...] = option(("none", "hpr", "caa", "caa-norm", "iti"), _methods_help, parse=_methods)
    task: str = option("truthfulqa-mc", task_help)
    seeds: tuple[int, ...] = option(
        (0, 1, 2), "Comma-separated split seeds; mean ± std over them.", parse=comma_list(int, "integers")
    )
    protocol: str = option(DEFAULT_PROTOCOL, PROTOCOL_HELP)
    targets: tuple[float, ...] | None = option(
        None,
        "Matched cost only: comma-separated target KLs (nats/token on neutral text; default 0.1,0.25,0.5); "
        "refused with --protocol grid.",
        parse=comma_list(float, "numbers"),
    )
    kl_tol: float | None = option(None, KL_TOL_HELP)
    steps: int | None = option(
        None,
        "Matched cost only: KL measurements per target at most, after the grid (default 4); "
        "refused with --protocol grid.",
    )
    kl_cap: float | None = option(
        None,
        "Grid only: the largest fluency cost (KL nats/token on neutral text) a chosen strength may have "
        "(default 0.5). Refused with --protocol matched, which reaches given costs: give them as --targets.",
    )
    limit: int | None = option(None, LIMIT_HELP)
    refine: int | None = option(
        None,
        "Grid only: bisection steps between the strongest strength under the KL cap and the weakest over "
        "it (default 0); refused with --protocol matched.",
    )
    #: grid: how often a grid may double past its top (or halve below its bottom) while entirely under (over) the cap
    max_doublings: int | None = option(None, cli=False)
    #: per-method strength grids: (grid) tried as given, no doubling or refining; (matched) the search's warm start
    strengths: Mapping[str, Sequence[float]] | None = option(None, cli=False)
    data: str | Path | None = option(None, TASK_DATA_HELP, parse=given_path("file"))
    out: str | Path | None = option(
        None,
        "Writes results.json, table.md and a figure (task metric against KL) here.",
        flags=("--out", "-o"),
        cli_default=Path("out/compare"),
    )
    store_dtype: str = option("auto", STORE_DTYPE_HELP)
    force: bool = option(False, FORCE_HELP)

    def check(self) -> None:
        """Refuse unknown methods, tasks or protocols, no seeds, a non-positive cap or limit, a negative
        refine, bad KL targets or tolerance, and a search option of the other protocol
        (:func:`~hpredit.compare.protocols.resolve_search`)."""
        self._set("methods", tuple(self.methods))
        self._set("seeds", tuple(self.seeds))
        self.search()
        get_task(self.task)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise HpreditError(f"unknown method(s) {unknown or list(self.methods)}: choose from {', '.join(METHODS)}")
        check_limit(self.limit)
        if not self.seeds:
            raise HpreditError(f"give at least one split seed ({named('seeds')})")
        check_unique(self.methods, named("methods"))
        check_unique([check_seed(seed, f"each of {named('seeds')}") for seed in self.seeds], named("seeds"))
        check_store_dtype(self.store_dtype)

    def search(self) -> Protocol:
        """The protocol with its search options."""
        return resolve_search(
            self.protocol,
            kl_cap=self.kl_cap,
            max_doublings=self.max_doublings,
            refine=self.refine,
            targets=self.targets,
            kl_tol=self.kl_tol,
            steps=self.steps,
        )


@dataclass
class _SeedSplit:
    """One seed's split of the task's items: pairs to fit on (train and val groups), val and test items."""

    seed: int
    pairs: ContrastivePairs
    val: list
    test: list
    record: dict

    @classmethod
    def make(cls, task: Task, items: list, groups: list, seed: int, limit: int | None, tok) -> _SeedSplit:
        split = split_questions(len(groups), seed)
        keep = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)
        split_of = {groups[i]: name for name in ("train", "val", "test") for i in keep(getattr(split, name))}
        val = [it for it in items if split_of.get(task.group(it)) == "val"]
        test = [it for it in items if split_of.get(task.group(it)) == "test"]
        pairs = task.pairs(items, {g: s for g, s in split_of.items() if s != "test"}, tok)
        if not len(pairs) or not val or not test:
            raise HpreditError(
                f"task {task.name}: seed {seed} leaves no training pairs, validation or test items "
                f"({len(pairs)} pairs, {len(val)} val, {len(test)} test): use more data or no --limit"
            )
        record = {"seed": seed, "groups": {n: [groups[i] for i in getattr(split, n)] for n in ("train", "val", "test")}}
        return cls(seed, pairs, val, test, record)


def _collect(
    model, tok, methods: Sequence[str], split: _SeedSplit, store_dtype, progress: bool, log: Callable[[str], None]
) -> dict[str, ActivationStore]:
    """Activations of every site the methods fit on, in one pass."""
    sites = sorted({site for m in methods if (site := METHODS[m].site) is not None})
    if not sites:
        return {}
    log(f"seed {split.seed}: collecting activations ({', '.join(sites)}) for {len(split.pairs)} pairs …")
    kwargs = {} if store_dtype is None else {"dtype": store_dtype}
    stores = collect_activations(model, tok, split.pairs, site=tuple(sites), progress=progress, **kwargs)
    return cast(dict[str, ActivationStore], stores)  # a tuple of sites gives one store per site


@dataclass
class _Run:
    """What every method of a comparison shares: the model, the task, the neutral text and the protocol."""

    ctx: SearchContext
    protocol: Protocol
    log: Callable[[str], None]
    progress: bool


@contextmanager
def _step_bar(label: str, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A progress bar of steps; yields ``step(what)``, which names the step starting and counts it."""
    bar = tqdm(desc=f"{label}: fit", unit="step", disable=not enabled, leave=False)

    def step(what: str) -> None:
        bar.set_description(f"{label}: {what}")
        bar.update()

    try:
        yield step
    finally:
        bar.close()


def _choose_method(
    run: _Run, name: str, split: _SeedSplit, stores, shared: SeedFits, grid: Sequence[float] | None
) -> list[Choice]:
    """Fit one method and choose its strengths under the run's protocol: one choice per point it is
    reported at (``none``: the unedited model)."""
    method = METHODS[name]
    with _step_bar(f"seed {split.seed} {name}", run.progress) as step:
        if method.fit is None:
            return run.protocol.unedited()
        fit = method.fit
        editors = distributed.on_main(lambda: fit(stores, run.ctx.model, shared), f"fitting {name}")
        return run.protocol.choose(
            run.ctx,
            editors,
            grid or method.strengths,
            split.val,
            grid is not None,
            log=lambda text: run.log(f"seed {split.seed} {name}: {text}"),
            progress=step,
        )


def _measured(c: Choice) -> bool:
    """Whether a choice is measured on test: not when nothing reached its target (no editor, and
    not the unedited model's choice)."""
    return c.editor is not None or c.status in ("unedited", None)


def _run_methods(
    run: _Run, names: Sequence[str], split: _SeedSplit, stores, strengths: Mapping[str, Sequence[float]]
) -> list[dict]:
    """Every method fitted and its strengths chosen, then every chosen point of every method measured
    on test together (one widened pass per ``MAX_VARIANTS`` points: the blocks below the first edited
    one run once per text): one row per method and point. A row's ``seconds``: its method's fit
    and search, and its share of the joint measurement."""
    shared = SeedFits()
    chosen: list[tuple[str, list[Choice], float]] = []
    for name in names:
        t0 = time.time()
        choices = _choose_method(run, name, split, stores, shared, strengths.get(name))
        chosen.append((name, choices, time.time() - t0))
    todo = [c for _, choices, _ in chosen for c in choices if _measured(c)]
    t0 = time.time()
    with _step_bar(f"seed {split.seed}", run.progress) as step:
        step(f"test {run.ctx.task.primary} ({len(todo)} configurations together)")
        done = dict(zip(map(id, todo), _measure_all(run, split.test, todo)))
    share = (time.time() - t0) / max(1, len(todo))
    rows = []
    for name, choices, seconds in chosen:
        mine = sum(_measured(c) for c in choices)
        for c in choices:
            rows.append(_row(split.seed, name, c, done.get(id(c)), round(seconds + share * mine, 1)).to_json())
    for row in rows:
        if row["test"] is not None:
            _log_row(run, row)
    return rows


def _row(seed: int, name: str, c: Choice, m: _Measured | None, seconds: float) -> CompareRow:
    """One row of the results: the choice and, where the method was measured there, its measurement."""
    chosen = c.editor
    kl = m.cost["kl"] if m is not None else c.kl
    return CompareRow(
        seed=seed,
        method=name,
        strength=c.strength,
        layers=sorted(chosen.layers) if chosen else [],
        heads=[list(h) for h in getattr(chosen, "heads", [])],
        test=m.test if m else None,
        test_items=m.items if m else None,
        kl=kl,
        ppl=m.cost.get("ppl") if m else None,
        ppl_unedited=m.cost.get("ppl_unedited") if m else None,
        norm_drift=m.drift if m else {},
        profile=m.profile if m else None,
        validation=c.tried,
        config=dataclasses.asdict(chosen.config) if chosen else None,
        seconds=seconds,
        target=c.target,
        status=c.status,
        kl_miss=None if c.target is None or kl is None else (kl - c.target) / c.target,
        val=c.val,
        over_kl_cap=c.over_kl_cap,
    )


def _log_row(run: _Run, row: dict) -> None:
    test = row["test"]
    shown = " ".join(f"{k} {test[k]:.4f}" for k in run.ctx.task.metrics if test.get(k) is not None)
    if row.get("over_kl_cap") is not None:  # grid
        run.log(
            f"seed {row['seed']} {row['method']}: test {shown} KL {row['kl']:.4f} ppl {row['ppl']:.2f} "
            f"(strength {row['strength']}, layers {row['layers']})"
        )
        return
    at = "unedited" if row.get("target") is None else f"target KL {row['target']}"
    run.log(
        f"seed {row['seed']} {row['method']} ({at}): test {shown} KL {row['kl']:.4f} (strength {row['strength']:.4g})"
    )


@dataclass(frozen=True)
class _Measured:
    """One point measured on test: the task's metrics, each item's primary metric (None where the task
    has none), the fluency cost on neutral text, the norm drift and the edit's profile on the test texts
    (the last two empty and None unedited)."""

    test: dict
    items: list[float] | None
    cost: dict
    drift: dict
    profile: dict | None


def _measure_all(run: _Run, items: list, choices: Sequence[Choice]) -> list[_Measured]:
    """The task on ``items`` under each choice's editor at its strength (None: unedited), all scored
    together (:meth:`~hpredit.evaluation.tasks.Task.score_variants`), their fluency costs in one
    widened pass, and each edit's norm drift and profile."""
    model, tok, task, neutral = run.ctx.model, run.ctx.tok, run.ctx.task, run.ctx.neutral
    if not choices:
        return []
    variants = [Variant(c.editor, c.strength) for c in choices]
    profiles = [None if c.editor is None else EditProfile() for c in choices]
    scored = task.score_variants(model, tok, items, variants, observers=profiles)
    costs = fluency_costs(model, neutral, variants)
    out = []
    for c, (test, per_item), cost, profile in zip(choices, scored, costs, profiles):
        if c.editor is None or profile is None:
            out.append(_Measured(test, per_item, cost, {}, None))
            continue
        drift = norm_drift(model, neutral, functools.partial(c.editor.attach, model, strength=c.strength, scope="all"))
        out.append(_Measured(test, per_item, cost, drift, profile.summary()))
    return out


def compare(
    model: nn.Module | str | Path | None = None,
    tok: PreTrainedTokenizerBase | None = None,
    config: CompareConfig | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    command: str | None = None,
    **fields: Any,
) -> CompareResult:
    """Fit every method on the same train split, choose its strength, report it on test.

    Per split seed (40/10/50 of the task's groups) activations are collected once and every method
    is fitted on the train+val pairs; its strength is chosen by the protocol (``matched``, the
    default: the strength whose KL on neutral text hits each of ``targets``, by a bracketing search;
    ``grid``: the best validation score under ``kl_cap``); then on test: task metrics, KL and
    perplexity on neutral text, norm drift and the edit profile.

    Args:
        model, tok: a loaded causal LM and its tokenizer, or a hub id / local directory / None (the
            embedded default, or ``config.model``) with ``tok`` None: checked, then loaded with the
            config's ``dtype``, ``device``, ``device_map`` (see :func:`hpredit.load_model`).
        config: the settings (:class:`CompareConfig`; ``hpredit compare``'s defaults, but ``out``
            None writes nothing), or its fields as keywords (which also replace a ``config``'s).
        progress, log: progress bars while collecting; where progress lines go.
        command: the command line to record (default: this process's).

    Returns:
        A :class:`~hpredit.results.CompareResult`: ``runs`` (a row per seed, method and target),
        ``splits``, ``summary`` (the protocol's: :func:`~hpredit.compare.summarise_matched`) and provenance.

    Example:
        >>> result = compare(model, tok, methods=["none", "caa"], seeds=[0], data=csv, limit=2,
        ...                  strengths={"caa": (1.0,)}, progress=False, log=lambda s: None)
        >>> sorted(result.summary)  # matched cost (the default): per target, and HPR vs the best other
        ['baseline', 'paired', 'targets']
    """
    model, fields = model_and_fields(model, tok, fields)
    cfg = CompareConfig.of(config, fields)
    the_task, search = get_task(cfg.task), cfg.search()
    if cfg.out is not None:
        check_out(cfg.out, cfg.force, (cfg.data, cfg.model))
    model, tok = _model(model, tok, the_task, cfg)
    provenance = Provenance.now(command)
    items = the_task.load(cfg.data)
    started = time.time()
    if not distributed.is_main():  # under data parallelism rank 0 speaks for all
        log, progress = (lambda s: None), False
    log("generating neutral text for the fluency cost …")
    neutral = neutral_text(model, tok)
    run = _Run(SearchContext(model, tok, the_task, neutral), search, log, progress)
    per_seed = [_run_seed(run, cfg, items, seed) for seed in cfg.seeds]
    runs, splits = [row for rows, _ in per_seed for row in rows], [split for _, split in per_seed]
    setting = {**_setting(model, the_task, cfg, neutral), **search.setting()}
    result = CompareResult(
        provenance, setting, runs, splits, _summary(setting, runs, cfg.methods), round(time.time() - started, 1)
    )
    if cfg.out is not None and distributed.is_main():
        write_results(result, Path(cfg.out))
    return result


def _model(model, tok, task: Task, cfg: CompareConfig) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A loaded model as given, or the one the config names: its config and the task's data source
    checked before it loads."""
    if model is not None:
        return model, tok
    check_model(cfg.model, cfg.device, cfg.device_map)
    task.check_source(cfg.data)
    return load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map)


def _run_seed(run: _Run, cfg: CompareConfig, items: list, seed: int) -> tuple[list[dict], dict]:
    """One split seed: split the groups → collect once → fit, choose and measure every method;
    the method rows and the split's row."""
    ctx, strengths = run.ctx, cfg.strengths or {}
    groups = sorted({ctx.task.group(it) for it in items})
    split = _SeedSplit.make(ctx.task, items, groups, seed, cfg.limit, ctx.tok)
    stores = _collect(ctx.model, ctx.tok, cfg.methods, split, cfg.store_dtype, run.progress, run.log)
    rows = _run_methods(run, cfg.methods, split, stores, strengths)
    return rows, {
        "seed": seed,
        "split": split.record,
        "val_questions": len(split.val),
        "test_questions": len(split.test),
    }


def _setting(model, task: Task, cfg: CompareConfig, neutral) -> dict:
    """What a comparison was run with (the top of ``results.json`` besides provenance and rows)."""
    return {
        "model": fingerprint(model).to_dict(),
        "task": task.name,
        "task_note": task.note,
        "data": str(cfg.data) if cfg.data else task.data_note,
        "metrics": list(task.metrics),
        "primary": task.primary,
        "methods": {m: METHODS[m].note for m in cfg.methods},
        "seeds": list(cfg.seeds),
        "kl_cap": None,  # the protocol's entries (matched: kl_cap and refine None) replace these two
        "refine": None,
        "limit": cfg.limit,
        "neutral_text": "the model's own greedy continuations of hpredit.evaluation.side_effects.NEUTRAL_PROMPTS "
        f"({int(neutral.scored.sum())} tokens)",
    }


def merge(results: Sequence[CompareResult | dict], methods: Sequence[str] | None = None) -> CompareResult:
    """Combine results run in several processes (other seeds, other methods) of one model and task.

    ``methods`` (default: every method found, in order of appearance) must each have a run for
    every seed found; a later result overrides an earlier one for the same seed and method.
    Results may be :class:`~hpredit.results.CompareResult` s or ``results.json`` dicts (also of
    earlier versions).
    """
    if not results:
        raise HpreditError("nothing to merge")
    typed = [r if isinstance(r, CompareResult) else CompareResult.from_json(r) for r in results]
    first = typed[0]
    if any(
        r.setting["model"] != first.setting["model"]
        or r.setting.get("task", "truthfulqa-mc") != first.setting.get("task", "truthfulqa-mc")
        for r in typed
    ):
        raise HpreditError("cannot merge: the results are of different models or tasks")
    found = list(dict.fromkeys(m for r in typed for m in r.setting["methods"]))
    methods = list(methods or found)
    made_with = {protocol_of(r.setting).name for r in typed}
    if len(made_with) > 1:
        both = " and ".join(sorted(made_with))
        raise HpreditError(f"cannot merge: the results were made with different protocols ({both})")
    latest: dict[tuple, dict] = {(row["seed"], row["method"], row.get("target")): row for r in typed for row in r.runs}
    have = {(s, m) for s, m, _ in latest}
    split_of: dict[int, dict] = {row["seed"]: row for r in typed for row in r.splits}
    seeds = sorted({s for r in typed for s in r.setting["seeds"]})
    missing = [f"{m} seed {s}" for m in methods for s in seeds if (s, m) not in have]
    if missing:
        raise HpreditError("cannot merge: no run for " + ", ".join(missing))
    runs = [row for (s, m, _), row in latest.items() if m in methods]
    setting = {**first.setting, "methods": {m: METHODS[m].note for m in methods}, "seeds": seeds}
    return CompareResult(
        first.provenance,
        setting,
        runs,
        [split_of[s] for s in seeds if s in split_of],
        _summary(setting, runs, methods),
        round(sum(r.seconds for r in typed), 1),
    )


def _summary(setting: dict, runs: list[dict], methods: Sequence[str]) -> dict:
    """The summary by the protocol ``setting`` records (and the task's metrics)."""
    metrics = list(setting.get("metrics", ["mc1", "mc2", "mc3"]))
    return protocol_of(setting).summarise(runs, methods, metrics, setting.get("primary", "mc2"))
