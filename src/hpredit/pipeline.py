"""The main job as a library function, and the other jobs the command line runs.

:func:`run` (``hpredit run``): fit HPR on the TruthfulQA train split → choose the strength on the
validation questions under a fluency-cost cap → test unedited vs edited → one
:class:`~hpredit.results.RunResult`, written whole. :func:`fit` (``hpredit fit``) is its first
half on any contrastive pairs; :func:`generate` (``hpredit generate``) shows an editor's effect
on a few prompts. Every argument, the model's config, the data source and any editor are checked
before the model loads; outputs appear whole when the job ends or not at all.

From Python, with ``hpredit run``'s defaults::

    result = hpredit.run(out="out/run", data="TruthfulQA.csv")     # hpredit.pipeline.run
    result.evaluation.choice.strength, result.evaluation.test["edited"]["mc2"]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from rich.console import Console
from tqdm.auto import tqdm

from . import distributed
from .activations import ActivationStore, collect_activations
from .checks import (
    DEFAULT_STRENGTH,
    MAX_COMBINED_EDITORS,
    check_count,
    check_kl_cap,
    check_kl_tol,
    check_limit,
    check_scope,
    check_seed,
    check_store_dtype,
    check_strength,
    check_strengths,
    named,
)
from .compare.protocols import DEFAULT_PROTOCOL, KL_TOL_HELP, PROTOCOL_HELP, SearchContext, run_rule
from .compare.strength import KL_CAP
from .config import (
    EDITOR_HELP,
    FORCE_HELP,
    KL_HELP,
    LIMIT_HELP,
    STORE_DTYPE_HELP,
    STRENGTH_HELP,
    STRICT_HELP,
    LoadOptions,
    comma_list,
    editor_dir,
    editor_strengths,
    given_path,
    option,
)
from .data import (
    ContrastivePairs,
    Question,
    QuestionSplit,
    check_truthfulqa_source,
    load_truthfulqa,
    qa_prompt,
    truthfulqa_pairs,
)
from .editors import Editor, HPREditor, attach_editors
from .editors.kl_curve import scope_note
from .errors import HpreditError
from .evaluation import evaluate as evaluate_task
from .evaluation.side_effects import neutral_text
from .evaluation.tasks import get_task
from .files import atomic_directory
from .models import check_generation_length, load_model, pad_token_id
from .preflight import check_editor_for, check_model, check_out, check_top_k_and_layers
from .results import Provenance, RunEvaluation, RunResult, StrengthChoice

__all__ = [
    "FitConfig",
    "FitResult",
    "GenerateConfig",
    "RunConfig",
    "Fitted",
    "SideBySide",
    "check_run_args",
    "choose_strength_on_val",
    "fit",
    "fit_editor",
    "generate",
    "run",
]


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


@contextmanager
def _whole_output(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into; renamed to ``out`` (replacing it) at the end,
    removed on any error or signal. Under data parallelism rank 0 writes; the others write nowhere."""
    if not distributed.is_main():
        with tempfile.TemporaryDirectory(prefix="hpredit-rank-") as scratch:
            yield Path(scratch)
        return
    with atomic_directory(out) as tmp:
        yield tmp


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# --------------------------------------------------------------------------- the steps


@dataclass
class Fitted:
    """An editor fitted on collected activations: the store, the editor, and the seconds of each step."""

    store: ActivationStore
    editor: HPREditor
    timing: dict[str, float]


