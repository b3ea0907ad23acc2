"""One harness for every method: fit on train, choose strength on validation, report on test.

For each split seed: collect activations once (residual stream and, for ITI, attention heads),
fit every method on the same train pairs, choose each method's strength (and ITI's head count) on
the validation questions by MC2 among the settings whose fluency cost (KL on neutral text) stays
under a cap, then score the test questions (MC1/MC2/MC3), the fluency cost and the norm drift.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .activations import collect_activations
from .artifacts import atomic_directory
from .data import split_questions
from .editors import CAAEditor, Editor, HPREditor, ITIEditor, NormRestoreEditor
from .errors import HpreditError
from .evaluation.side_effects import fluency_cost, neutral_text, norm_drift
from .evaluation.tasks import Task, get_task, mean_metrics
from .models import fingerprint, num_attention_heads

__all__ = ["METHODS", "Method", "choose_strength", "compare", "markdown_table", "merge", "write_results"]


@dataclass(frozen=True)
class Method:
    """How to fit one method from collected stores, and the strengths tried on validation."""

    name: str
    site: str | None  #: activation site it fits on (None: no editor)
    fit: Callable[[dict, nn.Module], list[Editor]] | None  #: candidate editors (e.g. ITI's K values)
    strengths: tuple[float, ...] = (1.0,)
    note: str = ""


def _hpr(**overrides):
    def fit(stores, model):
        return [HPREditor.fit(stores["residual"], progress=False, **overrides)]

    return fit


def _hpr_inference_variant(**overrides):
    """An ablation that changes only inference (gate, fixed angle): training is the same as HPR's
    (the probes train independently of the angle predictor), so reuse HPR's fit of this seed."""

    def fit(stores, model):
        if "_hpr" not in stores:
            stores["_hpr"] = HPREditor.fit(stores["residual"], progress=False)
        base = stores["_hpr"]
        config = dataclasses.replace(base.config, **overrides)
        keep_mlp = config.fixed_angle is None
        return [HPREditor(config, base.layers, base.model_fingerprint, base.fitted_layers, base.probe,
                          base.weights if keep_mlp else [], base.biases if keep_mlp else [], dict(base.metrics))]

    return fit


def _additive(cls):
    def fit(stores, model):
        return [cls.fit(stores["residual"], progress=False)]

    return fit


def _iti(stores, model):
    acts = stores["heads"]
    H = num_attention_heads(model)
    k0 = max(1, round(48 * len(acts.layers) * H / 1024))
    return [ITIEditor.fit(acts, num_attention_heads=H, num_heads=k) for k in (k0,)]


METHODS: dict[str, Method] = {
    "none": Method("none", None, None, note="the unedited model"),
    "hpr": Method("hpr", "residual", _hpr_inference_variant(), (0.25, 0.5, 1.0),
                  "HPR as published: gated rotation by the predicted angle"),
    "hpr-no-gate": Method("hpr-no-gate", "residual", _hpr_inference_variant(gate=False), (0.25, 0.5, 1.0),
                          "ablation: every token rotated"),
    "hpr-fixed-angle": Method("hpr-fixed-angle", "residual", _hpr_inference_variant(fixed_angle=0.5),
                              (0.125, 0.25, 0.5), "ablation: a fixed 0.5 rad (×strength) instead of the angle predictor"),
    "hpr-bias": Method("hpr-bias", "residual", _hpr(probe_bias=True), (0.25, 0.5, 1.0),
                       "ablation: probe with a bias (affine reflection)"),
    "caa": Method("caa", "residual", _additive(CAAEditor), (0.5, 1.0, 2.0), "x + αv, v = mean difference"),
    "caa-norm": Method("caa-norm", "residual", _additive(NormRestoreEditor), (0.5, 1.0, 2.0),
                       "x + αv with the norm restored"),
    "iti": Method("iti", "heads", _iti, (0.05, 0.1, 0.25), "ITI: top-K heads shifted by α·σ·v (α = 15 × strength)"),
}


