"""The pieces of a comparison's report, per protocol: summaries, markdown tables, figures.

Under the matched-cost protocol there is one table per target cost (every method's metric with its
95 % CI: over seeds, or over test items with one seed), the paired difference of HPR against the
best other method (and the best of the rotation family) and each method's edit profile; the figure
has one curve per method through its targets. Which pieces a result gets is its protocol's choice
(:mod:`.protocols`, which also writes ``results.json``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..evaluation.metrics import paired_bootstrap
from ..evaluation.tasks import mean_metrics
from ..results import CompareResult
from .methods import METHODS
from .strength import KL_TOL

__all__ = [
    "grid_figure",
    "grid_table",
    "item_ci",
    "matched_figure",
    "matched_tables",
    "summarise_grid",
    "summarise_matched",
]

#: The method the paired difference is about, and the methods it is compared against: every other
#: method except the unedited model and HPR's own ablations (``hpr-…``); and, besides, the best of
#: each of these families (where one of its methods is in the comparison).
REFERENCE = "hpr"
FAMILIES = ("rotation family",)
RESAMPLES = 10_000

_MARKERS = "osD^vP*Xph<>"


# --------------------------------------------------------------------------- confidence intervals


def item_ci(values: Sequence[float], seed: int = 0) -> dict:
    """The 95 % percentile-bootstrap CI of the mean of per-item values (one seed: the spread there is)."""
    b = paired_bootstrap(values, [0.0] * len(values), RESAMPLES, seed)
    return {"low": b.low, "high": b.high, "kind": f"bootstrap over {len(values)} test items"}


def seed_ci(values: Sequence[float]) -> dict:
    """The 95 % Student-t CI of the mean over seeds (at least two values)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"low": float(v.mean()) - half, "high": float(v.mean()) + half, "kind": f"t over {len(v)} seeds"}


def _entry(rows: list[dict], metrics: Sequence[str], primary: str, seeds: int) -> dict:
    """Mean and std over the rows' seeds of each metric, KL and perplexity; the primary metric's CI."""
    done = [r for r in rows if r.get("test") is not None]
    entry: dict = mean_metrics(
        [{**{k: r["test"].get(k) for k in metrics}, "kl": r["kl"], "ppl": r["ppl"]} for r in done]
    ) or {k: {"mean": None, "std": 0.0} for k in (*metrics, "kl", "ppl")}
    entry["strengths"] = [r["strength"] for r in rows]
    entry["reached"] = len(done)
    entry["seeds"] = seeds
    entry["unreachable"] = [
        {"seed": r["seed"], "max_kl": r["kl"], "strength": r["strength"]} for r in rows if r.get("test") is None
    ]
    if any(r.get("target") is not None for r in rows):  # matched: which seeds hit the target, which missed it
        entry["hit"] = sum(r.get("status") == "hit" for r in done)
        entry["closest"] = [
            {"seed": r["seed"], "kl": r["kl"], "miss": (r["kl"] - r["target"]) / r["target"]}
            for r in done
            if r.get("status") == "closest"
        ]
    profiles = [r["profile"]["all"] for r in done if r.get("profile")]
    if profiles:
        entry["profile"] = _profile_entry(profiles)
    values = [r["test"][primary] for r in done if r["test"].get(primary) is not None]
    if len(values) > 1:
        entry[primary]["ci"] = seed_ci(values)
    elif len(done) == 1 and done[0].get("test_items"):
        entry[primary]["ci"] = item_ci(done[0]["test_items"])
    return entry


#: The edit profile's columns: (name in the table, key in a profile, its statistic, format).
PROFILE_COLUMNS = (
    ("tokens edited", "edited", None, ".3f"),
    ("angle (deg), mean", "angle_deg", "mean", ".2f"),
    ("angle (deg), spread", "angle_deg", "std", ".2f"),
    ("‖Δh‖/‖h‖", "delta_rel", "mean", ".3f"),
    ("norm change", "norm_change", "mean", "+.2e"),
)