def fit_editor(
    model: Any,
    tok: Any,
    pairs: ContrastivePairs,
    out: Path,
    *,
    layers: list[int] | None = None,
    top_k: int = 5,
    epochs: int = 5,
    train_seed: int | None = None,
    batch_size: int = 16,
    store_dtype: str = "auto",
    save_activations: bool = False,
    device: str | None = None,
) -> Fitted:
    """Collect activations of ``pairs`` → fit HPR (rank 0) → save ``out/editor`` (and ``out/activations``)."""
    t0 = time.perf_counter()
    store = cast(ActivationStore, collect_activations(model, tok, pairs, batch_size=batch_size, dtype=store_dtype))
    t1 = time.perf_counter()
    config: dict[str, Any] = {"top_k": top_k, "epochs": epochs}
    if layers is not None:
        config["layers"] = layers
    if train_seed is not None:
        config["seed"] = train_seed
    editor = distributed.on_main(lambda: HPREditor.fit(store, device=device, **config), "fitting HPR")
    t2 = time.perf_counter()
    if distributed.is_main():
        editor.save_pretrained(out / "editor")
        if save_activations:
            store.save(out / "activations")
    return Fitted(store, editor, {"collect_s": round(t1 - t0, 1), "fit_s": round(t2 - t1, 1)})


def choose_strength_on_val(
    model: Any,
    tok: Any,
    editor: Editor,
    val: list[Question],
    grid: Sequence[float],
    kl_cap: float,
    max_halvings: int | None,
    progress: bool = True,
    protocol: str = DEFAULT_PROTOCOL,
    kl_tol: float | None = None,
) -> StrengthChoice:
    """The main job's strength, by the rule of ``protocol`` (the one step to swap for another rule):

    - ``matched`` (the default): the strength whose fluency cost (KL on neutral text) is
      ``kl_cap`` within ``kl_tol`` (relative), found by the matched-cost search of ``compare``
      (:func:`hpredit.compare.match_cost`, warm-started from ``grid``; validation is not scored);
      an editor that cannot reach the cap gets the strength of the largest cost it reached
      (``status`` ``unreachable``), one whose search ran out of steps the measured KL nearest the
      cap (``closest``); ``kl_tol`` None: 0.05;
    - ``grid`` (the published numbers): the best validation MC2 among the grid's strengths whose
      cost is under ``kl_cap``, halving the grid while all of it is over, at most ``max_halvings``
      times (None: 3) (:func:`hpredit.compare.choose_strength`).

    Either way the strengths measured become the editor's :attr:`~hpredit.editors.Editor.kl_curve`.
    """
    bar = tqdm(desc="strength on val: neutral text", unit="step", disable=not progress)
    try:
        neutral = neutral_text(model, tok)

        def step(what: str) -> None:
            bar.set_description(f"strength on val ({len(val)} questions): {what}")
            bar.update()

        rule, defaults = run_rule(protocol, {})
        given = {"kl_tol": kl_tol, "max_halvings": max_halvings}  # the other protocol's is not used here
        options = {o: d if given.get(o) is None else given[o] for o, d in defaults.items()}
        ctx = SearchContext(model, tok, get_task("truthfulqa-mc"), neutral)
        return rule.choose_for_cap(
            ctx, editor, grid, val, kl_cap, options, lambda text: bar.write(f"{rule.log_label}: {text}"), step
        )
    finally:
        bar.close()


def _evaluate_run(
    model: Any,
    tok: Any,
    editor: Editor,
    pairs: ContrastivePairs,
    cfg: RunConfig,
    out: Path,
    progress: bool,
    show: bool,
    command: str | None,
) -> tuple[RunEvaluation, float]:
    """Choose the strength on val, then evaluate unedited vs edited on test (written to ``out``);
    the evaluation and its seconds."""
    t0 = time.perf_counter()
    questions = load_truthfulqa(cfg.data)
    val = [questions[i] for i in cast(QuestionSplit, pairs.split).val[: cfg.limit or None]]
    choice = choose_strength_on_val(
        model, tok, editor, val, cfg.strengths, cfg.kl_cap, cfg.max_halvings, progress, cfg.protocol, cfg.kl_tol
    )
    if show:
        _stderr(f"test: unedited and edited (strength {choice.strength}) …")
    result = evaluate_task(
        model=model,
        tokenizer=tok,
        editor=editor,
        task="truthfulqa-mc",
        split="test",
        seed=cfg.seed,
        limit=cfg.limit,
        strength=choice.strength,
        scope="all",
        data=cfg.data,
        out=out,
        show=False,  # its "results written to" would name the temporary directory; run names its --out
        progress=progress,
        command=command,
    )
    if show and distributed.is_main():
        Console().print(result.table())
    return RunEvaluation(choice, result.metrics), round(time.perf_counter() - t0, 1)


