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
    check_count,
    check_kl_cap,
    check_kl_targets,
    check_kl_tol,
    check_limit,
    check_seed,
    check_store_dtype,
    check_unique,
    named,
    not_for_protocol,
)
from ..data import ContrastivePairs, split_questions
from ..editors import Editor
from ..errors import HpreditError
from ..evaluation.side_effects import NeutralText, neutral_text, norm_drift
from ..evaluation.tasks import Task, get_task, mean_metrics
from ..models import fingerprint
from ..preflight import check_model, check_out
from ..results import CompareResult, Provenance
from .methods import METHODS, SeedFits
from .report import summarise_matched, write_results
from .strength import KL_TOL, TARGETS, choose_strength, fluency_with, match_cost

__all__ = ["GRID_DEFAULTS", "PROTOCOLS", "STEPS", "check_compare_args", "compare", "merge", "resolve_search"]

#: How a comparison chooses each method's strength (see the module's docstring).
PROTOCOLS = ("matched", "grid")


#: The grid protocol's defaults (``kl_cap``, ``max_doublings``, ``refine``) and the matched one's
#: search budget (``steps``; its targets and tolerance are :data:`TARGETS` and :data:`KL_TOL`).
GRID_DEFAULTS: dict[str, float | int] = {"kl_cap": 0.5, "max_doublings": 3, "refine": 0}
STEPS = 4
#: Which protocol each search option belongs to: given under the other one it is refused (never ignored).
_ONLY = {
    "kl_cap": "grid",
    "max_doublings": "grid",
    "refine": "grid",
    "targets": "matched",
    "kl_tol": "matched",
    "steps": "matched",
}


def resolve_search(
    protocol: str,
    kl_cap: float | None = None,
    max_doublings: int | None = None,
    refine: int | None = None,
    targets: Sequence[float] | None = None,
    kl_tol: float | None = None,
    steps: int | None = None,
) -> dict:
    """The strength search's settings under ``protocol``: each given value checked, an option of the
    other protocol refused (None: not given), the protocol's defaults filled in; the other
    protocol's options are None."""
    if protocol not in PROTOCOLS:
        raise HpreditError(f"unknown {named('protocol')} {protocol!r}: use {' or '.join(PROTOCOLS)}")
    given = {
        "kl_cap": None if kl_cap is None else check_kl_cap(kl_cap),
        "max_doublings": None if max_doublings is None else check_count(max_doublings, "max_doublings", 0),
        "refine": None if refine is None else check_count(refine, "refine", 0),
        "targets": None if targets is None else tuple(check_kl_targets(targets)),
        "kl_tol": None if kl_tol is None else check_kl_tol(kl_tol),
        "steps": None if steps is None else check_count(steps, "steps", 0),
    }
    for option, only in _ONLY.items():
        if given[option] is not None and only != protocol:
            raise HpreditError(not_for_protocol(option, protocol, only, "comparison"))
    defaults: dict = (
        dict(GRID_DEFAULTS) if protocol == "grid" else {"targets": TARGETS, "kl_tol": KL_TOL, "steps": STEPS}
    )
    return {o: (given[o] if given[o] is not None else defaults.get(o)) for o in _ONLY}


def check_compare_args(
    methods: Sequence[str],
    seeds: Sequence[int],
    kl_cap: float | None = None,
    limit: int | None = None,
    refine: int | None = None,
    task: str = "truthfulqa-mc",
    protocol: str = "matched",
    targets: Sequence[float] | None = None,
    kl_tol: float | None = None,
    steps: int | None = None,
    max_doublings: int | None = None,
) -> Task:
    """Refuse unknown methods, tasks or protocols, no seeds, a non-positive cap or limit, a negative
    refine, bad KL targets or tolerance, and a search option of the other protocol
    (:func:`resolve_search`); the task."""
    resolve_search(protocol, kl_cap, max_doublings, refine, targets, kl_tol, steps)
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
    """What every method of a comparison shares: the model, the task, the neutral text and the search rules."""

    model: nn.Module
    tok: PreTrainedTokenizerBase
    task: Task
    neutral: NeutralText
    kl_cap: float | None  #: grid (None under matched)
    max_doublings: int | None  #: grid
    refine: int | None  #: grid
    log: Callable[[str], None]
    progress: bool
    protocol: str = "matched"
    targets: tuple[float, ...] = TARGETS  #: matched
    kl_tol: float = KL_TOL  #: matched
    steps: int = STEPS  #: matched


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
    """One method of one seed under the run's protocol: its rows of the results."""
    if run.protocol == "grid":
        return [_run_method_grid(run, name, split, stores, shared, grid)]
    return _run_method_matched(run, name, split, stores, shared, grid)


