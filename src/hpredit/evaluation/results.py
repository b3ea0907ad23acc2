"""What an evaluation returns and writes: :class:`EvalResult`, its table, and JSON conversion."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import atomic_directory

__all__ = ["EvalResult", "to_jsonable"]


def to_jsonable(x: Any) -> Any:
    """A JSON-ready form of ``x``: dataclasses as dicts, numpy scalars as Python numbers.

    Usable as ``json.dumps(..., default=to_jsonable)``; other objects raise ``TypeError``.
    """
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


@dataclass
class EvalResult:
    """What :func:`~hpredit.evaluation.evaluate` returns: ``summary`` (as in ``summary.json``) and
    ``per_question`` rows (as in ``per_question.jsonl``). ``result["metrics"]`` reads the summary like a dict."""

    summary: dict
    per_question: list[dict] = field(default_factory=list)
    split: dict = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]

    @property
    def metrics(self) -> dict:
        """``{"unedited": {...}, "edited": {...}, "difference": {name: {"mean", "ci", ...}}}``."""
        return self.summary["metrics"]

    def to_dict(self) -> dict:
        return {"summary": self.summary, "per_question": self.per_question}

    def save(self, out: str | os.PathLike) -> Path:
        """Write ``summary.json``, ``per_question.jsonl`` and ``split.json`` to ``out`` atomically."""
        out = Path(out)
        with atomic_directory(out) as tmp:
            (tmp / "summary.json").write_text(
                json.dumps(self.summary, indent=1, default=to_jsonable) + "\n", encoding="utf-8"
            )
            with open(tmp / "per_question.jsonl", "w", encoding="utf-8") as f:
                for row in self.per_question:
                    f.write(json.dumps(row, ensure_ascii=False, default=to_jsonable) + "\n")
            (tmp / "split.json").write_text(json.dumps(self.split, indent=1) + "\n", encoding="utf-8")
        return out

    def table(self):
        """A rich table: each headline metric unedited, edited, difference and its CI."""
        from rich.table import Table

        m = self.metrics
        s = self.summary
        name = str(s["model"]["name"]).rstrip("/").rsplit("/", 1)[-1]
        title = f"{s['task']} · {name}"
        caption = f"split {s['split']['name']} (seed {s['split']['seed']}), {s['questions']} questions"
        if s.get("editor"):
            e = s["editor"]
            caption += f"; {e['method']} layers {e['layers']}, strength {e['strength']}, scope {e['scope']}"
        table = Table(title=title, caption=caption)
        table.add_column("metric")
        table.add_column("unedited", justify="right")
        names = [k for k in s.get("headline", m["unedited"]) if m["unedited"].get(k) is not None]
        names += [k for k in m["unedited"] if (k.startswith("judge_") or k == "truth_x_info") and k not in names]
        if "edited" in m:
            table.add_column("edited", justify="right")
            table.add_column("edited − unedited", justify="right")
            ci = next(
                (m["difference"][n].get("confidence") for n in names if m["difference"].get(n, {}).get("confidence")),
                0.95,
            )
            table.add_column(f"{ci:.0%} CI (paired bootstrap)", justify="right")
        for name in names:
            row = [name, f"{m['unedited'][name]:.4f}"]
            if "edited" in m:
                d = m["difference"][name]
                ci_text = "–" if d.get("ci") is None else f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
                edited = m["edited"].get(name)
                row += [
                    "–" if edited is None else f"{edited:.4f}",
                    "–" if d.get("mean") is None else f"{d['mean']:+.4f}",
                    ci_text,
                ]
            table.add_row(*row)
        return table