# --------------------------------------------------------------------------- the jobs


@dataclass(frozen=True, kw_only=True)
class _FitOptions(LoadOptions):
    """What fitting HPR on TruthfulQA takes, in :func:`fit` and :func:`run` alike."""

    data: str | Path | None = option(
        None, "TruthfulQA CSV (default: $HPREDIT_TRUTHFULQA, else the Hugging Face hub).", parse=given_path("file")
    )
    seed: int = option(0, "Seed of the 40/10/50 question split.")
    limit: int | None = option(None, LIMIT_HELP)
    top_k: int = option(5, "Edit the k layers with the best validation probe accuracy.")
    epochs: int = option(5, "Training epochs.")
    batch_size: int = option(16, "Texts per forward pass when collecting.")
    store_dtype: str = option("auto", STORE_DTYPE_HELP)
    force: bool = option(False, FORCE_HELP)

    def check(self) -> None:
        check_seed(self.seed)
        check_count(self.epochs, "epochs")
        check_count(self.batch_size, "batch_size")
        check_limit(self.limit)
        check_store_dtype(self.store_dtype)
        check_count(self.top_k, "top_k")


@dataclass(frozen=True, kw_only=True)
class RunConfig(_FitOptions):
    """The main job's settings (``hpredit run``'s options), checked when made (:mod:`hpredit.checks`)."""

    out: Path = option(Path("out/run"), "Output directory.", flags=("--out", "-o"))
    save_activations: bool = option(True, "Also save the activation store.")
    evaluate: bool = option(True, "Choose the strength on val and report MC1/2/3 on test.")
    strengths: tuple[float, ...] = option(
        (0.25, 0.5, 1.0), "Strengths tried on the validation questions.", parse=comma_list(float, "numbers")
    )
    kl_cap: float = option(
        KL_CAP,
        "The fluency cost (KL nats/token on neutral text): --protocol matched, the cost aimed at; "
        "grid, the largest a chosen strength may have.",
    )
    #: grid only (None: the protocol's default, filled in when made; given under ``matched`` it is refused)
    max_halvings: int | None = option(
        None,
        "Grid only: while every strength is over the KL cap, halve the smallest, at most this often "
        "(default 3); refused with --protocol matched.",
    )
    protocol: str = option(DEFAULT_PROTOCOL, PROTOCOL_HELP)
    #: matched only: the relative tolerance on the cap (None: the default, filled in; refused under ``grid``)
    kl_tol: float | None = option(None, KL_TOL_HELP)

    def check(self) -> None:
        run_rule(self.protocol, {})  # a known protocol
        if self.kl_tol is not None:
            check_kl_tol(self.kl_tol)
        if self.max_halvings is not None:
            check_count(self.max_halvings, "max_halvings", 0)
        _, options = run_rule(self.protocol, {"kl_tol": self.kl_tol, "max_halvings": self.max_halvings})
        for name, value in options.items():  # the protocol's defaults filled in
            self._set(name, value)
        super().check()
        self._set("out", Path(self.out))
        self._set("strengths", tuple(check_strengths(self.strengths)))
        check_kl_cap(self.kl_cap)


def check_run_args(cfg: RunConfig) -> None:
    """What :func:`run` checks besides its settings before anything loads: the output directory, the
    model's config (no weights) and top-k against its layers, the TruthfulQA source."""
    check_out(cfg.out, cfg.force, (cfg.data, cfg.model))
    config = check_model(cfg.model, cfg.device, cfg.device_map)
    check_top_k_and_layers(config, cfg.top_k)
    check_truthfulqa_source(cfg.data)


