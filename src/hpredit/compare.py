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
from .data import load_truthfulqa, split_questions, truthfulqa_pairs
from .editors import CAAEditor, Editor, HPREditor, ITIEditor, NormRestoreEditor
from .errors import HpreditError
from .evaluation.side_effects import fluency_cost, neutral_text, norm_drift
from .evaluation.truthfulqa import score_truthfulqa_mc
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


def _mean_metrics(scores) -> dict[str, float]:
    rows = [q.metrics() for q in scores.questions]
    return {k: float(np.mean([r[k] for r in rows])) for k in ("mc1", "mc2", "mc3")}


def _score(model, tok, questions, editor: Editor | None, strength: float) -> dict[str, float]:
    if editor is None:
        return _mean_metrics(score_truthfulqa_mc(model, tok, questions))
    with editor.attach(model, strength=strength, scope="all"):
        return _mean_metrics(score_truthfulqa_mc(model, tok, questions))


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
    val_questions: list,
    neutral,
    kl_cap: float,
    max_doublings: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Choose an editor (e.g. one of ITI's head counts) and strength on the validation questions.

    Each setting's fluency cost (KL on ``neutral`` text) is measured first; among those under
    ``kl_cap`` the best validation MC2 wins (ties: the weaker strength). While the grid's largest
    strength is still under the cap it is doubled, at most ``max_doublings`` times, so that no
    method stops short of the cap. When no setting qualifies, the lowest-KL one is taken and
    flagged. Returns ``{"editor", "strength", "over_kl_cap", "tried": [{strength, k, kl, val}]}``.
    """
    grid = list(grid)
    candidates = [(ed, s) for ed in editors for s in grid]
    tried, chosen, extra = [], [], 0
    while candidates:
        ed, s = candidates.pop(0)
        cost = _fluency(model, neutral, ed, s)
        if cost["kl"] <= kl_cap and s == grid[-1] and extra < max_doublings:
            candidates.insert(0, (ed, 2 * s))
            grid.append(2 * s)
            extra += 1
        val = _score(model, tok, val_questions, ed, s) if cost["kl"] <= kl_cap else None
        k = len(getattr(ed, "heads", [])) or None
        tried.append({"strength": s, "k": k, "kl": cost["kl"], "val": val})
        chosen.append(ed)
        log(f"strength {s}{f' K={k}' if k else ''} KL {cost['kl']:.4f} "
            + (f"val MC2 {val['mc2']:.4f}" if val else f"over the cap {kl_cap}"))
    ok = [i for i, t in enumerate(tried) if t["val"] is not None]
    if ok:
        best = max(ok, key=lambda i: (tried[i]["val"]["mc2"], -tried[i]["strength"]))
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
    out: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict:
    """Run the comparison; returns (and with ``out`` writes) the results.

    ``limit`` keeps the first N questions of each split (quick runs). ``kl_cap``: the largest
    fluency cost (nats/token on neutral text) a strength may have to be chosen; when none qualifies
    the weakest setting is taken and flagged. Each method's grid is doubled beyond its largest
    value (at most ``max_doublings`` times) while that value is still under the cap, so no method
    is stopped short of the cap. ``strengths`` overrides the grids (then tried as given).
    """
    if task != "truthfulqa-mc":
        raise HpreditError(f"unknown task {task!r}: compare supports truthfulqa-mc")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise HpreditError(f"unknown method(s) {unknown or list(methods)}: choose from {', '.join(METHODS)}")
    if limit is not None and limit <= 0:
        raise HpreditError(f"--limit must be positive, got {limit}")
    if not seeds:
        raise HpreditError("give at least one split seed")
    if not (kl_cap > 0):
        raise HpreditError(f"--kl-cap must be positive, got {kl_cap}")
    questions = load_truthfulqa(data)
    fp = fingerprint(model)
    started = time.time()
    log("generating neutral text for the fluency cost …")
    neutral = neutral_text(model, tok)
    runs = []
    for seed in seeds:
        split = split_questions(len(questions), seed)
        keep = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)
        val_q = [questions[i] for i in keep(split.val)]
        test_q = [questions[i] for i in keep(split.test)]
        allowed = set(keep(split.train)) | {q.index for q in val_q}
        pairs = truthfulqa_pairs(split="train+val", seed=seed, questions=questions)
        pairs.pairs = [p for p in pairs.pairs if p.group in allowed]
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
                                       log=lambda text, name=name: log(f"seed {seed} {name}: {text}"))
                chosen_ed, chosen_s, flagged, tried = pick["editor"], pick["strength"], pick["over_kl_cap"], pick["tried"]
            test = _score(model, tok, test_q, chosen_ed, chosen_s)
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
            log(f"seed {seed} {name}: test MC1 {test['mc1']:.4f} MC2 {test['mc2']:.4f} MC3 {test['mc3']:.4f} "
                f"KL {cost['kl']:.4f} ppl {cost['ppl']:.2f} (strength {chosen_s}, layers {row['layers']})")
        split_record = {"seed": seed, "train": split.train, "val": split.val, "test": split.test}
        runs.append({"seed": seed, "split": split_record, "val_questions": len(val_q), "test_questions": len(test_q)})
    result = {
        "command": "hpredit " + " ".join(sys.argv[1:]) if sys.argv and "hpredit" in sys.argv[0] else None,
        "hpredit_version": __version__,
        "torch_version": torch.__version__,
        "model": fp.to_dict(),
        "task": task,
        "methods": {m: METHODS[m].note for m in methods},
        "seeds": list(seeds),
        "kl_cap": kl_cap,
        "limit": limit,
        "neutral_text": "the model's own greedy continuations of hpredit.evaluation.side_effects.NEUTRAL_PROMPTS "
                        f"({int(neutral.scored.sum())} tokens)",
        "runs": runs,
        "summary": _summarise(runs, methods),
        "seconds": round(time.time() - started, 1),
    }
    if out is not None:
        write_results(result, Path(out))
    return result


def merge(results: Sequence[dict], methods: Sequence[str] | None = None) -> dict:
    """Combine results run for different seeds (e.g. in parallel processes), keeping ``methods``
    (default: those of the first result); every result must hold them all."""
    if not results:
        raise HpreditError("nothing to merge")
    methods = list(methods or results[0]["methods"])
    if any(not set(methods) <= set(r["methods"]) or r["model"] != results[0]["model"] for r in results):
        raise HpreditError("cannot merge: every result needs the same model and the methods " + ", ".join(methods))
    merged = dict(results[0])
    merged["methods"] = {m: METHODS[m].note for m in methods}
    latest: dict[tuple, dict] = {}  # a later result overrides an earlier one for the same seed and method
    for r in results:
        for row in r["runs"]:
            key = (row["seed"], row.get("method", "split"))
            if key[1] in (*methods, "split"):
                latest[key] = row
    merged["runs"] = list(latest.values())
    merged["seeds"] = sorted({s for r in results for s in r["seeds"]})
    merged["seconds"] = round(sum(r["seconds"] for r in results), 1)
    merged["summary"] = _summarise(merged["runs"], methods)
    return merged


def _summarise(runs: list[dict], methods: Sequence[str]) -> dict:
    summary = {}
    for name in methods:
        rows = [r for r in runs if r.get("method") == name]
        entry = {}
        for key, get in (("mc1", lambda r: r["test"]["mc1"]), ("mc2", lambda r: r["test"]["mc2"]),
                         ("mc3", lambda r: r["test"]["mc3"]), ("kl", lambda r: r["kl"]), ("ppl", lambda r: r["ppl"])):
            vals = np.array([get(r) for r in rows], dtype=float)
            entry[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        entry["strengths"] = [r["strength"] for r in rows]
        summary[name] = entry
    return summary


def markdown_table(result: dict) -> str:
    """The summary as a markdown table (mean ± std over seeds)."""
    lines = ["| method | MC1 | MC2 | MC3 | KL (nats/token) | perplexity | strengths |",
             "|---|---|---|---|---|---|---|"]
    for name, e in result["summary"].items():
        cell = lambda k, f=".4f": f"{e[k]['mean']:{f}} ± {e[k]['std']:{f}}"  # noqa: E731
        lines.append(f"| {name} | {cell('mc1')} | {cell('mc2')} | {cell('mc3')} | {cell('kl')} | {cell('ppl', '.2f')} | "
                     f"{', '.join(str(s) for s in e['strengths'])} |")
    return "\n".join(lines)


def _figure(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, e in result["summary"].items():
        ax.errorbar(e["kl"]["mean"], e["mc2"]["mean"], xerr=e["kl"]["std"], yerr=e["mc2"]["std"], fmt="o", capsize=3,
                    label=name)
    ax.set_xlabel("fluency cost: KL(unedited ‖ edited) on neutral text, nats/token")
    ax.set_ylabel("TruthfulQA MC2 (test)")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_title(f"{result['model']['name']}, seeds {result['seeds']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(result: dict, out: Path) -> None:
    """Write results.json, table.md and (with matplotlib) mc2_vs_kl.png to ``out`` atomically."""
    with atomic_directory(out) as tmp:
        (tmp / "results.json").write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
        (tmp / "table.md").write_text(markdown_table(result) + "\n")
        _figure(result, tmp / "mc2_vs_kl.png")


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
