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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from rich.console import Console
from tqdm.auto import tqdm

from . import distributed
from .activations import ActivationStore, collect_activations
from .artifacts import atomic_directory
from .checks import (
    DEFAULT_STRENGTH,
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
from .compare.protocols import DEFAULT_PROTOCOL, SearchContext, run_rule
from .data import (
    ContrastivePairs,
    Question,
    QuestionSplit,
    check_truthfulqa_source,
    load_truthfulqa,
    qa_prompt,
    truthfulqa_pairs,
)
from .editors import Editor, HPREditor
from .editors.kl_curve import scope_note
from .errors import HpreditError
from .evaluation import evaluate as evaluate_task
from .evaluation.side_effects import neutral_text
from .evaluation.tasks import get_task
from .models import check_generation_length, load_model, pad_token_id
from .preflight import check_editor_for, check_model, check_out, check_top_k_and_layers
from .results import Provenance, RunEvaluation, RunResult, StrengthChoice

__all__ = [
    "FitResult",
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
    data: str | os.PathLike | None,
    cfg: RunConfig,
    out: Path,
    progress: bool,
    show: bool,
    command: str | None,
) -> tuple[RunEvaluation, float]:
    """Choose the strength on val, then evaluate unedited vs edited on test (written to ``out``);
    the evaluation and its seconds."""
    t0 = time.perf_counter()
    questions = load_truthfulqa(data)
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
        data=data,
        out=out,
        show=False,  # its "results written to" would name the temporary directory; run names its --out
        progress=progress,
        command=command,
    )
    if show and distributed.is_main():
        Console().print(result.table())
    return RunEvaluation(choice, result.metrics), round(time.perf_counter() - t0, 1)


# --------------------------------------------------------------------------- the jobs


@dataclass(frozen=True)
class RunConfig:
    """The main job's settings (:func:`run`'s defaults), checked on construction (:mod:`hpredit.checks`)."""

    seed: int = 0
    limit: int | None = None
    top_k: int = 5
    epochs: int = 5
    batch_size: int = 16
    save_activations: bool = True
    evaluate: bool = True
    strengths: tuple[float, ...] = (0.25, 0.5, 1.0)
    kl_cap: float = 0.5
    #: grid only (None: the default, 3; given under ``matched`` it is refused)
    max_halvings: int | None = None
    store_dtype: str = "auto"
    #: how the strength is chosen: ``matched`` (KL = the cap) or ``grid`` (best val MC2 under it)
    protocol: str = DEFAULT_PROTOCOL
    #: matched only: the relative tolerance on the cap (None: the default, 0.05; given under ``grid`` it is refused)
    kl_tol: float | None = None

    def __post_init__(self) -> None:
        run_rule(self.protocol, {})  # a known protocol
        if self.kl_tol is not None:
            check_kl_tol(self.kl_tol)
        if self.max_halvings is not None:
            check_count(self.max_halvings, "max_halvings", 0)
        _, options = run_rule(self.protocol, {"kl_tol": self.kl_tol, "max_halvings": self.max_halvings})
        for option, value in options.items():  # the protocol's defaults filled in
            object.__setattr__(self, option, value)
        check_seed(self.seed)
        check_count(self.epochs, "epochs")
        check_count(self.batch_size, "batch_size")
        check_limit(self.limit)
        object.__setattr__(self, "strengths", tuple(check_strengths(self.strengths)))
        check_kl_cap(self.kl_cap)
        check_store_dtype(self.store_dtype)
        check_count(self.top_k, "top_k")


def check_run_args(
    out: Path, model: Any, data: Any, cfg: RunConfig, device: str | None, device_map: Any, force: bool
) -> None:
    """What :func:`run` checks besides its settings before anything loads: the output directory, the
    model's config (no weights) and top-k against its layers, the TruthfulQA source."""
    check_out(out, force, (data, model))
    config = check_model(model, device, device_map)
    check_top_k_and_layers(config, cfg.top_k)
    check_truthfulqa_source(data)