def run(
    config: RunConfig | None = None,
    /,
    *,
    progress: bool = True,
    show: bool = True,
    command: str | None = None,
    **fields: Any,
) -> RunResult:
    """The main job: fit HPR on TruthfulQA, choose the strength on val, report unedited vs edited on test.

    Fits HPR on the train split (``seed``-ed 40/10/50 split; the ``top_k`` layers by validation
    probe accuracy) and saves it with the split (and activations) to ``out``; then (``evaluate``)
    picks the strength whose KL on neutral text is ``kl_cap`` (``protocol="grid"``: the best
    validation MC2 under it, :func:`choose_strength_on_val`) and evaluates MC1/2/3 unedited vs
    edited on test (``out/eval``). The strengths measured become the editor's strength → KL curve.

    Args:
        config: the settings (:class:`RunConfig`: ``hpredit run``'s defaults), or its fields as
            keywords (``run(out="out/run", data="TruthfulQA.csv")``; they also replace a ``config``'s).
        progress, show: progress bars on stderr; print the test table.
        command: the command line to record (default: this process's).

    Returns:
        A :class:`~hpredit.results.RunResult` (also ``out/summary.json``); ``result.editor`` is the
        fitted editor.
    """
    cfg = RunConfig.of(config, fields)
    check_run_args(cfg)
    provenance = Provenance.now(command)
    start = time.perf_counter()
    pairs = truthfulqa_pairs(split="train+val", seed=cfg.seed, path=cfg.data, limit=cfg.limit)
    lm, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map)
    t_load = time.perf_counter() - start
    with _whole_output(cfg.out) as tmp:
        fitted = fit_editor(
            lm,
            tok,
            pairs,
            tmp,
            top_k=cfg.top_k,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            store_dtype=cfg.store_dtype,
            save_activations=cfg.save_activations,
            device=cfg.device,
        )
        cast(QuestionSplit, pairs.split).save(tmp / "split.json")  # TruthfulQA pairs always carry their split
        evaluation, timing = None, dict(fitted.timing)
        if cfg.evaluate:
            evaluation, timing["eval_s"] = _evaluate_run(
                lm, tok, fitted.editor, pairs, cfg, tmp / "eval", progress, show, provenance.command
            )
            if distributed.is_main():  # again, now with the strength → KL curve the search measured
                fitted.editor.save_pretrained(tmp / "editor")
        result = _run_result(provenance, fitted, pairs, cfg, tmp, evaluation)
        result.timing_s = {"load": round(t_load, 1), **timing, "total": round(time.perf_counter() - start, 1)}
        if distributed.is_main():
            result.save(tmp)
    return result


def _run_result(
    provenance: Provenance, fitted: Fitted, pairs: ContrastivePairs, cfg: RunConfig, tmp: Path, evaluation
) -> RunResult:
    editor, store = fitted.editor, fitted.store
    return RunResult(
        provenance=provenance,
        model=editor.model_fingerprint.to_dict(),
        split_seed=cfg.seed,
        questions={s: len({p.group for p in pairs if p.split == s}) for s in ("train", "val")},
        pairs=len(pairs),
        texts=len(store.texts),
        completion_tokens=store.n_tokens,
        store_dtype=cfg.store_dtype,
        layers_edited=editor.layers,
        val_probe_accuracy=editor.probe_accuracy,
        timing_s={},
        activation_store_bytes=_dir_size(tmp / "activations") if cfg.save_activations else store.nbytes(),
        editor_bytes=_dir_size(tmp / "editor"),
        evaluation=evaluation,
        editor=editor,
    )


@dataclass
class FitResult:
    """What :func:`fit` returns: the editor (saved to ``out/editor``) and the seconds of each step."""

    editor: HPREditor
    out: Path
    timing: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class FitConfig(_FitOptions):
    """``hpredit fit``'s settings: HPR on contrastive pairs (JSONL or :class:`ContrastivePairs`) or TruthfulQA."""

    out: Path = option(help="Output directory (editor/ inside).", flags=("--out", "-o"))
    pairs: str | Path | ContrastivePairs | None = option(
        None, "JSONL of {prompt, positive, negative}; default TruthfulQA.", parse=given_path("file")
    )
    split: str = option("train+val", "TruthfulQA split(s) to fit on, e.g. train+val.")
    layers: tuple[int, ...] | None = option(
        None, "Edit these layers (e.g. 10,12,14) instead of top-k.", parse=comma_list(int, "integers", empty=None)
    )
    train_seed: int = option(42, "Seed of training.")
    save_activations: bool = option(False, "Also save the activation store.")

    def check(self) -> None:
        super().check()
        self._set("out", Path(self.out))
        check_seed(self.train_seed, "train_seed")


