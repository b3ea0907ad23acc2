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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn
from transformers import PreTrainedTokenizerBase

from .. import distributed
from ..checks import (
    DEFAULT_STRENGTH,
    check_count,
    check_limit,
    check_scope,
    check_seed,
    check_strength,
    check_strengths,
    named,
    strength_given,
)
from ..config import (
    FORCE_HELP,
    KL_HELP,
    LIMIT_HELP,
    STRENGTH_HELP,
    STRICT_HELP,
    TASK_DATA_HELP,
    LoadOptions,
    comma_list,
    editor_dir,
    given_path,
    option,
)
from ..data import QA_PRIMER
from ..editors import Editor, load_editor
from ..editors.kl_curve import scope_note
from ..errors import HpreditError
from ..files import sha256_file
from ..models import check_generation_length, fingerprint, load_model
from ..preflight import check_editor_for, check_model, check_out, model_and_fields
from ..results import EvalResult, Provenance, to_jsonable
from ..variants import MAX_VARIANTS, Variant
from .judges import INFO_TEMPLATE, TRUTH_TEMPLATE, HFJudge, Judge, resolve_judges
from .side_effects import fluency_costs, neutral_text
from .splits import SPLITS, resolve_split
from .tasks import TASK_REGISTRY, EvalSettings, Selection, Task, TaskReport, get_task, task_help

__all__ = ["SPLITS", "TASKS", "EvalConfig", "EvalResult", "evaluate", "resolve_split"]

#: Every task name ``evaluate`` (and ``hpredit eval --task``) accepts: the one registry of
#: :mod:`hpredit.evaluation.tasks`, the same as ``compare``'s. A live view: a task registered
#: later is in it.
TASKS = TASK_REGISTRY.view()


# --------------------------------------------------------------------------- checks and loading


def _load_model(
    model, tokenizer, editor, cfg: EvalConfig
) -> tuple[nn.Module, PreTrainedTokenizerBase, dict[str, float]]:
    """The model (as given with its tokenizer, or loaded by the config's name), checked against the
    editor; the load's seconds."""
    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map)
    if editor is not None:
        editor.check_model(model, strict=cfg.strict)
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


def _api_command(cfg: EvalConfig, strength: float, editor_path: str | None, editor_obj) -> str:
    args: dict[str, Any] = {"task": cfg.task, "split": cfg.split, "seed": cfg.seed, "limit": cfg.limit}
    if editor_obj is not None:
        args.update(editor=editor_path or f"<{editor_obj.method} editor object>", strength=strength, scope=cfg.scope)
        if cfg.strengths is not None:
            del args["strength"]
            args["strengths"] = list(cfg.strengths)
    args.update(data=str(cfg.data) if cfg.data else None, out=str(cfg.out) if cfg.out else None)
    return "hpredit.evaluate(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"


# --------------------------------------------------------------------------- evaluate


