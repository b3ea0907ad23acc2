"""``hpredit.evaluate``: TruthfulQA MC or generation, unedited and (with an editor) edited.

Everything the user can get wrong is checked before the model runs; results are written to
``out`` atomically (``summary.json``, ``per_question.jsonl``, ``split.json``), so an error or an
interruption never leaves a half-written directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..artifacts import atomic_directory, sha256_file
from ..data import QA_PRIMER, Question, load_truthfulqa, split_questions, two_fold_split
from ..errors import HpreditError
from ..hooks import check_scope, check_strength
from .judges import Judge, judge_value, resolve_judges
from .metrics import paired_bootstrap, reference_acc
from .truthfulqa import MCScores, generate_answers, score_truthfulqa_mc

__all__ = ["SPLITS", "TASKS", "EvalResult", "evaluate", "resolve_split"]

TASKS = ("truthfulqa-mc", "truthfulqa-gen")
SPLITS = ("train", "val", "test", "all", "fold0", "fold1")
#: Metrics shown in the table, per task (all metrics are in summary.json).
_HEADLINE = {"truthfulqa-mc": ("mc1", "mc2", "mc3"), "truthfulqa-gen": ("bleu_acc", "rougeL_acc")}
_VERSIONED = ("torch", "transformers", "numpy", "sacrebleu", "rouge-score")


def resolve_split(n: int, split: str, seed: int = 0) -> tuple[list[int], dict]:
    """Question indices of ``split`` among ``n`` questions, and a record of the split to save.

    ``train``/``val``/``test``/``all``: the 40/10/50 split (:func:`hpredit.data.split_questions`);
    ``fold0``/``fold1``: the test half of fold 0/1 of ITI's 2-fold split
    (:func:`hpredit.data.two_fold_split`). Both are seeded by ``seed``.
    """
    if split not in SPLITS:
        raise HpreditError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if split.startswith("fold"):
        folds = two_fold_split(n, seed)
        indices = folds[int(split[-1])].test
        record: dict[str, Any] = {"scheme": "2-fold (ITI)", "folds": [f.to_dict() for f in folds]}
    else:
        qsplit = split_questions(n, seed)
        indices = qsplit.indices(split)
        record = {"scheme": "40/10/50", **qsplit.to_dict()}
    if not indices:
        raise HpreditError(f"split {split!r} has no questions ({n} questions in the data, seed {seed})")
    return list(indices), {"name": split, "seed": seed, **record}


# --------------------------------------------------------------------------- result


@dataclass
class EvalResult:
    """What :func:`evaluate` returns: ``summary`` (as in ``summary.json``) and ``per_question``
    rows (as in ``per_question.jsonl``). ``result["metrics"]`` reads the summary like a dict."""

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
            (tmp / "summary.json").write_text(json.dumps(self.summary, indent=1) + "\n", encoding="utf-8")
            with open(tmp / "per_question.jsonl", "w", encoding="utf-8") as f:
                for row in self.per_question:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
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
        names = list(_HEADLINE[s["task"]])
        names += [k for k in m["unedited"] if k.startswith("judge_") or k == "truth_x_info"]
        if "edited" in m:
            table.add_column("edited", justify="right")
            table.add_column("edited − unedited", justify="right")
            ci = m["difference"][names[0]]["confidence"] if names else 0.95
            table.add_column(f"{ci:.0%} CI (paired bootstrap)", justify="right")
        for name in names:
            row = [name, f"{m['unedited'][name]:.4f}"]
            if "edited" in m:
                d = m["difference"][name]
                row += [f"{m['edited'][name]:.4f}", f"{d['mean']:+.4f}", f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"]
            table.add_row(*row)
        return table


# --------------------------------------------------------------------------- helpers


def _versions() -> dict[str, str]:
    from .. import __version__

    out = {"hpredit": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _check_out(out: Path | None, force: bool) -> None:
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise HpreditError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise HpreditError(f"{out} already exists and is not empty: choose another --out or pass --force")


def _check_limit(limit: int | None) -> None:
    if limit is None:
        return
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise HpreditError(f"--limit must be a positive integer, got {limit!r}")


def _load_editor(editor):
    from ..editors import Editor, load_editor

    if editor is None or isinstance(editor, Editor):
        return editor, None
    if isinstance(editor, (str, os.PathLike)):
        return load_editor(editor), str(editor)
    raise HpreditError(f"editor must be an Editor or a directory, got {type(editor).__name__}")


def _load_model(model, tokenizer, dtype: str, device: str | None):
    from ..models import load_model

    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model, dtype=dtype, device=device)
    if not isinstance(model, nn.Module):
        raise HpreditError(f"model must be a name, a path or a loaded model, got {type(model).__name__}")
    if tokenizer is None:
        raise HpreditError("pass tokenizer= together with a loaded model")
    return model, tokenizer


def _means(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def _differences(edited: list[dict], unedited: list[dict], resamples: int, seed: int) -> dict:
    return {
        k: paired_bootstrap([r[k] for r in edited], [r[k] for r in unedited], resamples, seed).to_dict()
        for k in unedited[0]
    }


def _data_record(data: str | os.PathLike | None) -> dict:
    path = data or os.environ.get("HPREDIT_TRUTHFULQA")
    if path:
        return {"path": str(Path(path).resolve()), "sha256": sha256_file(Path(path))}
    return {"hub": "truthfulqa/truthful_qa (generation)"}


def _question_row(q: Question, split_name: str) -> dict:
    return {"index": q.index, "split": split_name, "question": q.question, "category": q.category}


# --------------------------------------------------------------------------- tasks


def _mc_rows(
    questions: list[Question], passes: dict[str, MCScores], split_name: str
) -> tuple[list[dict], dict[str, list[dict]]]:
    """Per-question rows (every answer's score per pass) and per-pass lists of MC metrics."""
    per_question, metrics = [], {v: [] for v in passes}
    for i, q in enumerate(questions):
        row = _question_row(q, split_name)
        row["best_answer"] = q.best_answer
        answers = [{"text": a, "label": "true", "best": a == q.best_answer} for a in q.correct_answers]
        answers += [{"text": a, "label": "false", "best": False} for a in q.incorrect_answers]
        for a in answers:
            a["score"] = {v: s.questions[i].scores[a["text"]] for v, s in passes.items()}
        row["answers"] = answers
        for v, s in passes.items():
            m = s.questions[i].metrics()
            row[v] = m
            metrics[v].append(m)
        per_question.append(row)
    return per_question, metrics


def _gen_metrics(q: Question, answer: str, judges: Mapping[str, Judge]) -> dict[str, float]:
    m = reference_acc(answer, q.correct_answers, q.incorrect_answers)
    for name, judge in judges.items():
        value = judge_value(judge(q.question, answer))
        m[f"judge_{name}"] = value
        m[f"judge_{name}_acc"] = float(value >= 0.5)
    if "truth" in judges and "info" in judges:
        m["truth_x_info"] = m["judge_truth_acc"] * m["judge_info_acc"]
    return m


# --------------------------------------------------------------------------- evaluate


def evaluate(
    model: nn.Module | str | os.PathLike | None = None,
    tokenizer=None,
    editor=None,
    task: str = "truthfulqa-mc",
    split: str = "test",
    seed: int = 0,
    limit: int | None = None,
    strength: float = 1.0,
    scope: str = "all",
    data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    primer: str = QA_PRIMER,
    judges: Judge | Mapping[str, Judge] | None = None,
    max_new_tokens: int = 50,
    batch_size: int = 16,
    strict: bool = True,
    dtype: str = "float32",
    device: str | None = None,
    bootstrap_resamples: int = 10_000,
    force: bool = False,
    progress: bool = False,
    show: bool = True,
    command: str | None = None,
) -> EvalResult:
    """Evaluate ``model`` on TruthfulQA, unedited and, with ``editor``, edited.

    ``model``: a hub id, a local directory, ``None`` (the embedded default) or a loaded model
    (then ``tokenizer`` is required). ``editor``: an :class:`~hpredit.editors.Editor` or its
    directory, attached with ``strength`` and ``scope`` (MC scoring edits every token: ``scope``
    must be ``"all"``). ``task``: ``"truthfulqa-mc"`` (MC1/MC2/MC3) or ``"truthfulqa-gen"``
    (greedy answers, BLEU/ROUGE-L acc, optional ``judges``: a callable ``judge(question, answer)``
    or ``{"truth": ..., "info": ...}``). ``split``: ``test``/``val``/``train``/``all`` of the
    seeded 40/10/50 split or ``fold0``/``fold1`` of ITI's 2-fold split; ``limit`` keeps its first N
    questions. ``data``: the TruthfulQA CSV (default ``$HPREDIT_TRUTHFULQA``, else the hub).
    With an editor, per-metric differences get a paired bootstrap CI (``bootstrap_resamples``,
    seeded by ``seed``). ``batch_size``: questions per batch (MC: whose answers share forward
    passes; generation: prompts per ``generate`` call); it does not change the MC numbers.
    ``out``: write the results there atomically (refused if non-empty unless ``force``).
    ``show`` prints the table.
    """
    if task not in TASKS:
        raise HpreditError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    _check_limit(limit)
    check_scope(scope)
    strength = check_strength(strength)
    if task == "truthfulqa-mc" and editor is not None and scope != "all":
        raise HpreditError(
            f"truthfulqa-mc scores whole answers in one pass, so only --scope all applies (got {scope!r})"
        )
    if batch_size < 1 or max_new_tokens < 1 or bootstrap_resamples < 1:
        raise HpreditError("batch_size, max_new_tokens and bootstrap_resamples must be at least 1")
    out_path = Path(out) if out is not None else None
    _check_out(out_path, force)
    judge_fns = resolve_judges(judges)
    if judge_fns and task != "truthfulqa-gen":
        raise HpreditError("judges apply to truthfulqa-gen only")

    all_questions = load_truthfulqa(data)
    indices, split_record = resolve_split(len(all_questions), split, seed)
    if limit is not None:
        indices = indices[:limit]
    questions = [all_questions[i] for i in indices]
    editor_obj, editor_path = _load_editor(editor)

    t0 = time.perf_counter()
    model, tokenizer = _load_model(model, tokenizer, dtype, device)
    if editor_obj is not None:
        editor_obj.check_model(model, strict=strict)
    timing = {"load": time.perf_counter() - t0}

    def run(variant: str):
        start = time.perf_counter()
        if task == "truthfulqa-mc":
            result = score_truthfulqa_mc(model, tokenizer, questions, primer, group_size=batch_size, progress=progress)
        else:
            result = generate_answers(model, tokenizer, questions, primer, max_new_tokens, batch_size, progress)
        timing[variant] = time.perf_counter() - start
        return result

    passes = {"unedited": run("unedited")}
    if editor_obj is not None:
        with editor_obj.attach(model, strength=strength, scope=scope, strict=strict):
            passes["edited"] = run("edited")

    if task == "truthfulqa-mc":
        per_question, rows = _mc_rows(questions, passes, split)
        extra = {
            "answers_scored": sum(len(q.scores) for q in passes["unedited"].questions),
            "answer_tokens": passes["unedited"].tokens,
            "boundary_merges": passes["unedited"].merged,
            "mc1_ties": {v: sum(q.mc1_tie() for q in s.questions) for v, s in passes.items()},
        }
    else:
        rows = {v: [] for v in passes}
        per_question = []
        for i, q in enumerate(questions):
            row = _question_row(q, split)
            row["generation"] = {v: passes[v][i] for v in passes}
            for v in passes:
                row[v] = _gen_metrics(q, passes[v][i], judge_fns)
                rows[v].append(row[v])
            per_question.append(row)
        extra = {"max_new_tokens": max_new_tokens, "judges": sorted(judge_fns)}

    metrics: dict[str, Any] = {v: _means(r) for v, r in rows.items()}
    if "edited" in rows:
        metrics["difference"] = _differences(rows["edited"], rows["unedited"], bootstrap_resamples, seed)

    from ..models import fingerprint

    param = next(model.parameters())
    summary = {
        "task": task,
        "command": command
        or _api_command(task, split, seed, limit, strength, scope, data, out, editor_path, editor_obj),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {**fingerprint(model).to_dict(), "dtype": str(param.dtype).removeprefix("torch."),
                  "device": str(param.device)},
        "editor": None if editor_obj is None else {
            "method": editor_obj.method, "path": editor_path, "layers": editor_obj.layers,
            "config": _jsonable(editor_obj.config), "model": editor_obj.model_fingerprint.to_dict(),
            "strength": strength, "scope": scope,
        },
        "versions": _versions(),
        "data": _data_record(data),
        "primer_sha256": hashlib.sha256(primer.encode()).hexdigest(),
        "split": {"name": split, "seed": seed, "scheme": split_record["scheme"], "limit": limit, "indices": indices},
        "questions": len(questions),
        "metrics": metrics,
        **extra,
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
    }
    result = EvalResult(summary, per_question, split_record)
    if out_path is not None:
        result.save(out_path)
    if show:
        from rich.console import Console

        console = Console()
        console.print(result.table())
        if out_path is not None:
            console.print(f"results written to {out_path}")
    return result


def _jsonable(config: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config


def _api_command(task, split, seed, limit, strength, scope, data, out, editor_path, editor_obj) -> str:
    args: dict[str, Any] = {"task": task, "split": split, "seed": seed, "limit": limit}
    if editor_obj is not None:
        args.update(editor=editor_path or f"<{editor_obj.method} editor object>", strength=strength, scope=scope)
    args.update(data=str(data) if data else None, out=str(out) if out else None)
    return "hpredit.evaluate(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"