def _score(model, tok, task: Task, items: list, editor: Editor | None, strength: float) -> dict:
    if editor is None:
        return task.score(model, tok, items)
    with editor.attach(model, strength=strength, scope="all"):
        return task.score(model, tok, items)


def _fluency(model, neutral, editor: Editor | None, strength: float) -> dict[str, float]:
    if editor is None:
        return fluency_cost(model, neutral)
    with editor.attach(model, strength=strength, scope="all"):
        return fluency_cost(model, neutral)


def choose_strength(
    model: nn.Module,
    tok,
    editors: Sequence[Editor],
    grid: Sequence[float],
    val_items: list,
    neutral,
    kl_cap: float,
    max_doublings: int = 0,
    log: Callable[[str], None] = lambda s: None,
    task: Task | str = "truthfulqa-mc",
    refine: int = 0,
) -> dict:
    """Choose an editor (e.g. one of ITI's head counts) and strength on the validation items.

    Each setting's fluency cost (KL on ``neutral`` text) is measured first; among those under
    ``kl_cap`` the best validation score of the task's primary metric (MC2 for TruthfulQA) wins
    (ties: the weaker strength). While the grid's largest strength is still under the cap it is
    doubled, and while every strength is over it the smallest is halved, at most
    ``max_doublings`` times each way, so that no method stops short of the cap or is judged only
    above it. ``refine`` bisection steps then narrow the gap between the strongest setting under the
    cap and the weakest above it, so that a coarse grid does not favour a method whose grid point
    happens to land near the cap. When no setting qualifies, the lowest-KL one is taken and
    flagged. Returns ``{"editor", "strength", "over_kl_cap", "tried": [{strength, k, kl, val}]}``.
    """
    task = get_task(task) if isinstance(task, str) else task
    key = task.primary
    grid = list(grid)
    tried, chosen = [], []

    def attempt(ed: Editor, s: float) -> bool:
        cost = _fluency(model, neutral, ed, s)
        val = _score(model, tok, task, val_items, ed, s) if cost["kl"] <= kl_cap else None
        k = len(getattr(ed, "heads", [])) or None
        tried.append({"strength": s, "k": k, "kl": cost["kl"], "val": val})
        chosen.append(ed)
        log(f"strength {s}{f' K={k}' if k else ''} KL {cost['kl']:.4f} "
            + (f"val {key} {val[key]:.4f}" if val else f"over the cap {kl_cap}"))
        return val is not None

    for ed in editors:
        under = [attempt(ed, s) for s in grid]
        s, n = grid[-1], 0
        while under[-1] and n < max_doublings:  # still under the cap: go stronger
            s, n = 2 * s, n + 1
            under.append(attempt(ed, s))
        s, n = grid[0], 0
        while not any(under) and n < max_doublings:  # all over the cap: go weaker
            s, n = s / 2, n + 1
            under.append(attempt(ed, s))
        mine = tried[len(tried) - len(under):]
        below = [t["strength"] for t in mine if t["val"] is not None]
        above = [t["strength"] for t in mine if t["val"] is None and below and t["strength"] > max(below)]
        if below and above:
            lo, hi = max(below), min(above)
            for _ in range(refine):  # bisect toward the cap
                mid = (lo + hi) / 2
                if attempt(ed, mid):
                    lo = mid
                else:
                    hi = mid
    ok = [i for i, t in enumerate(tried) if t["val"] is not None]
    if ok:
        best = max(ok, key=lambda i: (tried[i]["val"][key], -tried[i]["strength"]))
    else:
        best = min(range(len(tried)), key=lambda i: tried[i]["kl"])
    return {"editor": chosen[best], "strength": tried[best]["strength"], "over_kl_cap": not ok, "tried": tried}


