"""``hpredit.evaluate``: a task (TruthfulQA MC or generation, BBQ, ToxiGen, refusal, A/B), unedited
and (with an editor) edited.

Everything the user can get wrong is checked before the model runs; results are written to
``out`` atomically (``summary.json``, ``per_question.jsonl``, ``split.json``), so an error or an
interruption never leaves a half-written directory.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn
from transformers import PreTrainedTokenizerBase

from .. import distributed
from ..artifacts import sha256_file
from ..checks import DEFAULT_STRENGTH, check_count, check_limit, check_scope, check_seed, check_strength, named
from ..data import QA_PRIMER
from ..editors import Editor, load_editor
from ..editors.kl_curve import scope_note
from ..errors import HpreditError
from ..models import check_generation_length, fingerprint, load_model
from ..preflight import check_editor_for, check_model, check_out, loaded_model_given
from ..results import EvalResult, Provenance, to_jsonable
from .judges import INFO_TEMPLATE, TRUTH_TEMPLATE, HFJudge, Judge, resolve_judges
from .splits import SPLITS, resolve_split
from .tasks import TASK_REGISTRY, EvalSettings, Selection, Task, TaskReport, get_task

__all__ = ["SPLITS", "TASKS", "EvalResult", "evaluate", "resolve_split"]

#: Every task name ``evaluate`` (and ``hpredit eval --task``) accepts: the one registry of
#: :mod:`hpredit.evaluation.tasks`, the same as ``compare``'s. A live view: a task registered
#: later is in it.
TASKS = TASK_REGISTRY.view()


# --------------------------------------------------------------------------- checks and loading


def _load_model(
    model, tokenizer, editor, strict: bool, dtype: str, device: str | None, device_map: str | dict | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase, dict[str, float]]:
    """The model (loaded by name, or as given with its tokenizer), checked against the editor; the load's seconds."""
    t0 = time.perf_counter()
    if not loaded_model_given(model, tokenizer):
        model, tokenizer = load_model(model, dtype=dtype, device=device, device_map=device_map)
    if editor is not None:
        editor.check_model(model, strict=strict)
    return model, tokenizer, {"load": time.perf_counter() - t0}


# --------------------------------------------------------------------------- records


def _data_record(task: Task, data: str | os.PathLike | None) -> dict:
    path = data or (os.environ.get(task.data_env) if task.data_env else None)
    if path:
        return {"path": str(Path(path).resolve()), "sha256": sha256_file(Path(path))}
    return {"source": task.data_note}


def _model_record(model: nn.Module) -> dict:
    param = next(model.parameters())
    return {
        **fingerprint(model).to_dict(),
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
    }


