"""The report of a comparison: a markdown table, a figure of the task metric against KL, results.json."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import atomic_directory
from ..results import CompareResult, write_json

__all__ = ["figure", "markdown_table", "write_results"]

_MARKERS = "osD^vP*Xph<>"


def _typed(result: CompareResult | dict) -> CompareResult:
    return result if isinstance(result, CompareResult) else CompareResult.from_json(result)


def markdown_table(result: CompareResult | dict) -> str:
    """The summary as a markdown table (mean ± std over seeds; – where a metric is undefined)."""
    result = _typed(result)
    metrics = result.metrics
    lines = [
        "| method | "
        + " | ".join(m.upper() if m.startswith("mc") else m for m in metrics)
        + " | KL (nats/token) | perplexity | strengths |",
        "|---" * (len(metrics) + 4) + "|",
    ]

    def cell(e: dict, k: str, f: str = ".4f") -> str:
        v = e.get(k) or {}
        return "–" if v.get("mean") is None else f"{v['mean']:{f}} ± {v['std']:{f}}"

    for name, e in result.summary.items():
        lines.append(
            f"| {name} | "
            + " | ".join(cell(e, m) for m in metrics)
            + f" | {cell(e, 'kl')} | {cell(e, 'ppl', '.2f')} | {', '.join(str(s) for s in e['strengths'])} |"
        )
    return "\n".join(lines)


def figure(result: CompareResult | dict, path: Path) -> bool:
    """The primary metric (test) against the fluency cost, one point per method with its std.

    Methods with equal results do not hide each other: each has its own hollow marker, drawn
    smaller than the one before, so coinciding points show as nested rings, and each point is
    labelled with every method at it ("hpr = hpr-bias"). False without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    result = _typed(result)
    key = result.setting.get("primary", "mc2")
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
    return True


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


def write_results(result: CompareResult | dict, out: Path) -> None:
    """Write results.json, table.md and (with matplotlib) ``<primary metric>_vs_kl.png`` to ``out`` atomically."""
    result = _typed(result)
    with atomic_directory(out) as tmp:
        write_json(tmp / "results.json", result.to_json())
        (tmp / "table.md").write_text(markdown_table(result) + "\n")
        figure(result, tmp / f"{result.setting.get('primary', 'mc2')}_vs_kl.png")
