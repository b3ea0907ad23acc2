"""``hpredit.evaluate``: a task (TruthfulQA MC or generation, BBQ, ToxiGen, refusal, A/B), unedited
and (with an editor) edited.

Everything the user can get wrong is checked before the model runs; results are written to
``out`` atomically (``summary.json``, ``per_question.jsonl``, ``split.json``), so an error or an
interruption never leaves a half-written directory.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from transformers import PreTrainedTokenizerBase

from .. import distributed
from ..artifacts import check_output_dir, sha256_file
from ..checks import check_seed, check_strength
from ..data import QA_PRIMER, Question
from ..errors import HpreditError
from ..hooks import check_scope
from ..provenance import machine, versions
from .judges import Judge, judge_value, resolve_judges
from .metrics import paired_bootstrap, reference_acc
from .results import EvalResult, to_jsonable
from .splits import SPLITS, resolve_split
from .tasks import Task, get_task, task_names
from .truthfulqa import MCScores, generate_answers, score_truthfulqa_mc

__all__ = ["SPLITS", "TASKS", "EvalResult", "evaluate", "resolve_split"]

#: Every task name ``evaluate`` (and ``hpredit eval --task``) accepts: the one registry of
#: :mod:`hpredit.evaluation.tasks`, the same as ``compare``'s.
TASKS = tuple(task_names())
_TRUTHFULQA = ("truthfulqa-mc", "truthfulqa-gen")
#: Tasks that generate (so an editor's scope can be other than ``all``).
_GENERATING = ("truthfulqa-gen", "refusal")


# --------------------------------------------------------------------------- checks and loading


def check_limit(limit: int | None) -> None:
    """``limit`` must be None or a positive integer."""
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


def _load_model(
    model, tokenizer, dtype: str, device: str | None, device_map: str | dict | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    from ..models import load_model

    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model, dtype=dtype, device=device, device_map=device_map)
    if not isinstance(model, nn.Module):
        raise HpreditError(f"model must be a name, a path or a loaded model, got {type(model).__name__}")
    if tokenizer is None:
        raise HpreditError("pass tokenizer= together with a loaded model")
    return model, tokenizer


@dataclass
class _Selection:
    """The items of the split (TruthfulQA questions or a task's items) and the split's record."""

    items: list
    indices: list[int]
    record: dict


def _select(task: Task, data, split: str, seed: int, limit: int | None) -> _Selection:
    """Load the task's data and keep the split's groups (the first ``limit`` of them)."""
    items = task.load(data)
    if task.name in _TRUTHFULQA:
        indices, record = resolve_split(len(items), split, seed)
        indices = indices[:limit] if limit is not None else indices
        return _Selection([items[i] for i in indices], indices, record)
    groups = sorted({task.group(it) for it in items})
    indices, record = resolve_split(len(groups), split, seed)
    indices = indices[:limit] if limit is not None else indices
    keep = {groups[i] for i in indices}
    return _Selection([it for it in items if task.group(it) in keep], indices, record)


# --------------------------------------------------------------------------- per-task rows


def _means(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def _differences(edited: list[dict], unedited: list[dict], resamples: int, seed: int) -> dict:
    return {
        k: paired_bootstrap([r[k] for r in edited], [r[k] for r in unedited], resamples, seed).to_dict()
        for k in unedited[0]
    }


def _question_row(q: Question, split_name: str) -> dict:
    return {"index": q.index, "split": split_name, "question": q.question, "category": q.category}


def _mc_rows(
    questions: list[Question], passes: dict[str, MCScores], split_name: str
) -> tuple[list[dict], dict[str, list[dict]]]:
    """Per-question rows (every answer's score per pass) and per-pass lists of MC metrics."""
    per_question: list[dict] = []
    metrics: dict[str, list[dict]] = {v: [] for v in passes}
    for i, q in enumerate(questions):
        row = _question_row(q, split_name)
        row["best_answer"] = q.best_answer
        answers: list[dict[str, Any]] = [
            {"text": a, "label": "true", "best": a == q.best_answer} for a in q.correct_answers
        ]
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


def _gen_rows(
    questions: list[Question], passes: dict[str, list[str]], split_name: str, judges: Mapping[str, Judge]
) -> tuple[list[dict], dict[str, list[dict]]]:
    """Per-question rows (each pass's answer and metrics) and per-pass lists of metrics."""
    rows: dict[str, list[dict]] = {v: [] for v in passes}
    per_question = []
    for i, q in enumerate(questions):
        row = _question_row(q, split_name)
        row["generation"] = {v: passes[v][i] for v in passes}
        for v in passes:
            row[v] = _gen_metrics(q, passes[v][i], judges)
            rows[v].append(row[v])
        per_question.append(row)
    return per_question, rows


def _metrics(
    task: Task, passes: dict, selection: _Selection, split: str, judges: Mapping[str, Judge], resamples: int, seed: int
) -> tuple[dict, list[dict], dict]:
    """The summary's metrics (per pass, and edited − unedited), the per-question rows, and extra
    counts. TruthfulQA's differences get a paired-bootstrap CI over questions; other tasks'
    metrics (accuracies, bias scores, rates) are aggregates: their difference has no CI."""
    if task.name == "truthfulqa-mc":
        per_question, rows = _mc_rows(selection.items, passes, split)
        extra = {
            "answers_scored": sum(len(q.scores) for q in passes["unedited"].questions),
            "answer_tokens": passes["unedited"].tokens,
            "boundary_merges": passes["unedited"].merged,
            "mc1_ties": {v: sum(q.mc1_tie() for q in s.questions) for v, s in passes.items()},
        }
    elif task.name == "truthfulqa-gen":
        per_question, rows = _gen_rows(selection.items, passes, split, judges)
        extra = {"judges": sorted(judges)}
    else:
        metrics: dict[str, Any] = dict(passes)
        if "edited" in passes:
            metrics["difference"] = {
                k: {
                    "mean": None
                    if passes["edited"].get(k) is None or passes["unedited"].get(k) is None
                    else passes["edited"][k] - passes["unedited"][k],
                    "ci": None,
                }
                for k in passes["unedited"]
            }
        return metrics, [], {"items": len(selection.items)}
    metrics = {v: _means(r) for v, r in rows.items()}
    if "edited" in rows:
        metrics["difference"] = _differences(rows["edited"], rows["unedited"], resamples, seed)
    return metrics, per_question, extra


# --------------------------------------------------------------------------- records


def _data_record(task: Task, data: str | os.PathLike | None) -> dict:
    path = data or (os.environ.get("HPREDIT_TRUTHFULQA") if task.name in _TRUTHFULQA else None)
    if path:
        return {"path": str(Path(path).resolve()), "sha256": sha256_file(Path(path))}
    return {"source": task.data_note}


def _model_record(model: nn.Module) -> dict:
    from ..models import fingerprint

    param = next(model.parameters())
    return {
        **fingerprint(model).to_dict(),
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
    }


def _editor_record(editor, path: str | None, strength: float, scope: str) -> dict:
    return {
        "method": editor.method,
        "path": path,
        "layers": editor.layers,
        "config": to_jsonable(editor.config),
        "model": editor.model_fingerprint.to_dict(),
        "strength": strength,
        "scope": scope,
    }


def _api_command(task, split, seed, limit, strength, scope, data, out, editor_path, editor_obj) -> str:
    args: dict[str, Any] = {"task": task, "split": split, "seed": seed, "limit": limit}
    if editor_obj is not None:
        args.update(editor=editor_path or f"<{editor_obj.method} editor object>", strength=strength, scope=scope)
    args.update(data=str(data) if data else None, out=str(out) if out else None)
    return "hpredit.evaluate(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"


# --------------------------------------------------------------------------- evaluate


def evaluate(
    model: nn.Module | str | os.PathLike | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
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
    device_map: str | dict | None = None,
    bootstrap_resamples: int = 10_000,
    force: bool = False,
    progress: bool = False,
    show: bool = True,
    command: str | None = None,
) -> EvalResult:
    """Evaluate ``model`` on a task, unedited and, with ``editor``, edited.

    Args:
        model: a hub id, a local directory, ``None`` (the embedded default) or a loaded model
            (then ``tokenizer`` is required).
        tokenizer: the tokenizer of a loaded ``model``.
        editor: an :class:`~hpredit.editors.Editor` or its directory, attached with ``strength``
            and ``scope``; ``strict`` refuses an editor fitted on a model of another name.
        task: any name of :func:`hpredit.evaluation.tasks.task_names`: ``"truthfulqa-mc"``
            (MC1/MC2/MC3), ``"truthfulqa-gen"`` (greedy answers, BLEU/ROUGE-L acc, optional
            ``judges``), ``bbq``, ``toxigen``, ``refusal``, ``ab:NAME``.
        split: ``test``/``val``/``train``/``all`` of the seeded 40/10/50 split (of questions, or of
            a task's groups) or ``fold0``/``fold1`` of ITI's 2-fold split.
        seed: seeds the split and the bootstrap.
        limit: keep the first N questions (groups) of the split.
        strength, scope: how the editor is attached (MC scoring edits every token: ``scope`` must
            be ``"all"`` there).
        data: the task's data file (TruthfulQA: default ``$HPREDIT_TRUTHFULQA``, else the hub).
        out: write ``summary.json``, ``per_question.jsonl`` and ``split.json`` there atomically
            (refused if non-empty unless ``force``).
        primer: the few-shot QA primer (TruthfulQA).
        judges: generation only: a callable ``judge(question, answer)`` or ``{"truth": ..., "info": ...}``.
        max_new_tokens: generation: tokens per answer at most.
        batch_size: questions per batch (MC: whose answers share forward passes; generation:
            prompts per ``generate`` call); it does not change the MC numbers.
        dtype, device, device_map: for loading ``model`` by name (see :func:`hpredit.load_model`).
        bootstrap_resamples: resamples of the paired-bootstrap CI of each difference (TruthfulQA).
        progress, show: progress bars; print the table.
        command: the command line to record (default: the equivalent ``hpredit.evaluate(...)`` call).

    Returns:
        An :class:`~hpredit.evaluation.results.EvalResult`: ``result.metrics`` holds
        ``unedited``, with an editor ``edited`` and ``difference`` (mean and, for TruthfulQA,
        a paired-bootstrap CI), per metric; ``result.summary`` also records the model, editor,
        split, data, versions and machine.

    Example:
        >>> result = evaluate(model=model, tokenizer=tok, split="all", limit=2, data=csv, show=False)
        >>> sorted(result.metrics["unedited"])
        ['mc1', 'mc2', 'mc3']
    """
    the_task = check_eval_args(task, limit, scope, strength, editor, batch_size, max_new_tokens, bootstrap_resamples)
    strength = check_strength(strength)
    check_seed(seed)
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_output_dir(out_path, force)
    judge_fns = resolve_judges(judges)
    if judge_fns and task != "truthfulqa-gen":
        raise HpreditError("judges apply to truthfulqa-gen only")

    selection = _select(the_task, data, split, seed, limit)
    editor_obj, editor_path = _load_editor(editor)
    t0 = time.perf_counter()
    lm, tokenizer = _load_model(model, tokenizer, dtype, device, device_map)
    if editor_obj is not None:
        editor_obj.check_model(lm, strict=strict)
    timing = {"load": time.perf_counter() - t0}

    def run(variant: str) -> Any:
        start = time.perf_counter()
        result: Any
        if task == "truthfulqa-mc":
            result = score_truthfulqa_mc(
                lm, tokenizer, selection.items, primer, group_size=batch_size, progress=progress
            )
        elif task == "truthfulqa-gen":
            result = generate_answers(lm, tokenizer, selection.items, primer, max_new_tokens, batch_size, progress)
        else:
            result = the_task.score(lm, tokenizer, selection.items)
        timing[variant] = time.perf_counter() - start
        return result

    passes = {"unedited": run("unedited")}
    if editor_obj is not None:
        with editor_obj.attach(lm, strength=strength, scope=scope, strict=strict):
            passes["edited"] = run("edited")
    metrics, per_question, extra = _metrics(the_task, passes, selection, split, judge_fns, bootstrap_resamples, seed)
    if task == "truthfulqa-gen":
        extra = {"max_new_tokens": max_new_tokens, **extra}

    summary = {
        "task": task,
        "command": command
        or _api_command(task, split, seed, limit, strength, scope, data, out, editor_path, editor_obj),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": _model_record(lm),
        "editor": None if editor_obj is None else _editor_record(editor_obj, editor_path, strength, scope),
        "versions": versions(),
        "machine": machine(),
        "data": _data_record(the_task, data),
        "primer_sha256": hashlib.sha256(primer.encode()).hexdigest(),
        "split": {
            "name": split,
            "seed": seed,
            "scheme": selection.record["scheme"],
            "limit": limit,
            "indices": selection.indices,
        },
        "questions": len(selection.indices),
        "headline": list(the_task.metrics),
        "metrics": metrics,
        **extra,
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
    }
    result = EvalResult(summary, per_question, selection.record)
    if out_path is not None and distributed.is_main():
        result.save(out_path)
    if show and distributed.is_main():
        from rich.console import Console

        console = Console()
        console.print(result.table())
        if out_path is not None:
            console.print(f"results written to {out_path}")
    return result


def check_eval_args(
    task: str, limit, scope: str, strength, editor, batch_size: int, max_new_tokens: int, bootstrap_resamples: int
) -> Task:
    """Every check of :func:`evaluate`'s arguments that needs no data and no model; the task."""
    the_task = get_task(task)
    check_limit(limit)
    check_scope(scope)
    check_strength(strength)
    if task not in _GENERATING and editor is not None and scope != "all":
        raise HpreditError(f"{task} scores whole answers in one pass, so only --scope all applies (got {scope!r})")
    if batch_size < 1 or max_new_tokens < 1 or bootstrap_resamples < 1:
        raise HpreditError("batch_size, max_new_tokens and bootstrap_resamples must be at least 1")
    return the_task