def _editor_record(editor, path: str | None, strength: float, scope: str, kl: float | None = None) -> dict:
    return {
        "method": editor.method,
        "path": path,
        "layers": editor.layers,
        "config": to_jsonable(editor.config),
        "model": editor.model_fingerprint.to_dict(),
        "strength": strength,  # with ``kl``: the strength it converted to
        "kl": kl,  # the fluency cost asked for instead of a strength (null: a strength was given)
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
    strength: float = DEFAULT_STRENGTH,
    scope: str = "all",
    data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    kl: float | None = None,
    primer: str = QA_PRIMER,
    judges: Judge | Mapping[str, Judge | str | os.PathLike] | None = None,
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
        kl: instead of ``strength``, the fluency cost wanted, converted through the editor's
            measured strength → KL curve (:meth:`~hpredit.editors.Editor.strength_for_kl`).
        data: the task's data file (TruthfulQA: default ``$HPREDIT_TRUTHFULQA``, else the hub).
        out: write ``summary.json``, ``per_question.jsonl`` and ``split.json`` there atomically
            (refused if non-empty unless ``force``).
        primer: the few-shot QA primer (TruthfulQA).
        judges: generation only: a callable ``judge(question, answer)`` or ``{"truth": ..., "info": ...}``
            (a judge given as a model's name or directory is loaded, after every check, as an
            :class:`~hpredit.evaluation.judges.HFJudge` with the template of its name).
        max_new_tokens: generation: tokens per answer at most.
        batch_size: questions per batch (MC: whose answers share forward passes; generation:
            prompts per ``generate`` call); it does not change the MC numbers.
        dtype, device, device_map: for loading ``model`` by name (see :func:`hpredit.load_model`).
        bootstrap_resamples: resamples of the paired-bootstrap CI of each difference (TruthfulQA).
        progress, show: progress bars; print the table.
        command: the command line to record (default: the equivalent ``hpredit.evaluate(...)`` call).

    Returns:
        An :class:`~hpredit.results.EvalResult`: ``result.metrics`` holds
        ``unedited``, with an editor ``edited`` and ``difference`` (mean and, for TruthfulQA,
        a paired-bootstrap CI), per metric; ``result.summary`` also records the model, editor,
        split, data, versions and machine.

    Example:
        >>> result = evaluate(model=model, tokenizer=tok, split="all", limit=2, data=csv, show=False)
        >>> sorted(result.metrics["unedited"])
        ['mc1', 'mc2', 'mc3']
    """
    the_task = check_eval_args(
        task, limit, scope, strength, editor, batch_size, max_new_tokens, bootstrap_resamples, seed, judges is not None
    )
    given, strength = strength, check_strength(strength)
    out_path = None if out is None else check_out(out, force, (data, model, editor))
    editor_obj, editor_path = _check_sources(the_task, model, editor, data, strict, device, device_map, max_new_tokens)
    if kl is not None:
        if editor_obj is None:
            raise HpreditError(
                f"{named('kl')} needs an editor (it is converted through the editor's strength → KL curve)"
            )
        strength = editor_obj.resolve_strength(given, kl)
        note = scope_note(kl, strength, scope)
        if note and show and distributed.is_main():
            print(note, file=sys.stderr)
    judge_fns = _load_judges(judges, dtype, device)
    selection = the_task.select(the_task.load(data), split, seed, limit)
    lm, tokenizer, timing = _load_model(model, tokenizer, editor_obj, strict, dtype, device, device_map)
    settings = EvalSettings(primer, max_new_tokens, batch_size, progress, judge_fns, bootstrap_resamples, seed)
    passes = _passes(the_task, lm, tokenizer, selection, editor_obj, strength, scope, strict, timing, settings)
    report = the_task.report(selection.items, passes, split, settings)
    command = command or _api_command(task, split, seed, limit, strength, scope, data, out, editor_path, editor_obj)
    editor_record = None if editor_obj is None else _editor_record(editor_obj, editor_path, strength, scope, kl)
    summary = _summary(
        the_task, command, lm, editor_record, data, primer, split, seed, limit, selection, report, timing
    )
    result = EvalResult(summary, report.per_item, selection.record)
    _write_and_show(result, out_path, show)
    return result


def _check_sources(
    task: Task, model, editor, data, strict: bool, device, device_map, max_new_tokens: int
) -> tuple[Any, str | None]:
    """Before anything loads: the model's config (by name), the generation length against its
    context, the task's data source and the editor against the model's config; the editor (loaded
    from its directory) and its path."""
    config = check_model(model, device, device_map) if model is None or isinstance(model, (str, os.PathLike)) else None
    check_generation_length(max_new_tokens, config if config is not None else model, named("max_new_tokens"))
    task.check_source(data)
    if editor is None:
        return None, None
    if not isinstance(editor, (Editor, str, os.PathLike)):
        raise HpreditError(f"editor must be an Editor or a directory, got {type(editor).__name__}")
    path = None if isinstance(editor, Editor) else str(editor)
    if config is not None:
        return check_editor_for(editor, config, model, strict), path
    return (editor if isinstance(editor, Editor) else load_editor(editor)), path


def _load_judges(judges, dtype: str, device: str | None) -> dict[str, Judge]:
    """Judges as callables: a judge model given by name (``{"truth": "path"}``) is loaded here,
    with the template of its name (``truth``: ends ``True:``, ``info``: ends ``Helpful:``)."""
    if isinstance(judges, Mapping) and any(isinstance(j, (str, os.PathLike)) for j in judges.values()):
        templates = {"truth": TRUTH_TEMPLATE, "info": INFO_TEMPLATE}
        judges = {
            name: HFJudge.from_pretrained(j, templates.get(name, TRUTH_TEMPLATE), dtype=dtype, device=device)
            if isinstance(j, (str, os.PathLike))
            else j
            for name, j in judges.items()
        }
    return resolve_judges(judges)


def _passes(
    task: Task,
    lm,
    tokenizer,
    selection: Selection,
    editor,
    strength: float,
    scope: str,
    strict: bool,
    timing: dict[str, float],
    settings: EvalSettings,
) -> dict[str, Any]:
    """The task's pass unedited and (with an editor) edited; each pass's seconds go to ``timing``."""

    def run(variant: str) -> Any:
        start = time.perf_counter()
        result = task.evaluate_pass(lm, tokenizer, selection.items, settings)
        timing[variant] = time.perf_counter() - start
        return result

    passes = {"unedited": run("unedited")}
    if editor is not None:
        with editor.attach(lm, strength=strength, scope=scope, strict=strict):
            passes["edited"] = run("edited")
    return passes


def _summary(
    task: Task,
    command: str,
    lm,
    editor_record,
    data,
    primer: str,
    split: str,
    seed: int,
    limit: int | None,
    selection: Selection,
    report: TaskReport,
    timing: dict[str, float],
) -> dict:
    """``summary.json``: the task, the provenance, model, editor, data, split, metrics and timing."""
    provenance = Provenance.now(command)
    return {
        "task": task.name,
        "command": provenance.command,
        "created": provenance.created,
        "model": _model_record(lm),
        "editor": editor_record,
        "versions": provenance.versions,
        "machine": provenance.machine,
        "data": _data_record(task, data),
        "primer_sha256": hashlib.sha256(primer.encode()).hexdigest(),
        "split": {
            "name": split,
            "seed": seed,
            "scheme": selection.record["scheme"],
            "limit": limit,
            "indices": selection.indices,
        },
        "questions": len(selection.indices),
        "headline": list(task.metrics),
        "metrics": report.metrics,
        **report.extra,
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
    }


def _write_and_show(result: EvalResult, out: Path | None, show: bool) -> None:
    """Rank 0 writes ``out`` (atomically) and prints the table."""
    if out is not None and distributed.is_main():
        result.save(out)
    if show and distributed.is_main():
        console = Console()
        console.print(result.table())
        if out is not None:
            console.print(f"results written to {out}")


def check_eval_args(
    task: str,
    limit,
    scope: str,
    strength,
    editor,
    batch_size: int,
    max_new_tokens: int,
    bootstrap_resamples: int,
    seed: int = 0,
    judges: bool = False,
) -> Task:
    """Every check of :func:`evaluate`'s arguments that needs no data and no model; the task."""
    the_task = get_task(task)
    check_limit(limit)
    check_seed(seed)
    check_scope(scope)
    check_strength(strength)
    if not the_task.generates and editor is not None and scope != "all":
        raise HpreditError(f"{task} scores whole answers in one pass, so only --scope all applies (got {scope!r})")
    check_count(batch_size, "batch_size")
    check_count(max_new_tokens, "max_new_tokens")
    check_count(bootstrap_resamples, "bootstrap_resamples")
    if judges and not the_task.judged:
        raise HpreditError("judges apply to truthfulqa-gen only")
    return the_task