def _profile_entry(profiles: list[dict]) -> dict:
    """Mean and std over seeds of each pooled edit-profile figure (see :data:`PROFILE_COLUMNS`)."""
    out: dict = {}
    for _, key, stat, _ in PROFILE_COLUMNS:
        values = [p[key] if stat is None else p[key][stat] for p in profiles]
        values = [v for v in values if v is not None]
        name = key if stat is None else f"{key}.{stat}"
        out[name] = {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else None
    return out


def summarise_grid(runs: list[dict], methods: Sequence[str], metrics: Sequence[str], primary: str = "mc2") -> dict:
    """The grid summary: per method, mean and std over seeds of each metric (with one seed and
    per-item values, the primary metric's per-item bootstrap CI as ``ci``)."""
    summary = {}
    for name in methods:
        rows = [r for r in runs if r.get("method") == name]
        entry = mean_metrics([{**{k: r["test"].get(k) for k in metrics}, "kl": r["kl"], "ppl": r["ppl"]} for r in rows])
        entry["strengths"] = [r["strength"] for r in rows]
        if len(rows) == 1 and rows[0].get("test_items"):
            entry[primary]["ci"] = item_ci(rows[0]["test_items"])
        summary[name] = entry
    return summary


def summarise_matched(
    runs: list[dict], methods: Sequence[str], metrics: Sequence[str], primary: str, targets: Sequence[float]
) -> dict:
    """The matched-cost summary.

    Returns:
        ``{"baseline": {method: entry}`` (methods without a target: the unedited model),
        ``"targets": {"0.25": {method: entry}}``, ``"paired": {"0.25": difference}}`` and, where the
        best of a family in :data:`FAMILIES` is not the best other method,
        ``"paired_family": {"0.25": {family: difference}}``. An entry
        holds each metric's mean and std over the seeds that reached the target (the primary
        metric also its 95 % CI), the strengths, how many seeds reached it and, for the others,
        the largest cost reached; the edit profile on test (:class:`~hpredit.evaluation.side_effects.EditProfile`,
        its figures pooled over layers, mean and std over seeds); how many hit it within the tolerance (``hit``) and the
        others (``closest``: the search's budget ran out first) with their KL and relative
        ``miss``. The difference is HPR's primary metric minus that of the best
        other method (highest mean) reaching the target on every seed: the mean over test items
        (pooled over seeds, each item paired with itself) and its 95 % percentile-bootstrap CI.
    """
    seeds = sorted({r["seed"] for r in runs})
    mine = lambda name, t: [r for r in runs if r["method"] == name and r.get("target") == t]  # noqa: E731
    baseline = {m: _entry(mine(m, None), metrics, primary, len(seeds)) for m in methods if mine(m, None)}
    by_target: dict[str, dict] = {}
    paired: dict[str, dict] = {}
    by_family: dict[str, dict[str, dict]] = {}
    for t in targets:
        key = f"{t:g}"
        by_target[key] = {m: _entry(mine(m, t), metrics, primary, len(seeds)) for m in methods if mine(m, t)}
        rows = {m: mine(m, t) for m in by_target[key]}
        paired[key] = _paired(by_target[key], rows, primary, len(seeds))
        for family in FAMILIES:
            among = [m for m in by_target[key] if m in METHODS and METHODS[m].family == family]
            if among and paired[key].get("other") not in among:
                by_family.setdefault(key, {})[family] = _paired(by_target[key], rows, primary, len(seeds), among)
    return {
        "baseline": baseline,
        "targets": by_target,
        "paired": paired,
        **({"paired_family": by_family} if by_family else {}),
    }


def _paired(
    entries: dict[str, dict], rows: dict[str, list[dict]], primary: str, seeds: int, among: list[str] | None = None
) -> dict:
    """HPR minus the best other method at one target (see :func:`summarise_matched`); with ``among``,
    the best of those methods."""

    def complete(m: str) -> bool:
        return entries[m]["reached"] == seeds and all(r.get("test_items") for r in rows[m])

    if REFERENCE not in entries:
        return {"reference": REFERENCE, "other": None, "why": "hpr is not among the methods"}
    if any(r.get("test") is not None and r.get("test_items") is None for r in rows[REFERENCE]):
        why = f"{primary} is not a mean over test items (no per-item values to pair)"
        return {"reference": REFERENCE, "other": None, "why": why}
    if not complete(REFERENCE):
        return {"reference": REFERENCE, "other": None, "why": "hpr did not reach this cost on every seed"}
    others = [m for m in (among or entries) if m != "none" and not m.startswith("hpr") and complete(m)]
    if not others:
        return {"reference": REFERENCE, "other": None, "why": "no other method reached this cost on every seed"}
    best = max(others, key=lambda m: entries[m][primary]["mean"])
    ref = {r["seed"]: r["test_items"] for r in rows[REFERENCE]}
    oth = {r["seed"]: r["test_items"] for r in rows[best]}
    a = [v for s in sorted(ref) for v in ref[s]]
    b = [v for s in sorted(ref) for v in oth[s]]
    boot = paired_bootstrap(a, b, RESAMPLES, 0)
    missed = [m for m in (REFERENCE, best) if entries[m].get("closest")]
    return {
        "reference": REFERENCE,
        "other": best,
        **boot.to_dict(),
        "items": len(a),
        **({"closest": missed} if missed else {}),  # a side not at the target within the tolerance
    }


# --------------------------------------------------------------------------- tables


def _metric_name(m: str) -> str:
    return m.upper() if m.startswith("mc") else m


def _cell(e: dict, k: str, f: str = ".4f", seeds: int = 2) -> str:
    v = e.get(k) or {}
    if v.get("mean") is None:
        return "–"
    text = f"{v['mean']:{f}}" + (f" ± {v['std']:{f}}" if seeds > 1 else "")
    ci = v.get("ci")
    return text + (f" [{ci['low']:{f}}, {ci['high']:{f}}]" if ci else "")


def grid_table(result: CompareResult) -> str:
    """The grid protocol's table: one row per method, mean ± std over seeds (the primary metric's
    95 % CI in brackets where there is one)."""
    metrics = result.metrics
    lines = [
        "| method | "
        + " | ".join(m.upper() if m.startswith("mc") else m for m in metrics)
        + " | KL (nats/token) | perplexity | strengths |",
        "|---" * (len(metrics) + 4) + "|",
    ]

    seeds = len(result.setting.get("seeds", [])) or 2

    def cell(e: dict, k: str, f: str = ".4f") -> str:
        return _cell(e, k, f, seeds)

    for name, e in result.summary.items():
        lines.append(
            f"| {name} | "
            + " | ".join(cell(e, m) for m in metrics)
            + f" | {cell(e, 'kl')} | {cell(e, 'ppl', '.2f')} | {', '.join(str(s) for s in e['strengths'])} |"
        )
    return "\n".join(lines)


def matched_tables(result: CompareResult) -> str:
    """The matched protocol's tables: per target cost, every method with its CI, the paired
    differences and the edit profiles."""
    metrics, primary = result.metrics, result.setting.get("primary", "mc2")
    seeds = len(result.setting.get("seeds", [])) or 1
    summary, tol = result.summary, result.setting.get("kl_tol", KL_TOL)
    ci_kind = "t over seeds" if seeds > 1 else "bootstrap over test items"
    head = (
        "| method | "
        + " | ".join(_metric_name(m) + (f" (95% CI, {ci_kind})" if m == primary else "") for m in metrics)
        + " | KL (nats/token) | perplexity | strengths |"
    )
    rule = "|---" * (len(metrics) + 4) + "|"
    out: list[str] = []

    def line(name: str, e: dict) -> str:
        strengths = ", ".join("–" if s is None else f"{s:.4g}" for s in e["strengths"])
        if e.get("reached", 1) == 0:
            far = max(e["unreachable"], key=lambda u: u["max_kl"])
            return (
                f"| {name} | "
                + " | ".join(["unreachable"] * len(metrics))
                + f" | largest reached {far['max_kl']:.4f} (strength {far['strength']:.4g}) | – | – |"
            )
        note = "" if e.get("reached", seeds) == e.get("seeds", seeds) else f" ({e['reached']}/{e['seeds']} seeds)"
        note += _closest_note(e.get("closest") or [], seeds)
        return (
            f"| {name}{note} | "
            + " | ".join(_cell(e, m, seeds=seeds) for m in metrics)
            + f" | {_cell(e, 'kl', seeds=seeds)} | {_cell(e, 'ppl', '.2f', seeds=seeds)} | {strengths} |"
        )

    for t, entries in summary["targets"].items():
        out += [f"**KL target {t} nats/token** (± {100 * tol:g} %)", "", head, rule]
        out += [line(f"{name} (unedited)", e) for name, e in summary.get("baseline", {}).items()]
        out += [line(name, e) for name, e in entries.items()]
        if any(e.get("closest") for e in entries.values()):
            out += [
                "",
                f"closest: no strength measured came within ± {100 * tol:g} % of the target before the search's "
                "budget (steps) ran out; such a row is at the measured KL nearest the target (its KL column), "
                "not at the target.",
            ]
        out += _paired_lines(summary, t, primary)
        out += _profile_table(entries, seeds)
        out.append("")
    return "\n".join(out).rstrip()


def _paired_lines(summary: dict, t: str, primary: str) -> list[str]:
    """HPR's paired differences at target ``t`` (against the best other method, and the best of each
    family that is not it), or why there is none, as lines."""
    p = summary["paired"].get(t) or {}
    out = _difference(p, "the best other method here", primary) if p.get("other") else []
    if not p.get("other") and p.get("why"):
        out = ["", f"no paired difference: {p['why']}"]
    for family, q in (summary.get("paired_family", {}).get(t) or {}).items():
        if q.get("other"):
            out += _difference(q, f"the best of the {family} here", primary)
    return out


def _difference(p: dict, label: str, primary: str) -> list[str]:
    lo, hi = p["ci"]
    off = f"; not at equal cost: {' and '.join(p['closest'])} closest, see above" if p.get("closest") else ""
    return [
        "",
        f"{p['reference']} − {p['other']} ({label}), {_metric_name(primary)}: "
        f"{p['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] (95% paired bootstrap over {p['items']} test items{off})",
    ]


def _profile_table(entries: dict[str, dict], seeds: int) -> list[str]:
    """The edit profile of each method at one target (pooled over its edited layers), as table lines."""
    shown = {
        name + _closest_note(e.get("closest") or [], seeds): e["profile"]
        for name, e in entries.items()
        if e.get("profile")
    }
    if not shown:
        return []
    over = "mean ± std over seeds; " if seeds > 1 else ""
    out = [
        "",
        f"Edit profile on the test texts ({over}over the changed tokens of every edited layer):",
        "",
        "| method | " + " | ".join(c[0] for c in PROFILE_COLUMNS) + " |",
        "|---" * (len(PROFILE_COLUMNS) + 1) + "|",
    ]
    for name, prof in shown.items():
        cells = []
        for _, key, stat, f in PROFILE_COLUMNS:
            v = prof.get(key if stat is None else f"{key}.{stat}")
            cells.append(
                "–" if v is None else f"{v['mean']:{f}}" + (f" ± {v['std']:{f.lstrip('+')}}" if seeds > 1 else "")
            )
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def _closest_note(closest: list[dict], seeds: int) -> str:
    """`` (closest: KL 0.14, -44 % off the target)``: a row whose search missed its target (one seed),
    or on how many seeds it did and the largest miss."""
    if not closest:
        return ""
    if len(closest) == 1 and seeds == 1:
        c = closest[0]
        return f" (closest: KL {c['kl']:.4g}, {100 * c['miss']:+.0f} % off the target)"
    worst = max(closest, key=lambda c: abs(c["miss"]))
    return f" (closest on {len(closest)}/{seeds} seeds, up to {100 * worst['miss']:+.0f} % off the target)"


def grid_figure(result: CompareResult, key: str, plt, path: Path) -> None:
    """The grid protocol's figure: one point per method (mean, with its std over seeds both ways);
    equal results do not hide each other (nested hollow markers, each point labelled with every
    method at it: "hpr = hpr-bias")."""
    points = {n: (e["kl"]["mean"], e[key]["mean"]) for n, e in result.summary.items() if e[key]["mean"] is not None}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, (x, y)) in enumerate(points.items()):
        e = result.summary[name]
        ax.errorbar(
            x,
            y,
            xerr=e["kl"]["std"],
            yerr=e[key]["std"],
            fmt=_MARKERS[i % len(_MARKERS)],
            capsize=3,
            label=name,
            markersize=max(3.5, 12.0 - 1.1 * i),
            markerfacecolor="none",
            markeredgewidth=1.4,
        )
    ax.set_xlabel("fluency cost: KL(unedited ‖ edited) on neutral text, nats/token")
    ax.set_ylabel(f"{result.setting.get('task', 'truthfulqa-mc')} {key} (test)")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_title(f"{result.setting['model']['name']}, seeds {result.setting['seeds']}")
    ax.autoscale_view()
    for xy, names in _near_groups(ax, points):
        ax.annotate(" / ".join(names), xy, xytext=(7, 4), textcoords="offset points", fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def matched_figure(result: CompareResult, key: str, plt, path: Path) -> None:
    """The matched protocol's figure: one curve per method through its targets (its 95 % CI as a
    band), the unedited model as a dashed line, the targets as dotted lines."""
    summary = result.summary
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, e in summary.get("baseline", {}).items():
        if e[key]["mean"] is not None:
            ax.axhline(e[key]["mean"], color="grey", linestyle="--", linewidth=1, label=f"{name} (unedited)")
    methods = list(dict.fromkeys(m for entries in summary["targets"].values() for m in entries))
    for i, name in enumerate(methods):
        pts = [
            (e["kl"]["mean"], e[key]["mean"], (e[key].get("ci") or {}))
            for entries in summary["targets"].values()
            if (e := entries.get(name)) and e.get("reached") and e[key]["mean"] is not None
        ]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        (ln,) = ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], label=name, markerfacecolor="none")
        if all(p[2] for p in pts):
            ax.fill_between(
                xs, [p[2]["low"] for p in pts], [p[2]["high"] for p in pts], color=ln.get_color(), alpha=0.15
            )
    for t in result.setting.get("targets", []):
        ax.axvline(t, color="black", linestyle=":", linewidth=0.8)
    ax.set_xlabel("fluency cost: KL(unedited ‖ edited) on neutral text, nats/token (targets dotted)")
    ax.set_ylabel(f"{result.setting.get('task', 'truthfulqa-mc')} {key} (test)")
    seeds = result.setting["seeds"]
    band = "95% CI over seeds" if len(seeds) > 1 else "95% bootstrap CI over test items"
    ax.set_title(f"{result.setting['model']['name']}, seeds {seeds}, matched cost\nband: {band}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _near_groups(ax, points: dict[str, tuple[float, float]], pixels: float = 12.0) -> list:
    """Points within ``pixels`` of each other on the axes, grouped: ``[(xy, [names])]``."""
    groups: list[tuple[tuple[float, float], list[str], tuple[float, float]]] = []
    for name, xy in points.items():
        px, py = ax.transData.transform(xy)
        for _, names, (gx, gy) in groups:
            if abs(px - gx) <= pixels and abs(py - gy) <= pixels:
                names.append(name)
                break
        else:
            groups.append((xy, [name], (px, py)))
    return [(xy, names) for xy, names, _ in groups]