@dataclass(frozen=True, kw_only=True)
class EvalConfig(LoadOptions):
    """``evaluate``'s settings (``hpredit eval``'s options), checked when made (no data, no model).

    ``task``: a name of :func:`hpredit.evaluation.tasks.task_names` (``truthfulqa-mc``: MC1/2/3;
    ``truthfulqa-gen``: greedy answers, BLEU/ROUGE-L acc, optional judges; ``bbq``, ``toxigen``,
    ``refusal``, ``ab:NAME``); ``split``: of the seeded 40/10/50 split or ITI's 2-fold one; MC
    scoring edits every token, so ``scope`` must be ``all`` there; ``kl``: instead of ``strength``,
    the fluency cost wanted, converted through the editor's strength → KL curve; ``out`` is written
    atomically (refused if non-empty unless ``force``); ``batch_size`` does not change MC numbers.
    """

    task: str = option("truthfulqa-mc", task_help)
    editor: str | Path | Editor | None = option(
        None,
        "Editor directory (or Hub repo id): also evaluate edited, with the difference and its 95% CI.",
        flags=("--editor", "-e"),
        parse=editor_dir,
        metavar="<path>",
    )
    split: str = option("test", "test, val, train or all of the 40/10/50 split; fold0 or fold1 of ITI's 2-fold split.")
    seed: int = option(0, "Seed of the question split and of the bootstrap.")
    limit: int | None = option(None, LIMIT_HELP)
    strength: float = option(DEFAULT_STRENGTH, STRENGTH_HELP, cli_default=None)  # None: not given (see --kl)
    kl: float | None = option(None, KL_HELP)
    strengths: tuple[float, ...] | None = option(
        None,
        "A sweep instead of one --strength: comma-separated strengths (e.g. 0.25,0.5,1,2), scored together "
        "in one pass; prints each one's metrics and KL on neutral text, draws sweep.png into --out.",
        parse=comma_list(float, "numbers"),
    )
    max_variants: int = option(
        MAX_VARIANTS,
        "Configurations (unedited, each strength) scored together in one pass at most: memory grows with it.",
    )
    scope: str = option("all", "Edited tokens: all (required for MC), last-prompt-and-generated or generated.")
    data: str | Path | None = option(None, TASK_DATA_HELP, parse=given_path("file"))
    out: str | Path | None = option(
        None, "Write summary.json, per_question.jsonl and split.json here.", flags=("--out", "-o")
    )
    max_new_tokens: int = option(50, "Generation: tokens per answer at most.")
    batch_size: int = option(16, "Questions per batch (speed only; the numbers do not change).")
    truth_judge: str | Path | None = option(
        None, "Generation: local HF model judging truthfulness (prompt ends 'True:').", parse=given_path("model")
    )
    info_judge: str | Path | None = option(
        None, "Generation: local HF model judging informativeness (prompt ends 'Helpful:').", parse=given_path("model")
    )
    #: generation: a callable ``judge(question, answer)`` or ``{"truth": ..., "info": ...}`` (a judge given
    #: as a model's name or directory is loaded as an HFJudge with the template of its name)
    judges: Judge | Mapping[str, Judge | str | os.PathLike] | None = option(None, cli=False)
    #: the few-shot QA primer (TruthfulQA)
    primer: str = option(QA_PRIMER, cli=False)
    #: resamples of the paired-bootstrap CI of each difference (TruthfulQA)
    bootstrap_resamples: int = option(10_000, cli=False)
    strict: bool = option(True, STRICT_HELP)
    force: bool = option(False, FORCE_HELP)

    def check(self) -> None:
        if self.judges is not None and (self.truth_judge or self.info_judge):
            raise HpreditError("give judges or truth_judge/info_judge, not both")
        the_task = get_task(self.task)
        check_limit(self.limit)
        check_seed(self.seed)
        check_scope(self.scope)
        check_strength(self.strength)
        check_count(self.max_variants, "max_variants")
        if self.strengths is not None:
            if isinstance(self.strengths, (str, bytes)) or not isinstance(self.strengths, Sequence):
                raise HpreditError(f"{named('strengths')} must be a list of numbers, got {self.strengths!r}")
            self._set("strengths", tuple(check_strengths(self.strengths, "strengths")))
            if len(set(self.strengths)) != len(self.strengths):
                raise HpreditError(f"{named('strengths')} lists a strength twice: {list(self.strengths)}")
            if self.editor is None:
                raise HpreditError(f"{named('strengths')} needs an editor (--editor)")
            if self.kl is not None:
                raise HpreditError(f"give {named('strengths')} or {named('kl')}, not both")
            if strength_given(self.strength):
                raise HpreditError(f"give {named('strengths')} or {named('strength')}, not both")
            if self.all_judges() is not None:
                raise HpreditError(f"judges apply to one strength at a time: drop {named('strengths')} or the judges")
        if not the_task.generates and self.editor is not None and self.scope != "all":
            raise HpreditError(
                f"{self.task} scores whole answers in one pass, so only --scope all applies (got {self.scope!r})"
            )
        check_count(self.batch_size, "batch_size")
        check_count(self.max_new_tokens, "max_new_tokens")
        check_count(self.bootstrap_resamples, "bootstrap_resamples")
        if self.all_judges() is not None and not the_task.judged:
            raise HpreditError("judges apply to truthfulqa-gen only")

    def all_judges(self) -> Judge | Mapping[str, Judge | str | os.PathLike] | None:
        """The judges given, as ``judges`` or as ``truth_judge``/``info_judge`` paths (None: none)."""
        paths = {name: path for name, path in (("truth", self.truth_judge), ("info", self.info_judge)) if path}
        return self.judges if self.judges is not None else (paths or None)


