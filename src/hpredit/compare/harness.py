"""The harness: per split seed, collect once, fit every method, choose its strength on validation,
report it on test; and merging results run in several processes."""

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
from .._version import __version__
from ..activations import ActivationStore, collect_activations
from ..checks import check_seed, check_unique
from ..data import ContrastivePairs, split_questions
from ..editors import Editor
from ..errors import HpreditError
from ..evaluation.side_effects import NeutralText, neutral_text, norm_drift
from ..evaluation.tasks import Task, get_task, mean_metrics
from ..models import fingerprint
from ..provenance import command_line, machine, versions
from .methods import METHODS, SeedFits
from .report import write_results
from .strength import choose_strength, fluency_with, score_with

__all__ = ["check_compare_args", "compare", "merge"]


def check_compare_args(
    methods: Sequence[str],
    seeds: Sequence[int],
    kl_cap: float,
    limit: int | None,
    refine: int = 0,
    task: str = "truthfulqa-mc",
) -> Task:
    """Refuse unknown methods or tasks, no seeds, a non-positive cap or limit, a negative refine; the task."""
    the_task = get_task(task)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise HpreditError(f"unknown method(s) {unknown or list(methods)}: choose from {', '.join(METHODS)}")
    if limit is not None and (isinstance(limit, bool) or limit <= 0):
        raise HpreditError(f"--limit must be positive, got {limit}")
    if not seeds:
        raise HpreditError("give at least one split seed")
    check_unique(methods, "--methods")
    check_unique([check_seed(s, "each of --seeds") for s in seeds], "--seeds")
    if not (kl_cap > 0) or kl_cap == float("inf"):
        raise HpreditError(f"--kl-cap must be positive and finite, got {kl_cap}")
    if refine < 0:
        raise HpreditError(f"--refine must be 0 or more, got {refine}")
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
    kl_cap: float
    max_doublings: int
    refine: int
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
) -> dict:
    """Fit one method, choose its setting on val, and measure it on test: one row of the results.

    With ``run.progress``, a bar says which step runs (fit, each strength's KL and val score, test).
    """
    m, model, task, neutral = METHODS[name], run.model, run.task, run.neutral
    t0 = time.time()
    chosen: Editor | None = None
    strength, flagged, tried = 0.0, False, []
    with _step_bar(f"seed {split.seed} {name}", run.progress) as step:
        fit = m.fit
        if fit is not None:
            pick = choose_strength(
                model,
                run.tok,
                distributed.on_main(lambda: fit(stores, model, shared), f"fitting {name}"),
                grid or m.strengths,
                split.val,
                neutral,
                run.kl_cap,
                0 if grid else run.max_doublings,
                log=lambda text: run.log(f"seed {split.seed} {name}: {text}"),
                task=task,
                refine=0 if grid else run.refine,
                progress=lambda what: step(f"strength search, {what}"),
            )
            chosen, strength, flagged, tried = pick["editor"], pick["strength"], pick["over_kl_cap"], pick["tried"]
        step(f"test {task.primary} (strength {strength})")
        test = score_with(model, run.tok, task, split.test, chosen, strength)
        cost = fluency_with(model, neutral, chosen, strength)
        drift = (
            norm_drift(model, neutral, lambda: chosen.attach(model, strength=strength, scope="all"))
            if chosen is not None
            else {}
        )
    row = {
        "seed": split.seed,
        "method": name,
        "strength": strength,
        "layers": sorted(chosen.layers) if chosen else [],
        "heads": [list(h) for h in getattr(chosen, "heads", [])],
        "test": test,
        "kl": cost["kl"],
        "ppl": cost["ppl"],
        "ppl_unedited": cost["ppl_unedited"],
        "norm_drift": drift,
        "over_kl_cap": flagged,
        "validation": tried,
        "config": dataclasses.asdict(chosen.config) if chosen else None,
        "seconds": round(time.time() - t0, 1),
    }
    shown = " ".join(f"{k} {test[k]:.4f}" for k in task.metrics if test.get(k) is not None)
    run.log(
        f"seed {split.seed} {name}: test {shown} KL {cost['kl']:.4f} ppl {cost['ppl']:.2f} "
        f"(strength {strength}, layers {row['layers']})"
    )
    return row