def fit(config: FitConfig | None = None, /, **fields: Any) -> FitResult:
    """Fit an HPR editor on contrastive pairs (a JSONL file or :class:`ContrastivePairs`) or on
    TruthfulQA's ``split`` (``seed``-ed, the first ``limit`` questions) and save it to ``out/editor``
    (with ``split.json`` for TruthfulQA, ``activations/`` with ``save_activations``). ``config``: a
    :class:`FitConfig` (its defaults are ``hpredit fit``'s), or its fields as keywords."""
    cfg = FitConfig.of(config, fields)
    check_out(cfg.out, cfg.force, (cfg.pairs, cfg.data, cfg.model))
    model_config = check_model(cfg.model, cfg.device, cfg.device_map)
    layers = None if cfg.layers is None else list(cfg.layers)
    check_top_k_and_layers(model_config, cfg.top_k, layers)
    contrastive = _fit_pairs(cfg)
    lm, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map)
    with _whole_output(cfg.out) as tmp:
        fitted = fit_editor(
            lm,
            tok,
            contrastive,
            tmp,
            layers=layers,
            top_k=cfg.top_k,
            epochs=cfg.epochs,
            train_seed=cfg.train_seed,
            batch_size=cfg.batch_size,
            store_dtype=cfg.store_dtype,
            save_activations=cfg.save_activations,
            device=cfg.device,
        )
        if contrastive.split is not None:
            contrastive.split.save(tmp / "split.json")
    return FitResult(fitted.editor, cfg.out, fitted.timing)


def _fit_pairs(cfg: FitConfig) -> ContrastivePairs:
    """The pairs to fit on: as given, read from a JSONL file, or TruthfulQA's split (its source checked)."""
    if isinstance(cfg.pairs, ContrastivePairs):
        return cfg.pairs
    if cfg.pairs is not None:
        return ContrastivePairs.from_jsonl(cfg.pairs)
    check_truthfulqa_source(cfg.data)
    return truthfulqa_pairs(split=cfg.split, seed=cfg.seed, path=cfg.data, limit=cfg.limit)


@dataclass
class SideBySide:
    """Greedy continuations without and with an editor: ``rows`` of ``(prompt, unedited, edited)``."""

    editor: Editor
    strength: float
    scope: str
    rows: list[tuple[str, str, str]]
    kl: float | None = None  #: the fluency cost asked for instead of a strength (``strength``: what it converted to)
    #: one line when ``kl`` was converted through a curve measured with another scope (``all``)
    note: str | None = None
    #: further editors and their strengths, applied after ``editor`` (``GenerateConfig.also``)
    also: list[tuple[Editor, float]] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(LoadOptions):
    """``hpredit generate``'s settings: prompts continued greedily without and with an editor."""

    prompts: tuple[str, ...] = option(help="One or more prompts.", argument=True)
    editor: str | Path | Editor = option(help=EDITOR_HELP, flags=("--editor", "-e"), parse=editor_dir, metavar="<path>")
    strength: float = option(DEFAULT_STRENGTH, STRENGTH_HELP, cli_default=None)  # None: not given (see --kl)
    kl: float | None = option(None, KL_HELP)
    scope: str = option("last-prompt-and-generated", "all, last-prompt-and-generated or generated.")
    max_new_tokens: int = option(40, "Tokens to generate.")
    qa: bool = option(False, "Wrap each prompt in the TruthfulQA QA format (primer, Q:, A:).")
    strict: bool = option(True, STRICT_HELP)
    also: tuple[tuple[str | Path | Editor, float], ...] = option(
        (),
        "Further editors, each at its own strength, applied after --editor where they share a layer, in the "
        "order given: DIR=STRENGTH, comma-separated.",
        parse=editor_strengths,
        metavar="<dir=strength,...>",
    )

    def check(self) -> None:
        self._set("prompts", tuple(self.prompts))
        self._set("also", tuple(tuple(pair) for pair in self.also))
        for pair in self.also:
            if len(pair) != 2:
                raise HpreditError(f"{named('also')} takes (editor, strength) pairs, got {pair!r}")
            check_strength(pair[1], f"the strength of {pair[0]} in {named('also')}")
        if len(self.also) >= MAX_COMBINED_EDITORS:
            raise HpreditError(f"{named('also')}: at most {MAX_COMBINED_EDITORS} editors at once, --editor included")
        empty = [i + 1 for i, p in enumerate(self.prompts) if not p.strip()]
        if empty:
            raise HpreditError(f"prompt {empty[0]} is empty: give some text to continue")
        check_count(self.max_new_tokens, "max_new_tokens")
        check_strength(self.strength)
        check_scope(self.scope)