def evaluate(
    model: nn.Module | str | os.PathLike | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    editor: Editor | str | os.PathLike | None = None,
    config: EvalConfig | None = None,
    *,
    progress: bool = False,
    show: bool = True,
    command: str | None = None,
    **fields: Any,
) -> EvalResult:
    """Evaluate ``model`` on a task, unedited and, with ``editor``, edited.

    Args:
        model: a hub id, a local directory, ``None`` (the embedded default, or ``config.model``) or a
            loaded model (then ``tokenizer`` is required).
        tokenizer: the tokenizer of a loaded ``model``.
        editor: an :class:`~hpredit.editors.Editor` or its directory (or ``config.editor``), attached
            with ``strength`` and ``scope``; ``strict`` refuses an editor fitted on a model of another name.
        config: the settings (:class:`EvalConfig`: the task and its data, the split, ``strength`` or
            ``kl``, ``scope``, ``out``, …; ``hpredit eval``'s defaults), or its fields as keywords
            (which also replace a ``config``'s).
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
    model, cfg = _config(model, tokenizer, editor, config, fields)
    the_task = get_task(cfg.task)
    out_path = None if cfg.out is None else check_out(cfg.out, cfg.force, (cfg.data, cfg.model, cfg.editor))
    editor_obj, editor_path = _check_sources(the_task, model, cfg)
    strength = _strength(editor_obj, cfg, show)
    judge_fns = _load_judges(cfg.all_judges(), cfg.dtype, cfg.device)
    selection = the_task.select(the_task.load(cfg.data), cfg.split, cfg.seed, cfg.limit)
    lm, tokenizer, timing = _load_model(model, tokenizer, editor_obj, cfg)
    settings = EvalSettings(
        cfg.primer,
        cfg.max_new_tokens,
        cfg.batch_size,
        progress,
        judge_fns,
        cfg.bootstrap_resamples,
        cfg.seed,
        cfg.max_variants,
        cfg.strict,
    )
    strengths = list(cfg.strengths) if cfg.strengths is not None else [strength]
    passes = _passes(the_task, lm, tokenizer, selection, editor_obj, strengths, cfg, timing, settings)
    sweep = None
    if cfg.strengths is None:
        report = the_task.report(selection.items, passes, cfg.split, settings)
    else:
        report, sweep = _sweep(the_task, lm, tokenizer, selection.items, passes, strengths, editor_obj, cfg, settings)
    command = command or _api_command(cfg, strength, editor_path, editor_obj)
    editor_record = None if editor_obj is None else _editor_record(editor_obj, editor_path, strength, cfg.scope, cfg.kl)
    if editor_record is not None and sweep is not None:
        editor_record["strength"] = None  # one per row of the sweep
    summary = _summary(the_task, command, lm, editor_record, cfg, selection, report, timing)
    if sweep is not None:
        summary["sweep"] = sweep
    result = EvalResult(summary, report.per_item, selection.record)
    _write_and_show(result, out_path, show)
    return result


def _config(model, tokenizer, editor, config: EvalConfig | None, fields: dict[str, Any]) -> tuple[Any, EvalConfig]:
    """A loaded model (or None) and the config: a model named or an editor given positionally is the config's."""
    model, fields = model_and_fields(model, tokenizer, fields)
    if editor is not None:
        fields = {**fields, "editor": editor}
    return model, EvalConfig.of(config, fields)