def run(
    out: str | os.PathLike = "out/run",
    model: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    limit: int | None = None,
    top_k: int = 5,
    epochs: int = 5,
    batch_size: int = 16,
    save_activations: bool = True,
    evaluate: bool = True,
    strengths: Sequence[float] = (0.25, 0.5, 1.0),
    kl_cap: float = 0.5,
    max_halvings: int | None = None,
    dtype: str = "float32",
    store_dtype: str = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    force: bool = False,
    progress: bool = True,
    show: bool = True,
    command: str | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    kl_tol: float | None = None,
) -> RunResult:
    """The main job: fit HPR on TruthfulQA, choose the strength on val, report unedited vs edited on test.

    Fits HPR on the train split (``seed``-ed 40/10/50 split of the questions; the ``top_k``
    layers by validation probe accuracy), saves the editor, the activation store (with
    ``save_activations``) and the split to ``out``; then (with ``evaluate``) picks the strength
    whose KL on neutral text is ``kl_cap`` (within ``kl_tol``, relative, default 0.05; searched from
    ``strengths``), or with ``protocol="grid"`` the best validation MC2 among ``strengths`` whose KL
    is ≤ ``kl_cap`` (halving the smallest at most ``max_halvings`` times while all are over, default
    3), and
    evaluates MC1/MC2/MC3 unedited vs edited on the test split (``out/eval``). The strengths
    measured are saved with the editor as its strength → KL curve (``attach(model, kl=...)``).
    ``limit`` keeps the first N questions of each split (quick runs). The defaults are ``hpredit run``'s.
    ``kl_tol`` (matched only) and ``max_halvings`` (grid only) are refused under the other protocol.

    Args:
        out: the output directory, written whole at the end (``force`` replaces a non-empty one).
        model: a hub id, a local directory or None (the embedded SmolLM2-135M-Instruct).
        data: the TruthfulQA CSV (default ``$HPREDIT_TRUTHFULQA``, else the hub).
        dtype, device, device_map: how the model loads (:func:`hpredit.load_model`).
        store_dtype: the activation store's type (``auto``: float16 unless it would overflow).
        progress, show: progress bars on stderr; print the test table.
        command: the command line to record (default: this process's).

    Returns:
        A :class:`~hpredit.results.RunResult` (also ``out/summary.json``); ``result.editor`` is the
        fitted editor.
    """
    out = Path(out)
    cfg = RunConfig(
        seed,
        limit,
        top_k,
        epochs,
        batch_size,
        save_activations,
        evaluate,
        tuple(strengths),
        kl_cap,
        max_halvings,
        store_dtype,
        protocol,
        kl_tol,
    )
    check_run_args(out, model, data, cfg, device, device_map, force)
    provenance = Provenance.now(command)
    start = time.perf_counter()
    pairs = truthfulqa_pairs(split="train+val", seed=seed, path=data, limit=limit)
    lm, tok = load_model(model, dtype=dtype, device=device, device_map=device_map)
    t_load = time.perf_counter() - start
    with _whole_output(out) as tmp:
        fitted = fit_editor(
            lm,
            tok,
            pairs,
            tmp,
            top_k=top_k,
            epochs=epochs,
            batch_size=batch_size,
            store_dtype=store_dtype,
            save_activations=save_activations,
            device=device,
        )
        cast(QuestionSplit, pairs.split).save(tmp / "split.json")  # TruthfulQA pairs always carry their split
        evaluation, timing = None, dict(fitted.timing)
        if evaluate:
            evaluation, timing["eval_s"] = _evaluate_run(
                lm, tok, fitted.editor, pairs, data, cfg, tmp / "eval", progress, show, provenance.command
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


def fit(
    out: str | os.PathLike,
    pairs: str | os.PathLike | ContrastivePairs | None = None,
    model: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    *,
    split: str = "train+val",
    seed: int = 0,
    limit: int | None = None,
    layers: list[int] | None = None,
    top_k: int = 5,
    epochs: int = 5,
    train_seed: int = 42,
    batch_size: int = 16,
    save_activations: bool = False,
    dtype: str = "float32",
    store_dtype: str = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    force: bool = False,
) -> FitResult:
    """Fit an HPR editor on contrastive pairs (a JSONL file or :class:`ContrastivePairs`) or on
    TruthfulQA's ``split`` (``seed``-ed, the first ``limit`` questions) and save it to ``out/editor``
    (with ``split.json`` for TruthfulQA, ``activations/`` with ``save_activations``). The defaults
    are ``hpredit fit``'s."""
    out = Path(out)
    check_out(out, force, (pairs, data, model))
    check_seed(seed)
    check_seed(train_seed, "train_seed")
    check_count(epochs, "epochs")
    check_count(batch_size, "batch_size")
    check_limit(limit)
    check_store_dtype(store_dtype)
    config = check_model(model, device, device_map)
    check_top_k_and_layers(config, top_k, layers)
    if isinstance(pairs, ContrastivePairs):
        contrastive = pairs
    elif pairs is not None:
        contrastive = ContrastivePairs.from_jsonl(pairs)
    else:
        check_truthfulqa_source(data)
        contrastive = truthfulqa_pairs(split=split, seed=seed, path=data, limit=limit)
    lm, tok = load_model(model, dtype=dtype, device=device, device_map=device_map)
    with _whole_output(out) as tmp:
        fitted = fit_editor(
            lm,
            tok,
            contrastive,
            tmp,
            layers=layers,
            top_k=top_k,
            epochs=epochs,
            train_seed=train_seed,
            batch_size=batch_size,
            store_dtype=store_dtype,
            save_activations=save_activations,
            device=device,
        )
        if contrastive.split is not None:
            contrastive.split.save(tmp / "split.json")
    return FitResult(fitted.editor, out, fitted.timing)


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


def generate(
    prompts: Sequence[str],
    editor: str | os.PathLike | Editor,
    model: str | os.PathLike | None = None,
    *,
    strength: float = DEFAULT_STRENGTH,
    kl: float | None = None,
    scope: str = "last-prompt-and-generated",
    max_new_tokens: int = 40,
    qa: bool = False,
    strict: bool = True,
    dtype: str = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
) -> SideBySide:
    """Greedy continuations of ``prompts`` without and with ``editor`` (``qa``: each prompt wrapped
    in the TruthfulQA QA format and cut at the first blank line), at ``strength`` (default 1) or at
    the strength whose fluency cost is ``kl`` by the editor's measured curve (measured with scope
    ``all``: with another ``scope`` the result's ``note`` says so; ``kl`` is recorded in the result)."""
    empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise HpreditError(f"prompt {empty[0]} is empty: give some text to continue")
    check_count(max_new_tokens, "max_new_tokens")
    check_strength(strength)
    check_scope(scope)
    config = check_model(model, device, device_map)
    check_generation_length(max_new_tokens, config, named("max_new_tokens"))
    ed = check_editor_for(editor, config, model, strict)
    strength = ed.resolve_strength(strength, kl)
    note = None if kl is None else scope_note(kl, strength, scope)
    lm, tok = load_model(model, dtype=dtype, device=device, device_map=device_map)
    tok.padding_side = "left"
    enc = tok([qa_prompt(p) if qa else p for p in prompts], return_tensors="pt", padding=True).to(lm.device)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id(tok))
    if qa:  # a QA answer ends at the first blank line, before the next "Q:"
        kwargs.update(stop_strings=["\n\n"], tokenizer=tok)
    generate_ = cast(Any, lm).generate
    plain = generate_(**enc, **kwargs)
    with ed.attach(lm, strength=strength, scope=scope, strict=strict):
        edited = generate_(**enc, **kwargs)
    n = enc["input_ids"].shape[1]

    def text(ids: Any) -> str:
        return str(tok.decode(ids[n:], skip_special_tokens=True)).strip()

    rows = [(p, text(a), text(b)) for p, a, b in zip(prompts, plain, edited)]
    return SideBySide(ed, strength, scope, rows, kl, note)
