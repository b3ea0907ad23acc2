"""The harness: per split seed, collect once, fit every method, choose its strength, report it on
test; and merging results run in several processes.

Two protocols choose the strength: ``matched`` (the default) finds, for each target fluency cost,
the strength whose KL on neutral text hits it and reports every method at each target;
``grid`` (the published numbers) takes the best validation score among a grid's strengths under
the KL cap, one point per method.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
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
from ..data import ContrastivePairs, split_questions
from ..editors import Editor
from ..errors import HpreditError
from ..evaluation.side_effects import EditProfile, neutral_text, norm_drift
from ..evaluation.tasks import Task, get_task
from ..models import fingerprint, load_model
from ..preflight import check_model, check_out, loaded_model_given
from ..results import CompareResult, CompareRow, Provenance
from .methods import METHODS, SeedFits
from .protocols import DEFAULT_PROTOCOL, Choice, Protocol, SearchContext, protocol_of, resolve_search, write_results
from .strength import fluency_with

__all__ = ["check_compare_args", "compare", "merge"]


def check_compare_args(
    methods: Sequence[str],
    seeds: Sequence[int],
    kl_cap: float | None = None,
    limit: int | None = None,
    refine: int | None = None,
    task: str = "truthfulqa-mc",
    protocol: str = DEFAULT_PROTOCOL,
    targets: Sequence[float] | None = None,
    kl_tol: float | None = None,
    steps: int | None = None,
    max_doublings: int | None = None,
) -> Task:
    """Refuse unknown methods, tasks or protocols, no seeds, a non-positive cap or limit, a negative
    refine, bad KL targets or tolerance, and a search option of the other protocol
    (:func:`~hpredit.compare.protocols.resolve_search`); the task."""
    _search(protocol, kl_cap, max_doublings, refine, targets, kl_tol, steps)
    the_task = get_task(task)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise HpreditError(f"unknown method(s) {unknown or list(methods)}: choose from {', '.join(METHODS)}")
    check_limit(limit)
    if not seeds:
        raise HpreditError(f"give at least one split seed ({named('seeds')})")
    check_unique(methods, named("methods"))
    check_unique([check_seed(seed, f"each of {named('seeds')}") for seed in seeds], named("seeds"))
    return the_task


def _search(protocol: str, kl_cap, max_doublings, refine, targets, kl_tol, steps) -> Protocol:
    return resolve_search(
        protocol,
        kl_cap=kl_cap,
        max_doublings=max_doublings,
        refine=refine,
        targets=targets,
        kl_tol=kl_tol,
        steps=steps,
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


def _run_method(
    run: _Run, name: str, split: _SeedSplit, stores, shared: SeedFits, grid: Sequence[float] | None
) -> list[dict]:
    """Fit one method, choose its strengths under the run's protocol, measure each on test: one row
    per point it is reported at (``none``: the unedited model)."""
    t0 = time.time()
    method = METHODS[name]
    with _step_bar(f"seed {split.seed} {name}", run.progress) as step:
        if method.fit is None:
            choices = run.protocol.unedited()
        else:
            fit = method.fit
            editors = distributed.on_main(lambda: fit(stores, run.ctx.model, shared), f"fitting {name}")
            choices = run.protocol.choose(
                run.ctx,
                editors,
                grid or method.strengths,
                split.val,
                grid is not None,
                log=lambda text: run.log(f"seed {split.seed} {name}: {text}"),
                progress=step,
            )
        measured: list[tuple[Choice, _Measured | None]] = []
        for c in choices:
            if c.editor is None and c.status not in ("unedited", None):  # nothing reached this target
                measured.append((c, None))
                continue
            at = "unedited" if c.editor is None else f"strength {c.strength:.4g}"
            step(f"test {run.ctx.task.primary}" + (f" at KL {c.target}" if c.target is not None else "") + f" ({at})")
            measured.append((c, _measure(run, split.test, c.editor, c.strength)))
    rows = [_row(split.seed, name, c, m, round(time.time() - t0, 1)).to_json() for c, m in measured]
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


def _measure(run: _Run, items: list, editor: Editor | None, strength: float) -> _Measured:
    """The task on ``items`` with ``editor`` at ``strength`` (None: unedited), and its side effects."""
    model, tok, task, neutral = run.ctx.model, run.ctx.tok, run.ctx.task, run.ctx.neutral
    if editor is None:
        test, per_item = task.score_items(model, tok, items)
        return _Measured(test, per_item, fluency_with(model, neutral, None, strength), {}, None)
    profile = EditProfile()
    with editor.attach(model, strength=strength, scope="all", observe=profile):
        test, per_item = task.score_items(model, tok, items)
    cost = fluency_with(model, neutral, editor, strength)
    drift = norm_drift(model, neutral, lambda: editor.attach(model, strength=strength, scope="all"))
    return _Measured(test, per_item, cost, drift, profile.summary())


def compare(
    model: nn.Module | str | Path | None,
    tok: PreTrainedTokenizerBase | None = None,
    methods: Sequence[str] = ("none", "hpr", "caa", "caa-norm", "iti"),
    seeds: Sequence[int] = (0, 1, 2),
    task: str = "truthfulqa-mc",
    data: str | Path | None = None,
    kl_cap: float | None = None,
    limit: int | None = None,
    strengths: dict[str, Sequence[float]] | None = None,
    max_doublings: int | None = None,
    refine: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    store_dtype: str | torch.dtype | None = None,
    *,
    dtype: str = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
    force: bool = False,
    command: str | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    targets: Sequence[float] | None = None,
    kl_tol: float | None = None,
    steps: int | None = None,
) -> CompareResult:
    """Fit every method on the same train split, choose its strength, report it on test.

    For each split seed the task's groups are split 40/10/50; activations are collected once
    (residual stream, and attention heads for ITI); each method is fitted on the train+val pairs.
    With ``protocol="matched"`` (the default) each method is measured at each of the ``targets``
    fluency costs: the strength whose KL on neutral text is within ``kl_tol`` (relative) of the
    target is found by a bracketing search (:func:`~hpredit.compare.match_cost`, at most ``steps``
    measurements per target after the method's grid), then measured on test; a target a method
    cannot reach is reported with the largest cost it reached. With ``protocol="grid"`` (the
    published numbers) its strength is chosen on val by the task's primary metric under the
    fluency-cost cap (:func:`~hpredit.compare.choose_strength`). Either way, on test: task metrics,
    KL and perplexity on neutral text, norm drift.

    Args:
        model, tok: a loaded causal LM and its tokenizer, or a hub id / local directory / None (the
            embedded default) with ``tok`` None: checked, then loaded with ``dtype``, ``device``,
            ``device_map`` (see :func:`hpredit.load_model`).
        methods: names from :data:`~hpredit.compare.METHODS` (``none`` is the unedited model).
        seeds: split seeds; the summary gives mean ± std over them.
        task: a task name from :func:`hpredit.evaluation.tasks.task_names`; ``data`` a local file for it.
        kl_cap: (grid; default 0.5) the largest fluency cost (nats/token on neutral text) a chosen
            strength may have; when none qualifies the weakest setting is taken and flagged.
        limit: keep the first N groups of each split (quick runs).
        strengths: per-method grids: (grid) tried as given, no doubling or refining; (matched) the
            search's warm start.
        max_doublings: (grid; default 3) how often a grid may double past its top (or halve below
            its bottom) while it is entirely under (over) the cap.
        refine: (grid; default 0) bisection steps toward the cap.
        protocol, targets, kl_tol, steps: the matched-cost search (see above; defaults
            :data:`~hpredit.compare.TARGETS`, :data:`~hpredit.compare.KL_TOL`, 4).

        The search options of one protocol are refused under the other (None: not given, the
        protocol's default): a grid's ``kl_cap``, ``max_doublings`` or ``refine`` with
        ``protocol="matched"`` (for a cost to reach, give ``targets``), ``targets``, ``kl_tol`` or
        ``steps`` with ``protocol="grid"``.
        out: write ``results.json``, ``table.md`` and a figure there atomically (a non-empty
            directory is refused unless ``force``).
        progress, log: progress bars while collecting; where progress lines go.
        store_dtype: the activation store's type (``"auto"``, ``"float16"``, …; None: the default).
        command: the command line to record (default: this process's).

    Returns:
        A :class:`~hpredit.results.CompareResult`: ``runs`` (one row per seed and method, and
        target when matched), ``splits`` (each seed's split), ``summary`` (grid: per method, mean
        and std of each metric over seeds; matched: see :func:`~hpredit.compare.summarise_matched`),
        and the run's provenance.

    Example:
        >>> result = compare(model, tok, methods=["none", "caa"], seeds=[0], data=csv, limit=2,
        ...                  strengths={"caa": (1.0,)}, progress=False, log=lambda s: None)
        >>> sorted(result.summary)  # matched cost (the default): per target, and HPR vs the best other
        ['baseline', 'paired', 'targets']
    """
    the_task = check_compare_args(
        methods, seeds, kl_cap, limit, refine, task, protocol, targets, kl_tol, steps, max_doublings
    )
    search = _search(protocol, kl_cap, max_doublings, refine, targets, kl_tol, steps)
    if store_dtype is not None:
        check_store_dtype(store_dtype)
    if out is not None:
        check_out(out, force, (data, model))
    model, tok = _model(model, tok, the_task, data, dtype, device, device_map)
    provenance = Provenance.now(command)
    items = the_task.load(data)
    started = time.time()
    if not distributed.is_main():  # under data parallelism rank 0 speaks for all
        log, progress = (lambda s: None), False
    log("generating neutral text for the fluency cost …")
    neutral = neutral_text(model, tok)
    run = _Run(SearchContext(model, tok, the_task, neutral), search, log, progress)
    runs, splits = [], []
    for seed in seeds:
        seed_runs, split_row = _run_seed(run, methods, items, seed, limit, store_dtype, strengths or {})
        runs += seed_runs
        splits.append(split_row)
    setting = {**_setting(model, the_task, data, methods, seeds, limit, neutral), **search.setting()}
    result = CompareResult(
        provenance, setting, runs, splits, _summary(setting, runs, methods), round(time.time() - started, 1)
    )
    if out is not None and distributed.is_main():
        write_results(result, Path(out))
    return result


def _model(model, tok, task: Task, data, dtype: str, device, device_map) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A loaded model as given, or one named: its config and the task's data source checked before it loads."""
    if loaded_model_given(model, tok):
        return model, tok
    check_model(model, device, device_map)
    task.check_source(data)
    return load_model(model, dtype=dtype, device=device, device_map=device_map)


def _run_seed(
    run: _Run, methods: Sequence[str], items: list, seed: int, limit: int | None, store_dtype, strengths: dict
) -> tuple[list[dict], dict]:
    """One split seed: split the groups → collect once → fit, choose and measure every method;
    the method rows and the split's row."""
    ctx = run.ctx
    groups = sorted({ctx.task.group(it) for it in items})
    split = _SeedSplit.make(ctx.task, items, groups, seed, limit, ctx.tok)
    stores = _collect(ctx.model, ctx.tok, methods, split, store_dtype, run.progress, run.log)
    shared = SeedFits()
    rows = [row for name in methods for row in _run_method(run, name, split, stores, shared, strengths.get(name))]
    return rows, {
        "seed": seed,
        "split": split.record,
        "val_questions": len(split.val),
        "test_questions": len(split.test),
    }


def _setting(model, task: Task, data, methods, seeds, limit, neutral) -> dict:
    """What a comparison was run with (the top of ``results.json`` besides provenance and rows)."""
    return {
        "model": fingerprint(model).to_dict(),
        "task": task.name,
        "task_note": task.note,
        "data": str(data) if data else task.data_note,
        "metrics": list(task.metrics),
        "primary": task.primary,
        "methods": {m: METHODS[m].note for m in methods},
        "seeds": list(seeds),
        "kl_cap": None,  # the protocol's entries (matched: kl_cap and refine None) replace these two
        "refine": None,
        "limit": limit,
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
