"""The ``hpredit`` command: a thin layer over the Python API.

Every argument, the model's config, the device, the data source and any editor artifact are
checked before a model loads or any work starts. Outputs are written whole or not at all (a
temporary sibling directory renamed at the end). User mistakes (:class:`HpreditError`) and usage
errors print one ``error:`` line and exit with status 2; Ctrl-C prints ``interrupted`` and exits
with 130, SIGTERM ``terminated`` and 143, both after removing temporary files.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import distributed
from .checks import MAX_STRENGTH, check_strength
from .errors import HpreditError

app = typer.Typer(
    help="Householder Pseudo-Rotation (HPR) activation editing for Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)

STORE_DTYPES = ("auto", "float16", "bfloat16", "float32")
_argv: list[str] | None = None  #: the arguments main() was called with (None: sys.argv)


def _command() -> str:
    """The command line being run, for the records (``hpredit ARGS``)."""
    from .provenance import command_line

    return command_line(None if _argv is None else ["hpredit", *_argv])


ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Hub id or local directory; default: the embedded SmolLM2-135M-Instruct."),
]
DataOpt = Annotated[
    Path | None,
    typer.Option("--data", help="TruthfulQA CSV (default: $HPREDIT_TRUTHFULQA, else the Hugging Face hub)."),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="The model's dtype: float32, float16, bfloat16 or auto.")]
StoreDtypeOpt = Annotated[
    str,
    typer.Option(
        "--store-dtype",
        help="Activation store type: auto (float16, or bfloat16 where float16 would "
        "overflow), float16, bfloat16 or float32.",
    ),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1, mps (default: cpu).")]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="Spread the model over devices with accelerate: auto, balanced, sequential, or a JSON "
        '{module: device} map (text or file; "disk" offloads). Excludes --device.',
    ),
]


# --------------------------------------------------------------------------- checks before any work


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HpreditError(f"--layers must be comma-separated integers, got {text!r}") from None
    dupes = sorted({i for i in layers if layers.count(i) > 1})
    if dupes:
        raise HpreditError(f"--layers lists layer(s) {dupes} more than once")
    return layers


def _check_layers(layers: list[int] | None, n_layers: int | None) -> None:
    if layers is None or n_layers is None:
        return
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise HpreditError(f"--layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise HpreditError(f"{name} must be at least {low}, got {value}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise HpreditError(f"--limit must be positive, got {limit}")


def _check_top_k(top_k: int, n_layers: int | None) -> None:
    _at_least("--top-k", top_k, 1)
    if n_layers is not None and top_k > n_layers:
        raise HpreditError(f"--top-k {top_k} is more than the model's {n_layers} layers")


def _check_strength(value: float, name: str = "--strength") -> float:
    return check_strength(value, name)


def _parse_list(text: str, option: str, kind: Callable[[str], Any], what: str) -> list:
    """A comma-separated option value as a non-empty list of ``kind``."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HpreditError(f"{option} must be comma-separated {what}, got {text!r}") from None
    if not values:
        raise HpreditError(f"{option} needs at least one value")
    return values


def _parse_strengths(text: str) -> list[float]:
    grid = _parse_list(text, "--strengths", float, "numbers")
    for s in grid:
        _check_strength(s, "each of --strengths")
    return grid


def _check_kl_cap(kl_cap: float) -> None:
    if not (kl_cap > 0) or not math.isfinite(kl_cap):
        raise HpreditError(f"--kl-cap must be a positive number, got {kl_cap}")


def _check_store_dtype(store_dtype: str) -> str:
    if store_dtype not in STORE_DTYPES:
        raise HpreditError(f"--store-dtype must be one of {', '.join(STORE_DTYPES)}, got {store_dtype!r}")
    return store_dtype


def _check_model(model: str | None, device: str | None, device_map: str | None = None) -> Any:
    """The device (or device map) is valid and the model's config is a causal LM (no weights
    loaded); the config."""
    from .models import check_model_source, check_placement

    check_placement(device, device_map)
    return check_model_source(model)


def _n_layers(config: Any) -> int | None:
    from .models import num_layers

    return num_layers(config)