def generate(
    prompts: Sequence[str] | None = None,
    editor: str | os.PathLike | Editor | None = None,
    model: str | os.PathLike | None = None,
    *,
    config: GenerateConfig | None = None,
    **fields: Any,
) -> SideBySide:
    """Greedy continuations of ``prompts`` without and with ``editor`` (``qa``: each prompt wrapped
    in the TruthfulQA QA format and cut at the first blank line), at ``strength`` (default 1) or at
    the strength whose fluency cost is ``kl`` by the editor's measured curve (measured with scope
    ``all``: with another ``scope`` the result's ``note`` says so; ``kl`` is recorded in the result).
    ``config``: a :class:`GenerateConfig` (its defaults are ``hpredit generate``'s), or its fields as
    keywords (``generate(["Hi"], "out/editor", strength=0.5)``); ``also=[(dir_or_editor, strength), ...]``:
    further editors applied after ``editor`` (:func:`~hpredit.editors.base.attach_editors`)."""
    given = {"prompts": prompts, "editor": editor, "model": model}
    cfg = GenerateConfig.of(config, {**{k: v for k, v in given.items() if v is not None}, **fields})
    model_config = check_model(cfg.model, cfg.device, cfg.device_map)
    check_generation_length(cfg.max_new_tokens, model_config, named("max_new_tokens"))
    ed = check_editor_for(cfg.editor, model_config, cfg.model, cfg.strict)
    also = [(check_editor_for(e, model_config, cfg.model, cfg.strict), float(s)) for e, s in cfg.also]
    strength = ed.resolve_strength(cfg.strength, cfg.kl)
    note = None if cfg.kl is None else scope_note(cfg.kl, strength, cfg.scope)
    lm, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map)
    tok.padding_side = "left"
    prompts = [qa_prompt(p) if cfg.qa else p for p in cfg.prompts]
    enc = tok(prompts, return_tensors="pt", padding=True).to(lm.device)
    kwargs: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=pad_token_id(tok))
    if cfg.qa:  # a QA answer ends at the first blank line, before the next "Q:"
        kwargs.update(stop_strings=["\n\n"], tokenizer=tok)
    generate_ = cast(Any, lm).generate
    plain = generate_(**enc, **kwargs)
    if also:
        handle = attach_editors(lm, [(ed, strength), *also], scope=cfg.scope, strict=cfg.strict)
    else:
        handle = ed.attach(lm, strength=strength, scope=cfg.scope, strict=cfg.strict)
    with handle:
        edited = generate_(**enc, **kwargs)
    n = enc["input_ids"].shape[1]

    def text(ids: Any) -> str:
        return str(tok.decode(ids[n:], skip_special_tokens=True)).strip()

    rows = [(p, text(a), text(b)) for p, a, b in zip(cfg.prompts, plain, edited)]
    return SideBySide(ed, strength, cfg.scope, rows, cfg.kl, note, also)