def _run_method_grid(
    run: _Run, name: str, split: _SeedSplit, stores, shared: SeedFits, grid: Sequence[float] | None
) -> dict:
    """Fit one method, choose its setting on val, and measure it on test: one row of the results.

    With ``run.progress``, a bar says which step runs (fit, each strength's KL and val score, test).
    """
    t0 = time.time()
    with _step_bar(f"seed {split.seed} {name}", run.progress) as step:
        pick = _fit_and_choose(run, name, split, stores, shared, grid, step)
        chosen, strength = pick["editor"], pick["strength"]
        step(f"test {run.task.primary} (strength {strength})")
        test, items, cost, drift = _measure(run, split.test, chosen, strength)
    row = {
        "seed": split.seed,
        "method": name,
        "strength": strength,
        "layers": sorted(chosen.layers) if chosen else [],
        "heads": [list(h) for h in getattr(chosen, "heads", [])],
        "test": test,
        "test_items": items,
        "kl": cost["kl"],
        "ppl": cost["ppl"],
        "ppl_unedited": cost["ppl_unedited"],
        "norm_drift": drift,
        "over_kl_cap": pick["over_kl_cap"],
        "validation": pick["tried"],
        "config": dataclasses.asdict(chosen.config) if chosen else None,
        "seconds": round(time.time() - t0, 1),
    }
    shown = " ".join(f"{k} {test[k]:.4f}" for k in run.task.metrics if test.get(k) is not None)
    run.log(
        f"seed {split.seed} {name}: test {shown} KL {cost['kl']:.4f} ppl {cost['ppl']:.2f} "
        f"(strength {strength}, layers {row['layers']})"
    )
    return row


def _fit_and_choose(
    run: _Run, name: str, split: _SeedSplit, stores, shared: SeedFits, grid: Sequence[float] | None, step
) -> dict:
    """Fit the method (rank 0) and choose its strength on val under the KL cap: the method's own grid
    grows toward the cap (``run.max_doublings``, ``run.refine``); a given ``grid`` is tried as is.
    ``none`` (nothing to fit) is the unedited model at strength 0."""
    method = METHODS[name]
    fit = method.fit
    if fit is None:
        return {"editor": None, "strength": 0.0, "over_kl_cap": False, "tried": []}
    return choose_strength(
        run.model,
        run.tok,
        distributed.on_main(lambda: fit(stores, run.model, shared), f"fitting {name}"),
        grid or method.strengths,
        split.val,
        run.neutral,
        cast(float, run.kl_cap),
        0 if grid else cast(int, run.max_doublings),
        log=lambda text: run.log(f"seed {split.seed} {name}: {text}"),
        task=run.task,
        refine=0 if grid else cast(int, run.refine),
        progress=lambda what: step(f"strength search, {what}"),
    )


def _run_method_matched(
    run: _Run, name: str, split: _SeedSplit, stores, shared: SeedFits, grid: Sequence[float] | None
) -> list[dict]:
    """Fit one method, find its strength at each target cost (the KL search; val scores only to pick
    among several candidate editors), measure each on test: one row per target (``none``: one row)."""
    t0 = time.time()
    method = METHODS[name]
    rows: list[dict] = []
    with _step_bar(f"seed {split.seed} {name}", run.progress) as step:
        if method.fit is None:
            step(f"test {run.task.primary} (unedited)")
            unedited = {"target": None, "editor": None, "strength": 0.0, "status": "unedited", "val": None}
            measured: list[tuple[dict, dict | None, list[float] | None, dict, dict]] = [
                (unedited, *_measure(run, split.test, None, 0.0))
            ]
        else:
            fit = method.fit
            editors = distributed.on_main(lambda: fit(stores, run.model, shared), f"fitting {name}")
            choices = match_cost(
                run.model,
                run.tok,
                editors,
                grid or method.strengths,
                run.neutral,
                run.targets,
                run.kl_tol,
                run.steps,
                split.val,
                run.task,
                log=lambda text: run.log(f"seed {split.seed} {name}: {text}"),
                progress=lambda what: step(f"KL search, {what}"),
            )
            measured = []
            for c in choices:
                if c["editor"] is None:
                    measured.append((c, None, None, {"kl": c["kl"]}, {}))
                    continue
                step(f"test {run.task.primary} at KL {c['target']} (strength {c['strength']:.4g})")
                measured.append((c, *_measure(run, split.test, c["editor"], c["strength"])))
    for c, test, items, cost, drift in measured:
        chosen = c["editor"]
        rows.append(
            {
                "seed": split.seed,
                "method": name,
                "target": c["target"],
                "status": c["status"],
                **({} if c["target"] is None else {"kl_miss": (cost["kl"] - c["target"]) / c["target"]}),
                "strength": c["strength"],
                "layers": sorted(chosen.layers) if chosen else [],
                "heads": [list(h) for h in getattr(chosen, "heads", [])],
                "test": test,
                "test_items": items,
                "kl": cost["kl"],
                "ppl": cost.get("ppl"),
                "ppl_unedited": cost.get("ppl_unedited"),
                "norm_drift": drift,
                "val": c["val"],
                "validation": c.get("tried", []),
                "config": dataclasses.asdict(chosen.config) if chosen else None,
                "seconds": round(time.time() - t0, 1),
            }
        )
        if test is not None:
            shown = " ".join(f"{k} {test[k]:.4f}" for k in run.task.metrics if test.get(k) is not None)
            at = "unedited" if c["target"] is None else f"target KL {c['target']}"
            run.log(f"seed {split.seed} {name} ({at}): test {shown} KL {cost['kl']:.4f} (strength {c['strength']:.4g})")
    return rows