def _check_out(out: Path, force: bool) -> None:
    """The output can be written (an existing file, a non-empty directory without --force and an
    unwritable place are refused); with --force, leftovers of an interrupted earlier write go."""
    from .artifacts import check_output_dir, remove_stale_temporaries

    check_output_dir(out, force)
    if force:
        remove_stale_temporaries(out)


def _check_editor(editor_dir: Path, config: Any, model: str | None, strict: bool):
    """Load the editor artifact and compare it with the model's config, before the model loads
    (the weight digest is compared once the model is loaded)."""
    from .editors import load_editor
    from .models import fingerprint_from_config

    ed = load_editor(editor_dir)
    problems = ed.model_fingerprint.mismatches(fingerprint_from_config(config, model), check_name=strict)
    if problems:
        hint = (
            " (pass --no-strict to ignore the name)"
            if strict and len(problems) == 1 and problems[0].startswith("name")
            else ""
        )
        raise HpreditError("editor does not match this model: " + "; ".join(problems) + hint)
    return ed


def _check_data(task: str, data: Path | None) -> None:
    from .evaluation.tasks import get_task

    get_task(task).check_source(data)


# --------------------------------------------------------------------------- shared pieces


def _accuracy_table(editor, title: str) -> Table:
    table = Table(title=title)
    table.add_column("layer", justify="right")
    table.add_column("val probe acc", justify="right")
    table.add_column("edited", justify="center")
    for layer, acc in sorted(editor.probe_accuracy.items()):
        table.add_row(str(layer), f"{acc:.3f}", "●" if layer in editor.layers else "")
    return table


def _fit_and_save(
    model,
    tok,
    pairs,
    out: Path,
    config_overrides: dict,
    batch_size: int,
    save_acts: bool,
    store_dtype: str,
    device: str | None = None,
) -> tuple:
    from . import collect_activations
    from .activations import ActivationStore
    from .editors import HPREditor

    t0 = time.perf_counter()
    acts = cast(ActivationStore, collect_activations(model, tok, pairs, batch_size=batch_size, dtype=store_dtype))
    t1 = time.perf_counter()
    editor = distributed.on_main(lambda: HPREditor.fit(acts, device=device, **config_overrides), "fitting HPR")
    t2 = time.perf_counter()
    if distributed.is_main():
        editor.save_pretrained(out / "editor")
        if save_acts:
            acts.save(out / "activations")
    timing = {"collect_s": round(t1 - t0, 1), "fit_s": round(t2 - t1, 1)}
    return acts, editor, timing


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