def _strength(editor: Editor | None, cfg: EvalConfig, show: bool) -> float:
    """The strength to attach with: as given, or the one ``kl`` converts to through the editor's curve."""
    if cfg.kl is None:
        return cfg.strength
    if editor is None:
        raise HpreditError(f"{named('kl')} needs an editor (it is converted through the editor's strength → KL curve)")
    strength = editor.resolve_strength(cfg.strength, cfg.kl)
    note = scope_note(cfg.kl, strength, cfg.scope)
    if note and show and distributed.is_main():
        print(note, file=sys.stderr)
    return strength


def _check_sources(task: Task, model, cfg: EvalConfig) -> tuple[Any, str | None]:
    """Before anything loads: the model's config (by name), the generation length against its
    context, the task's data source and the editor against the model's config; the editor (loaded
    from its directory) and its path."""
    by_name = model is None
    config = check_model(cfg.model, cfg.device, cfg.device_map) if by_name else None
    check_generation_length(cfg.max_new_tokens, config if by_name else model, named("max_new_tokens"))
    task.check_source(cfg.data)
    editor = cfg.editor
    if editor is None:
        return None, None
    if not isinstance(editor, (Editor, str, os.PathLike)):
        raise HpreditError(f"editor must be an Editor or a directory, got {type(editor).__name__}")
    path = None if isinstance(editor, Editor) else str(editor)
    if config is not None:
        return check_editor_for(editor, config, cfg.model, cfg.strict), path
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
    strengths: list[float],
    cfg: EvalConfig,
    timing: dict[str, float],
    settings: EvalSettings,
) -> dict[str, Any]:
    """The task's passes, unedited and (with an editor) edited at each of ``strengths``
    (``edited``, or ``strength S`` in a sweep), scored together where the task can
    (:meth:`~hpredit.evaluation.tasks.Task.evaluate_passes`); their seconds go to ``timing``."""
    variants = [Variant()]
    if editor is not None:
        variants += [Variant(editor, s, cfg.scope) for s in strengths]
    names = ["unedited"] + (["edited"] if cfg.strengths is None else [_label(s) for s in strengths])
    start = time.perf_counter()
    results = task.evaluate_passes(lm, tokenizer, selection.items, settings, variants)
    timing["+".join(names[:2]) if cfg.strengths is None else "unedited+sweep"] = time.perf_counter() - start
    return dict(zip(names, results))


def _label(strength: float) -> str:
    return f"strength {strength:g}"


def _sweep(
    task: Task,
    lm,
    tokenizer,
    items: list,
    passes: dict[str, Any],
    strengths: list[float],
    editor: Editor,
    cfg: EvalConfig,
    settings: EvalSettings,
) -> tuple[TaskReport, list[dict]]:
    """A sweep's report (every pass's metrics and per-item rows) and its rows: per strength, the
    metrics, their difference from unedited (with the task's CI) and the fluency cost on neutral
    text (KL, perplexity; scope all, every strength in one widened pass)."""
    report = task.report(items, passes, cfg.split, settings)
    costs = fluency_costs(
        lm,
        neutral_text(lm, tokenizer),
        [Variant(editor, s) for s in strengths],
        settings.max_variants,
        cfg.strict,
    )
    rows = []
    for s, cost in zip(strengths, costs):
        pair = task.report(items, {"unedited": passes["unedited"], "edited": passes[_label(s)]}, cfg.split, settings)
        rows.append(
            {
                "strength": s,
                "kl": cost["kl"],
                "ppl": cost["ppl"],
                "ppl_unedited": cost["ppl_unedited"],
                "metrics": pair.metrics["edited"],
                "difference": pair.metrics["difference"],
            }
        )
    return report, rows


def _summary(
    task: Task,
    command: str,
    lm,
    editor_record,
    cfg: EvalConfig,
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
        "data": _data_record(task, cfg.data),
        "primer_sha256": hashlib.sha256(cfg.primer.encode()).hexdigest(),
        "split": {
            "name": cfg.split,
            "seed": cfg.seed,
            "scheme": selection.record["scheme"],
            "limit": cfg.limit,
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