def _measure(
    run: _Run, items: list, editor: Editor | None, strength: float
) -> tuple[dict, list[float] | None, dict, dict]:
    """On test: the task's metrics, each item's primary metric (None where the task has none), the
    fluency cost on neutral text and the norm drift (none unedited)."""
    model = run.model
    if editor is None:
        test, per_item = run.task.score_items(model, run.tok, items)
    else:
        with editor.attach(model, strength=strength, scope="all"):
            test, per_item = run.task.score_items(model, run.tok, items)
    cost = fluency_with(model, run.neutral, editor, strength)
    if editor is None:
        return test, per_item, cost, {}
    drift = norm_drift(model, run.neutral, lambda: editor.attach(model, strength=strength, scope="all"))
    return test, per_item, cost, drift


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
    protocol: str = "matched",
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
    search = resolve_search(protocol, kl_cap, max_doublings, refine, targets, kl_tol, steps)
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
    run = _Run(
        model,
        tok,
        the_task,
        neutral,
        search["kl_cap"],
        search["max_doublings"],
        search["refine"],
        log,
        progress,
        protocol,
        *((search["targets"], search["kl_tol"], search["steps"]) if protocol == "matched" else ()),
    )
    runs, splits = [], []
    for seed in seeds:
        seed_runs, split_row = _run_seed(run, methods, items, seed, limit, store_dtype, strengths or {})
        runs += seed_runs
        splits.append(split_row)
    setting = _setting(model, the_task, data, methods, seeds, search["kl_cap"], search["refine"], limit, neutral)
    if protocol == "matched":
        setting.update(
            protocol="matched", targets=list(run.targets), kl_tol=run.kl_tol, steps=run.steps, kl_cap=None, refine=None
        )
    result = CompareResult(
        provenance, setting, runs, splits, _summary(setting, runs, methods), round(time.time() - started, 1)
    )
    if out is not None and distributed.is_main():
        write_results(result, Path(out))
    return result


def _model(model, tok, task: Task, data, dtype: str, device, device_map) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A loaded model as given, or one named: its config and the task's data source checked before it loads."""
    if isinstance(model, nn.Module):
        if tok is None:
            raise HpreditError("pass the tokenizer together with a loaded model")
        return model, tok
    from ..models import load_model

    check_model(model, device, device_map)
    task.check_source(data)
    return load_model(model, dtype=dtype, device=device, device_map=device_map)


def _run_seed(
    run: _Run, methods: Sequence[str], items: list, seed: int, limit: int | None, store_dtype, strengths: dict
) -> tuple[list[dict], dict]:
    """One split seed: split the groups → collect once → fit, choose and measure every method;
    the method rows and the split's row."""
    groups = sorted({run.task.group(it) for it in items})
    split = _SeedSplit.make(run.task, items, groups, seed, limit, run.tok)
    stores = _collect(run.model, run.tok, methods, split, store_dtype, run.progress, run.log)
    shared = SeedFits()
    rows = [row for name in methods for row in _run_method(run, name, split, stores, shared, strengths.get(name))]
    return rows, {
        "seed": seed,
        "split": split.record,
        "val_questions": len(split.val),
        "test_questions": len(split.test),
    }


def _setting(model, task: Task, data, methods, seeds, kl_cap: float | None, refine: int | None, limit, neutral) -> dict:
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
        "kl_cap": kl_cap,
        "refine": refine,
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
    if len({r.setting.get("protocol", "grid") for r in typed}) > 1:
        raise HpreditError("cannot merge: the results were made with different protocols (matched and grid)")
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
    """The summary of either protocol (``setting`` says which, and the task's metrics)."""
    metrics = list(setting.get("metrics", ["mc1", "mc2", "mc3"]))
    if setting.get("protocol", "grid") == "matched":
        return summarise_matched(runs, methods, metrics, setting.get("primary", "mc2"), setting["targets"])
    return _summarise(runs, methods, metrics, setting.get("primary", "mc2"))


def _summarise(runs: list[dict], methods: Sequence[str], metrics: Sequence[str], primary: str = "mc2") -> dict:
    """Per method: mean and std over seeds of each metric (with one seed and per-item values, the
    primary metric's per-item bootstrap CI as ``ci``)."""
    from .report import item_ci

    summary = {}
    for name in methods:
        rows = [r for r in runs if r.get("method") == name]
        entry = mean_metrics([{**{k: r["test"].get(k) for k in metrics}, "kl": r["kl"], "ppl": r["ppl"]} for r in rows])
        entry["strengths"] = [r["strength"] for r in rows]
        if len(rows) == 1 and rows[0].get("test_items"):
            entry[primary]["ci"] = item_ci(rows[0]["test_items"])
        summary[name] = entry
    return summary