@contextmanager
def _whole_output(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into; renamed to ``out`` (replacing it) at the end,
    removed on any error or signal."""
    from .artifacts import atomic_directory

    if not distributed.is_main():  # under data parallelism rank 0 writes; the others' writes go nowhere
        with tempfile.TemporaryDirectory(prefix="hpredit-rank-") as scratch:
            yield Path(scratch)
        return
    with atomic_directory(out) as tmp:
        yield tmp


# --------------------------------------------------------------------------- commands


@app.command()
def fit(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (editor/ inside).")],
    pairs: Annotated[
        Path | None, typer.Option("--pairs", help="JSONL of {prompt, positive, negative}; default TruthfulQA.")
    ] = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    split: Annotated[str, typer.Option(help="TruthfulQA split(s) to fit on, e.g. train+val.")] = "train+val",
    seed: Annotated[int, typer.Option(help="Seed of the question split.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Use only the first N questions (quick runs).")] = None,
    layers: Annotated[str | None, typer.Option(help="Edit these layers (e.g. 10,12,14) instead of top-k.")] = None,
    top_k: Annotated[int, typer.Option(help="Edit the k layers with the best validation probe accuracy.")] = 5,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 5,
    train_seed: Annotated[int, typer.Option(help="Seed of training.")] = 42,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass when collecting.")] = 16,
    save_activations: Annotated[bool, typer.Option(help="Also save the activation store.")] = False,
    dtype: DtypeOpt = "float32",
    store_dtype: StoreDtypeOpt = "auto",
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out (as a whole).")] = False,
) -> None:
    """Fit an HPR editor on contrastive pairs (JSONL) or TruthfulQA and save it."""
    from . import data as data_mod
    from . import load_model

    _check_out(out, force)
    chosen = _parse_layers(layers)
    _at_least("--epochs", epochs, 1)
    _at_least("--batch-size", batch_size, 1)
    _check_limit(limit)
    _check_store_dtype(store_dtype)
    config = _check_model(model, device, device_map)
    _check_layers(chosen, _n_layers(config))
    _check_top_k(top_k, _n_layers(config))
    if pairs is not None:
        contrastive = data_mod.ContrastivePairs.from_jsonl(pairs)
    else:
        data_mod.check_truthfulqa_source(data)
        contrastive = data_mod.truthfulqa_pairs(split=split, seed=seed, path=data, limit=limit)
    m, tok = load_model(model, dtype=dtype, device=device, device_map=device_map)
    overrides = {"layers": chosen, "top_k": top_k, "epochs": epochs, "seed": train_seed}
    with _whole_output(out) as tmp:
        _, editor, timing = _fit_and_save(
            m, tok, contrastive, tmp, overrides, batch_size, save_activations, store_dtype, device
        )
        if contrastive.split is not None:
            contrastive.split.save(tmp / "split.json")
    console.print(_accuracy_table(editor, "HPR probes"))
    console.print(
        f"editor saved to {out / 'editor'} ({timing['collect_s']} s collecting, {timing['fit_s']} s training)"
    )


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    editor: Annotated[Path, typer.Option("--editor", "-e", help="Editor directory (from fit / run).")],
    model: ModelOpt = None,
    strength: Annotated[float, typer.Option(help=f"Edit strength α (|α| ≤ {MAX_STRENGTH:g}).")] = 1.0,
    scope: Annotated[
        str, typer.Option(help="all, last-prompt-and-generated or generated.")
    ] = "last-prompt-and-generated",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 40,
    qa: Annotated[bool, typer.Option(help="Wrap each prompt in the TruthfulQA QA format (primer, Q:, A:).")] = False,
    strict: Annotated[bool, typer.Option(help="Refuse a model whose name differs from the editor's.")] = True,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
) -> None:
    """Generate greedily with and without the editor and show both side by side."""
    from . import load_model
    from .data import qa_prompt
    from .hooks import check_scope
    from .models import pad_token_id

    empty = [i + 1 for i, p in enumerate(prompt) if not p.strip()]
    if empty:
        raise HpreditError(f"prompt {empty[0]} is empty: give some text to continue")
    _at_least("--max-new-tokens", max_new_tokens, 1)
    _check_strength(strength)
    check_scope(scope)
    config = _check_model(model, device, device_map)
    ed = _check_editor(editor, config, model, strict)
    m, tok = load_model(model, dtype=dtype, device=device, device_map=device_map)
    texts = [qa_prompt(p) if qa else p for p in prompt]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True).to(m.device)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id(tok))
    if qa:  # a QA answer ends at the first blank line, before the next "Q:"
        kwargs.update(stop_strings=["\n\n"], tokenizer=tok)
    generate_ = cast(Any, m).generate
    plain = generate_(**enc, **kwargs)
    with ed.attach(m, strength=strength, scope=scope, strict=strict):
        edited = generate_(**enc, **kwargs)
    n = enc["input_ids"].shape[1]
    table = Table(title=f"{ed.method.upper()} layers {ed.layers}, strength {strength}, scope {scope}", show_lines=True)
    table.add_column("prompt")
    table.add_column("unedited")
    table.add_column("edited")
    for p, a, b in zip(prompt, plain, edited):
        table.add_row(
            p,
            str(tok.decode(a[n:], skip_special_tokens=True)).strip(),
            str(tok.decode(b[n:], skip_special_tokens=True)).strip(),
        )
    console.print(table)


@app.command()
def run(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("out/run"),
    model: ModelOpt = None,
    data: DataOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the 40/10/50 question split.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Use only the first N train+val questions (quick runs).")] = None,
    top_k: Annotated[int, typer.Option(help="Layers to edit, chosen by validation probe accuracy.")] = 5,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass when collecting.")] = 16,
    save_activations: Annotated[bool, typer.Option(help="Also save the activation store.")] = True,
    evaluate: Annotated[bool, typer.Option(help="Choose the strength on val and report MC1/2/3 on test.")] = True,
    strengths: Annotated[str, typer.Option(help="Strengths tried on the validation questions.")] = "0.25,0.5,1.0",
    kl_cap: Annotated[
        float, typer.Option(help="Largest fluency cost (KL nats/token on neutral text) a chosen strength may have.")
    ] = 0.5,
    max_halvings: Annotated[
        int, typer.Option(help="While every strength is over the KL cap, halve the smallest, at most this often.")
    ] = 3,
    dtype: DtypeOpt = "float32",
    store_dtype: StoreDtypeOpt = "auto",
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out (as a whole).")] = False,
) -> None:
    """The main job: fit HPR on the TruthfulQA train split (layers by val probe accuracy), choose the
    strength on val by MC2 under a fluency-cost cap, report unedited vs edited on test; save to --out."""
    from . import load_model
    from .data import QuestionSplit, check_truthfulqa_source, truthfulqa_pairs
    from .provenance import machine, versions

    _check_out(out, force)
    _at_least("--epochs", epochs, 1)
    _at_least("--batch-size", batch_size, 1)
    _check_limit(limit)
    _at_least("--max-halvings", max_halvings, 0)
    grid = _parse_strengths(strengths)
    _check_kl_cap(kl_cap)
    _check_store_dtype(store_dtype)
    config = _check_model(model, device, device_map)
    _check_top_k(top_k, _n_layers(config))
    check_truthfulqa_source(data)
    start = time.perf_counter()
    pairs = truthfulqa_pairs(split="train+val", seed=seed, path=data, limit=limit)
    m, tok = load_model(model, dtype=dtype, device=device, device_map=device_map)
    t_load = time.perf_counter() - start
    with _whole_output(out) as tmp:
        acts, editor, timing = _fit_and_save(
            m, tok, pairs, tmp, {"top_k": top_k, "epochs": epochs}, batch_size, save_activations, store_dtype, device
        )
        split = cast(QuestionSplit, pairs.split)  # TruthfulQA pairs always carry their split
        split.save(tmp / "split.json")
        evaluation = None
        if evaluate:
            evaluation = _run_evaluation(
                m, tok, editor, pairs, data, seed, limit, grid, kl_cap, max_halvings, tmp / "eval"
            )
            timing["eval_s"] = evaluation.pop("seconds")
        summary = {
            "command": _command(),
            "hpredit_version": versions()["hpredit"],
            "versions": versions(),
            "machine": machine(),
            "model": editor.model_fingerprint.to_dict(),
            "split_seed": seed,
            "questions": {s: len({p.group for p in pairs if p.split == s}) for s in ("train", "val")},
            "pairs": len(pairs),
            "texts": len(acts.texts),
            "completion_tokens": acts.n_tokens,
            "store_dtype": store_dtype,
            "layers_edited": editor.layers,
            "val_probe_accuracy": editor.probe_accuracy,
            "timing_s": {"load": round(t_load, 1), **timing, "total": round(time.perf_counter() - start, 1)},
            "activation_store_bytes": _dir_size(tmp / "activations") if save_activations else acts.nbytes(),
            "editor_bytes": _dir_size(tmp / "editor"),
            "evaluation": evaluation,
        }
        from .artifacts import write_json_atomic

        write_json_atomic(tmp / "summary.json", summary)
    console.print(_accuracy_table(editor, "HPR on TruthfulQA: validation probe accuracy per layer"))
    console.print(
        f"{len(pairs)} pairs from {summary['questions']['train']} train / {summary['questions']['val']} val questions; "
        f"edited layers {editor.layers}\n"
        f"time: {summary['timing_s']} s; activation store {summary['activation_store_bytes'] / 1e6:.1f} MB, "
        f"editor {summary['editor_bytes'] / 1e6:.1f} MB\nsaved to {out}"
    )


def _run_evaluation(
    model,
    tok,
    editor,
    pairs,
    data,
    seed: int,
    limit: int | None,
    grid: list[float],
    kl_cap: float,
    max_halvings: int,
    out: Path,
) -> dict:
    """Pick the strength on the validation questions by MC2 among those whose fluency cost (KL on
    neutral text, as in ``compare``) is under ``kl_cap`` (halving the grid while all of it is over);
    then evaluate unedited vs edited on test, written to ``out``."""
    from tqdm.auto import tqdm

    from .compare import choose_strength
    from .data import load_truthfulqa
    from .evaluation import evaluate as run_evaluate
    from .evaluation.side_effects import neutral_text

    t0 = time.perf_counter()
    questions = load_truthfulqa(data)
    val = [questions[i] for i in pairs.split.val[: limit or None]]
    bar = tqdm(desc="strength on val: neutral text", unit="step")
    try:
        neutral = neutral_text(model, tok)

        def step(what: str) -> None:
            bar.set_description(f"strength on val ({len(val)} questions): {what}")
            bar.update()

        pick = choose_strength(
            model,
            tok,
            [editor],
            grid,
            val,
            neutral,
            kl_cap,
            max_doublings=0,
            max_halvings=max_halvings,
            log=lambda text: bar.write(f"validation: {text}"),
            progress=step,
        )
    finally:
        bar.close()
    best = pick["strength"]
    err.print(f"test: unedited and edited (strength {best}) …", highlight=False)
    result = run_evaluate(
        model=model,
        tokenizer=tok,
        editor=editor,
        task="truthfulqa-mc",
        split="test",
        seed=seed,
        limit=limit,
        strength=best,
        scope="all",
        data=data,
        out=out,
        show=True,
        progress=True,
        command=_command(),
    )
    return {
        "validation_sweep": pick["tried"],
        "kl_cap": kl_cap,
        "strength": best,
        "over_kl_cap": pick["over_kl_cap"],
        "test": result.metrics,
        "seconds": round(time.perf_counter() - t0, 1),
    }


@app.command("eval")
def eval_(
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="truthfulqa-mc (MC1/MC2/MC3), truthfulqa-gen (BLEU/ROUGE-L acc), bbq, toxigen, refusal or ab:NAME.",
        ),
    ] = "truthfulqa-mc",
    model: ModelOpt = None,
    editor: Annotated[
        Path | None,
        typer.Option(
            "--editor", "-e", help="Editor directory: also evaluate edited, with the difference and its 95% CI."
        ),
    ] = None,
    split: Annotated[
        str, typer.Option(help="test, val, train or all of the 40/10/50 split; fold0 or fold1 of ITI's 2-fold split.")
    ] = "test",
    seed: Annotated[int, typer.Option(help="Seed of the question split and of the bootstrap.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Use only the first N questions of the split.")] = None,
    strength: Annotated[float, typer.Option(help=f"Edit strength α (|α| ≤ {MAX_STRENGTH:g}).")] = 1.0,
    scope: Annotated[
        str, typer.Option(help="Edited tokens: all (required for MC), last-prompt-and-generated or generated.")
    ] = "all",
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="The task's data file (TruthfulQA: default $HPREDIT_TRUTHFULQA, else the hub; see docs/tasks.md).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write summary.json, per_question.jsonl and split.json here.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation: tokens per answer at most.")] = 50,
    batch_size: Annotated[int, typer.Option(help="Questions per batch (speed only; the numbers do not change).")] = 16,
    truth_judge: Annotated[
        str | None, typer.Option(help="Generation: local HF model judging truthfulness (prompt ends 'True:').")
    ] = None,
    info_judge: Annotated[
        str | None, typer.Option(help="Generation: local HF model judging informativeness (prompt ends 'Helpful:').")
    ] = None,
    strict: Annotated[bool, typer.Option(help="Refuse a model whose name differs from the editor's.")] = True,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    force: Annotated[bool, typer.Option(help="Overwrite a non-empty --out.")] = False,
) -> None:
    """Evaluate on a task (TruthfulQA MC or generation, BBQ, ToxiGen, refusal, A/B), unedited and,
    with --editor, edited."""
    from .evaluation import evaluate
    from .evaluation.api import check_eval_args
    from .evaluation.judges import INFO_TEMPLATE, TRUTH_TEMPLATE, HFJudge

    if (truth_judge or info_judge) and task != "truthfulqa-gen":
        raise HpreditError("--truth-judge/--info-judge apply to --task truthfulqa-gen only")
    if out is not None:
        _check_out(out, force)
    _check_strength(strength)
    _at_least("--batch-size", batch_size, 1)
    _at_least("--max-new-tokens", max_new_tokens, 1)
    check_eval_args(task, limit, scope, strength, editor, batch_size, max_new_tokens, 1)
    config = _check_model(model, device, device_map)
    _check_data(task, data)
    if editor is not None:
        _check_editor(editor, config, model, strict)
    judges = {}
    for name, judge_model, template in (("truth", truth_judge, TRUTH_TEMPLATE), ("info", info_judge, INFO_TEMPLATE)):
        if judge_model:
            judges[name] = HFJudge.from_pretrained(judge_model, template, dtype=dtype, device=device)
    evaluate(
        model=model,
        editor=editor,
        task=task,
        split=split,
        seed=seed,
        limit=limit,
        strength=strength,
        scope=scope,
        data=data,
        out=out,
        judges=judges or None,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        strict=strict,
        dtype=dtype,
        device=device,
        device_map=device_map,
        force=force,
        progress=True,
        show=True,
        command=_command(),
    )


@app.command()
def compare(
    methods: Annotated[
        str,
        typer.Option(help="Comma-separated: none, hpr, hpr-no-gate, hpr-fixed-angle, hpr-bias, caa, caa-norm, iti."),
    ] = "none,hpr,caa,caa-norm,iti",
    model: ModelOpt = None,
    task: Annotated[
        str,
        typer.Option(
            help="truthfulqa-mc, truthfulqa-gen, bbq, toxigen, refusal or ab:NAME (CAA's sets: ab:sycophancy, "
            "ab:refusal, ab:survival-instinct, …)."
        ),
    ] = "truthfulqa-mc",
    seeds: Annotated[str, typer.Option(help="Comma-separated split seeds; mean ± std over them.")] = "0,1,2",
    kl_cap: Annotated[
        float, typer.Option(help="Largest fluency cost (KL nats/token on neutral text) a chosen strength may have.")
    ] = 0.5,
    limit: Annotated[
        int | None, typer.Option(help="Use only the first N items (questions, pairs) of each split (quick runs).")
    ] = None,
    refine: Annotated[
        int,
        typer.Option(help="Bisection steps between the strongest strength under the KL cap and the weakest over it."),
    ] = 0,
    data: Annotated[
        Path | None, typer.Option("--data", help="Local data file of the task (default: see docs/tasks.md).")
    ] = None,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Writes results.json, table.md and a figure (task metric against KL) here."),
    ] = Path("out/compare"),
    dtype: DtypeOpt = "float32",
    store_dtype: StoreDtypeOpt = "auto",
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    force: Annotated[bool, typer.Option(help="Overwrite a non-empty --out.")] = False,
) -> None:
    """Fit every method on train, choose its strength on validation, compare on test (task metrics, KL, perplexity)."""
    from . import load_model
    from .compare import check_compare_args, markdown_table
    from .compare import compare as run_compare

    _check_out(out, force)
    method_list = [x.strip() for x in methods.split(",") if x.strip()]
    seed_list = _parse_list(seeds, "--seeds", int, "integers")
    _check_kl_cap(kl_cap)
    _check_limit(limit)
    _at_least("--refine", refine, 0)
    _check_store_dtype(store_dtype)
    check_compare_args(method_list, seed_list, kl_cap, limit, refine, task)
    _check_model(model, device, device_map)
    _check_data(task, data)
    m, tok = load_model(model, dtype=dtype, device=device, device_map=device_map)
    result = run_compare(
        m,
        tok,
        methods=method_list,
        seeds=seed_list,
        task=task,
        data=data,
        kl_cap=kl_cap,
        limit=limit,
        refine=refine,
        out=out,
        store_dtype=store_dtype,
    )
    console.print(markdown_table(result))
    console.print(f"results in {out} ({result['seconds']} s)")


def _lm_eval_model_args(args: list[str]) -> dict[str, str]:
    """``--model_args k=v,k=v`` of an lm-eval command line, as a dict."""
    for i, a in enumerate(args):
        if a == "--model_args" and i + 1 < len(args):
            text = args[i + 1]
        elif a.startswith("--model_args="):
            text = a.split("=", 1)[1]
        else:
            continue
        return dict(kv.split("=", 1) for kv in text.split(",") if "=" in kv)
    return {}


@app.command(
    "lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
)
def lm_eval_(ctx: typer.Context) -> None:
    """lm-evaluation-harness's own command line, with the model type `hpredit` registered.

    Every argument goes to lm-eval, for example: hpredit lm-eval run --model hpredit --model_args
    pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,editor=out/run/editor,strength=0.5 --tasks
    truthfulqa_mc2. Needs the lm-eval extra: pip install "hpredit[lm-eval]".
    """
    args = list(ctx.args)
    model_args = _lm_eval_model_args(args)
    if "hpredit" in args:  # our model type: check its arguments before lm-eval loads anything
        config = _check_model(model_args.get("pretrained") or None, model_args.get("device"))
        if model_args.get("strength"):
            try:
                _check_strength(float(model_args["strength"]), "strength")
            except ValueError:
                raise HpreditError(f"strength must be a number, got {model_args['strength']!r}") from None
        if model_args.get("editor"):
            _check_editor(
                Path(model_args["editor"]),
                config,
                model_args.get("pretrained") or None,
                model_args.get("strict", "true").lower() not in ("false", "0", "no"),
            )
    from lm_eval.__main__ import cli_evaluate

    from .evaluation import lm_eval_backend  # noqa: F401  (registers the model type)

    argv = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv


@app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    editor: Annotated[
        list[str],
        typer.Option(
            "--editor",
            help="Editor directory (from fit/run), or NAME=DIR; repeat for several editors (the first is the default).",
        ),
    ],
    model: ModelOpt = None,
    strength: Annotated[float, typer.Option("--strength", help="Default strength; a request may set its own.")] = 1.0,
    scope: Annotated[
        str, typer.Option("--scope", help="Default token scope: all, last-prompt-and-generated, generated.")
    ] = "all",
    no_strict: Annotated[
        bool, typer.Option("--no-strict", help="Do not require the model name to match the editor's.")
    ] = False,
) -> None:
    """vLLM's OpenAI-compatible server with the editor inside the engine (see docs/serving.md).

    Any other option goes to `vllm serve` (e.g. --port 8000 --dtype float32 --enforce-eager). Requests
    choose their editor and strength with the extra body {"vllm_xargs": {"editor": "NAME", "strength": 0.5}}.
    """
    from .serving import parse_editors
    from .serving import serve as run_server

    run_server(parse_editors(editor), model, strength, scope, list(ctx.args), strict=not no_strict)


# --------------------------------------------------------------------------- entry point


class Interrupted(BaseException):
    """Ctrl-C (SIGINT): not a KeyboardInterrupt, so that Click does not swallow it."""


class Terminated(BaseException):
    """SIGTERM, raised so that every ``finally`` (temporary directories) runs."""


def _raise(kind: type[BaseException]) -> Callable:
    def handler(signum, frame):
        raise kind()

    return handler


@contextmanager
def _signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise exceptions (cleaning up on the way out); the old handlers come back after."""
    installed = {}
    for sig, kind in ((signal.SIGINT, Interrupted), (signal.SIGTERM, Terminated)):
        try:
            installed[sig] = signal.signal(sig, _raise(kind))
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _usage_message(e: typer.TyperException) -> str:
    format_message = getattr(e, "format_message", None)
    message = " ".join((format_message() if callable(format_message) else str(e)).split())
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "hpredit"
    return f"{message} (see '{where} --help')"


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user mistakes into one line and exit status 2."""
    global _argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _argv = None if argv is None else list(argv)
    code: Any = 0
    try:
        if distributed.init() and not distributed.is_main():  # torchrun / accelerate launch: rank 0 speaks
            console.quiet = err.quiet = True
        with _signals():
            code = app(args=argv, standalone_mode=False, prog_name="hpredit")
    except HpreditError as e:
        _fail(str(e))
    except typer.TyperException as e:  # Click's usage errors (unknown option, bad number, missing value)
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:  # plain `hpredit`: the help
            console.print(ctx.get_help())
        else:
            _fail(_usage_message(e))
    except (Interrupted, KeyboardInterrupt, typer.Abort):
        err.print("interrupted", highlight=False)
        sys.exit(130)
    except Terminated:
        err.print("terminated", highlight=False)
        sys.exit(143)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