def compare(
    model: nn.Module,
    tok,
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
) -> dict:
    """Run the comparison; returns (and with ``out`` writes) the results.

    ``task``: ``truthfulqa-mc``, ``bbq``, ``toxigen``, ``refusal`` or ``ab:NAME`` (see
    :mod:`hpredit.evaluation.tasks`); ``data`` a local file for it. The task's items are split by
    group (40/10/50, seeded); methods choose on val by the task's primary metric. ``limit`` keeps
    the first N groups of each split (quick runs). ``kl_cap``: the largest
    fluency cost (nats/token on neutral text) a strength may have to be chosen; when none qualifies
    the weakest setting is taken and flagged. Each method's grid is doubled beyond its largest
    value (at most ``max_doublings`` times) while that value is still under the cap, so no method
    is stopped short of the cap; ``refine`` bisection steps then approach the cap (see
    :func:`choose_strength`). ``strengths`` overrides the grids (then tried as given).
    """
    the_task = get_task(task)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise HpreditError(f"unknown method(s) {unknown or list(methods)}: choose from {', '.join(METHODS)}")
    if limit is not None and limit <= 0:
        raise HpreditError(f"--limit must be positive, got {limit}")
    if not seeds:
        raise HpreditError("give at least one split seed")
    if not (kl_cap > 0):
        raise HpreditError(f"--kl-cap must be positive, got {kl_cap}")
    items = the_task.load(data)
    groups = sorted({the_task.group(it) for it in items})
    fp = fingerprint(model)
    started = time.time()
    log("generating neutral text for the fluency cost …")
    neutral = neutral_text(model, tok)
    runs = []
    for seed in seeds:
        split = split_questions(len(groups), seed)
        keep = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)
        split_of = {groups[i]: name for name in ("train", "val", "test") for i in keep(getattr(split, name))}
        val_q = [it for it in items if split_of.get(the_task.group(it)) == "val"]
        test_q = [it for it in items if split_of.get(the_task.group(it)) == "test"]
        pairs = the_task.pairs(items, {g: s for g, s in split_of.items() if s != "test"}, tok)
        if not len(pairs) or not val_q or not test_q:
            raise HpreditError(f"task {task}: seed {seed} leaves no training pairs, validation or test items "
                               f"({len(pairs)} pairs, {len(val_q)} val, {len(test_q)} test): use more data or no --limit")
        sites = sorted({METHODS[m].site for m in methods if METHODS[m].site})
        stores = {}
        if sites:
            log(f"seed {seed}: collecting activations ({', '.join(sites)}) for {len(pairs)} pairs …")
            stores = collect_activations(model, tok, pairs, site=tuple(sites), progress=progress)
        for name in methods:
            m = METHODS[name]
            t0 = time.time()
            if m.fit is None:
                chosen_ed, chosen_s, flagged, tried = None, 0.0, False, []
            else:
                pick = choose_strength(model, tok, m.fit(stores, model), (strengths or {}).get(name, m.strengths), val_q,
                                       neutral, kl_cap, 0 if strengths else max_doublings,
                                       log=lambda text, name=name: log(f"seed {seed} {name}: {text}"), task=the_task,
                                       refine=0 if strengths else refine)
                chosen_ed, chosen_s, flagged, tried = pick["editor"], pick["strength"], pick["over_kl_cap"], pick["tried"]
            test = _score(model, tok, the_task, test_q, chosen_ed, chosen_s)
            cost = _fluency(model, neutral, chosen_ed, chosen_s)
            drift = (norm_drift(model, neutral, lambda: chosen_ed.attach(model, strength=chosen_s, scope="all"))
                     if chosen_ed is not None else {})
            row = {
                "seed": seed, "method": name, "strength": chosen_s,
                "layers": sorted(chosen_ed.layers) if chosen_ed else [],
                "heads": [list(h) for h in getattr(chosen_ed, "heads", [])],
                "test": test, "kl": cost["kl"], "ppl": cost["ppl"], "ppl_unedited": cost["ppl_unedited"],
                "norm_drift": drift, "over_kl_cap": flagged,
                "validation": tried,
                "config": dataclasses.asdict(chosen_ed.config) if chosen_ed else None,
                "seconds": round(time.time() - t0, 1),
            }
            runs.append(row)
            shown = " ".join(f"{k} {test[k]:.4f}" for k in the_task.metrics if test.get(k) is not None)
            log(f"seed {seed} {name}: test {shown} KL {cost['kl']:.4f} ppl {cost['ppl']:.2f} "
                f"(strength {chosen_s}, layers {row['layers']})")
        split_record = {"seed": seed, "groups": {n: [groups[i] for i in getattr(split, n)] for n in ("train", "val", "test")}}
        runs.append({"seed": seed, "split": split_record, "val_questions": len(val_q), "test_questions": len(test_q)})
    result = {
        "command": "hpredit " + " ".join(sys.argv[1:]) if sys.argv and "hpredit" in sys.argv[0] else None,
        "hpredit_version": __version__,
        "torch_version": torch.__version__,
        "model": fp.to_dict(),
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
    if out is not None:
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
    if any(r["model"] != first["model"] or r.get("task", "truthfulqa-mc") != first.get("task", "truthfulqa-mc")
           for r in results):
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
    merged["summary"] = _summarise(merged["runs"], methods, _metrics_of(first))
    return merged


def _metrics_of(result: dict) -> list[str]:
    return list(result.get("metrics", ["mc1", "mc2", "mc3"]))


def _summarise(runs: list[dict], methods: Sequence[str], metrics: Sequence[str]) -> dict:
    summary = {}
    for name in methods:
        rows = [r for r in runs if r.get("method") == name]
        entry = mean_metrics([{**{k: r["test"].get(k) for k in metrics}, "kl": r["kl"], "ppl": r["ppl"]} for r in rows])
        entry["strengths"] = [r["strength"] for r in rows]
        summary[name] = entry
    return summary


def markdown_table(result: dict) -> str:
    """The summary as a markdown table (mean ± std over seeds; – where a metric is undefined)."""
    metrics = _metrics_of(result)
    lines = ["| method | " + " | ".join(m.upper() if m.startswith("mc") else m for m in metrics)
             + " | KL (nats/token) | perplexity | strengths |", "|---" * (len(metrics) + 4) + "|"]

    def cell(e: dict, k: str, f: str = ".4f") -> str:
        v = e.get(k) or {}
        return "–" if v.get("mean") is None else f"{v['mean']:{f}} ± {v['std']:{f}}"

    for name, e in result["summary"].items():
        lines.append(f"| {name} | " + " | ".join(cell(e, m) for m in metrics)
                     + f" | {cell(e, 'kl')} | {cell(e, 'ppl', '.2f')} | {', '.join(str(s) for s in e['strengths'])} |")
    return "\n".join(lines)


def _figure(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    key = result.get("primary", "mc2")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, e in result["summary"].items():
        ax.errorbar(e["kl"]["mean"], e[key]["mean"], xerr=e["kl"]["std"], yerr=e[key]["std"], fmt="o", capsize=3,
                    label=name)
    ax.set_xlabel("fluency cost: KL(unedited ‖ edited) on neutral text, nats/token")
    ax.set_ylabel(f"{result.get('task', 'truthfulqa-mc')} {key} (test)")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_title(f"{result['model']['name']}, seeds {result['seeds']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(result: dict, out: Path) -> None:
    """Write results.json, table.md and (with matplotlib) ``<primary metric>_vs_kl.png`` to ``out`` atomically."""
    with atomic_directory(out) as tmp:
        (tmp / "results.json").write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
        (tmp / "table.md").write_text(markdown_table(result) + "\n")
        _figure(result, tmp / f"{result.get('primary', 'mc2')}_vs_kl.png")


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