def compare(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    methods: Sequence[str] = ("none", "hpr", "caa", "caa-norm", "iti"),
    seeds: Sequence[int] = (0, 1, 2),
    task: str = "truthfulqa-mc",
    data: str | Path | None = None,
    kl_cap: float = 0.5,
    limit: int | None = None,
    strengths: dict[str, Sequence[float]] | None = None,
    max_doublings: int = 3,
    refine: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    store_dtype: str | torch.dtype | None = None,
) -> dict:
    """Fit every method on the same train split, choose its strength on val, report it on test.

    For each split seed the task's groups are split 40/10/50; activations are collected once
    (residual stream, and attention heads for ITI); each method is fitted on the train+val pairs,
    its strength chosen on val by the task's primary metric under the fluency-cost cap (see
    :func:`~hpredit.compare.choose_strength`), then measured on test: task metrics, KL and
    perplexity on neutral text, norm drift.

    Args:
        model, tok: a loaded causal LM and its tokenizer.
        methods: names from :data:`~hpredit.compare.METHODS` (``none`` is the unedited model).
        seeds: split seeds; the summary gives mean ± std over them.
        task: a task name from :func:`hpredit.evaluation.tasks.task_names`; ``data`` a local file for it.
        kl_cap: the largest fluency cost (nats/token on neutral text) a chosen strength may have;
            when none qualifies the weakest setting is taken and flagged.
        limit: keep the first N groups of each split (quick runs).
        strengths: per-method grids tried as given (no doubling or refining).
        max_doublings: how often a grid may double past its top (or halve below its bottom)
            while it is entirely under (over) the cap.
        refine: bisection steps toward the cap.
        out: write ``results.json``, ``table.md`` and a figure there atomically.
        progress, log: progress bars while collecting; where progress lines go.
        store_dtype: the activation store's type (``"auto"``, ``"float16"``, …; None: the default).

    Returns:
        The results: ``runs`` (one row per seed and method, plus each seed's split), ``summary``
        (per method, mean and std of each metric over seeds), and the run's provenance.

    Example:
        >>> result = compare(model, tok, methods=["none", "caa"], seeds=[0], data=csv, limit=2,
        ...                  strengths={"caa": (1.0,)}, progress=False, log=lambda s: None)
        >>> sorted(result["summary"])
        ['caa', 'none']
    """
    the_task = check_compare_args(methods, seeds, kl_cap, limit, refine, task)
    items = the_task.load(data)
    groups = sorted({the_task.group(it) for it in items})
    started = time.time()
    if not distributed.is_main():  # under data parallelism rank 0 speaks for all
        log, progress = (lambda s: None), False
    log("generating neutral text for the fluency cost …")
    neutral = neutral_text(model, tok)
    run = _Run(model, tok, the_task, neutral, kl_cap, max_doublings, refine, log, progress)
    runs = []
    for seed in seeds:
        split = _SeedSplit.make(the_task, items, groups, seed, limit, tok)
        stores = _collect(model, tok, methods, split, store_dtype, progress, log)
        shared = SeedFits()
        for name in methods:
            runs.append(_run_method(run, name, split, stores, shared, (strengths or {}).get(name)))
        runs.append(
            {"seed": seed, "split": split.record, "val_questions": len(split.val), "test_questions": len(split.test)}
        )
    result = {
        "command": command_line(),
        "hpredit_version": __version__,
        "torch_version": torch.__version__,
        "versions": versions(),
        "machine": machine(),
        "model": fingerprint(model).to_dict(),
        "task": task,
        "task_note": the_task.note,
        "data": str(data) if data else the_task.data_note,
        "metrics": list(the_task.metrics),
        "primary": the_task.primary,
        "methods": {m: METHODS[m].note for m in methods},
        "seeds": list(seeds),
        "kl_cap": kl_cap,
        "refine": refine,
        "limit": limit,
        "neutral_text": "the model's own greedy continuations of hpredit.evaluation.side_effects.NEUTRAL_PROMPTS "
        f"({int(neutral.scored.sum())} tokens)",
        "runs": runs,
        "summary": _summarise(runs, methods, the_task.metrics),
        "seconds": round(time.time() - started, 1),
    }
    if out is not None and distributed.is_main():
        write_results(result, Path(out))
    return result


def merge(results: Sequence[dict], methods: Sequence[str] | None = None) -> dict:
    """Combine results run in several processes (other seeds, other methods) of one model and task.

    ``methods`` (default: every method found, in order of appearance) must each have a run for
    every seed found; a later result overrides an earlier one for the same seed and method.
    """
    if not results:
        raise HpreditError("nothing to merge")
    first = results[0]
    if any(
        r["model"] != first["model"] or r.get("task", "truthfulqa-mc") != first.get("task", "truthfulqa-mc")
        for r in results
    ):
        raise HpreditError("cannot merge: the results are of different models or tasks")
    found = list(dict.fromkeys(m for r in results for m in r["methods"]))
    methods = list(methods or found)
    latest: dict[tuple, dict] = {}
    for r in results:
        for row in r["runs"]:
            latest[(row["seed"], row.get("method", "split"))] = row
    seeds = sorted({s for r in results for s in r["seeds"]})
    missing = [f"{m} seed {s}" for m in methods for s in seeds if (s, m) not in latest]
    if missing:
        raise HpreditError("cannot merge: no run for " + ", ".join(missing))
    merged = dict(first)
    merged["methods"] = {m: METHODS[m].note for m in methods}
    merged["runs"] = [row for (s, m), row in latest.items() if m in (*methods, "split")]
    merged["seeds"] = seeds
    merged["seconds"] = round(sum(r["seconds"] for r in results), 1)
    merged["summary"] = _summarise(merged["runs"], methods, list(first.get("metrics", ["mc1", "mc2", "mc3"])))
    return merged


def _summarise(runs: list[dict], methods: Sequence[str], metrics: Sequence[str]) -> dict:
    summary = {}
    for name in methods:
        rows = [r for r in runs if r.get("method") == name]
        entry = mean_metrics([{**{k: r["test"].get(k) for k in metrics}, "kl": r["kl"], "ppl": r["ppl"]} for r in rows])
        entry["strengths"] = [r["strength"] for r in rows]
        summary[name] = entry
    return summary
