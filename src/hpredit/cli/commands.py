"""The jobs: each command is its options, one call into the library, and printing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..checks import DEFAULT_STRENGTH
from ..compare import compare as compare_job
from ..compare import markdown_table
from ..compare.methods import METHODS
from ..compare.protocols import DEFAULT_PROTOCOL
from ..evaluation import evaluate as evaluate_job
from ..pipeline import fit as fit_job
from ..pipeline import generate as generate_job
from ..pipeline import run as run_job
from . import options as o
from .app import app, command_line, console, err
from .show import accuracy_table, side_by_side_table, strength_line


@app.command()
def fit(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (editor/ inside).")],
    pairs: Annotated[
        Path | None, typer.Option("--pairs", help="JSONL of {prompt, positive, negative}; default TruthfulQA.")
    ] = None,
    model: o.Model = None,
    data: o.TruthfulQAData = None,
    split: Annotated[str, typer.Option(help="TruthfulQA split(s) to fit on, e.g. train+val.")] = "train+val",
    seed: o.Seed = 0,
    limit: o.Limit = None,
    layers: o.Layers = None,
    top_k: o.TopK = 5,
    epochs: o.Epochs = 5,
    train_seed: o.TrainSeed = 42,
    batch_size: o.BatchSize = 16,
    save_activations: o.SaveActivations = False,
    dtype: o.Dtype = "float32",
    store_dtype: o.StoreDtype = "auto",
    device: o.Device = None,
    device_map: o.DeviceMap = None,
    force: o.Force = False,
) -> None:
    """Fit an HPR editor on contrastive pairs (JSONL) or TruthfulQA and save it."""
    result = fit_job(
        out,
        pairs,
        model,
        data,
        split=split,
        seed=seed,
        limit=limit,
        layers=o.parse_layers(layers),
        top_k=top_k,
        epochs=epochs,
        train_seed=train_seed,
        batch_size=batch_size,
        save_activations=save_activations,
        dtype=dtype,
        store_dtype=store_dtype,
        device=device,
        device_map=device_map,
        force=force,
    )
    ed = result.editor
    console.print(accuracy_table(ed.probe_accuracy, ed.layers, "HPR probes"))
    t = result.timing
    console.print(f"editor saved to {out / 'editor'} ({t['collect_s']} s collecting, {t['fit_s']} s training)")


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    editor: o.Editor,
    model: o.Model = None,
    strength: o.OptionalStrength = None,
    kl: o.KL = None,
    scope: Annotated[
        str, typer.Option(help="all, last-prompt-and-generated or generated.")
    ] = "last-prompt-and-generated",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 40,
    qa: Annotated[bool, typer.Option(help="Wrap each prompt in the TruthfulQA QA format (primer, Q:, A:).")] = False,
    strict: o.Strict = True,
    dtype: o.Dtype = "float32",
    device: o.Device = None,
    device_map: o.DeviceMap = None,
) -> None:
    """Generate greedily with and without the editor and show both side by side."""
    result = generate_job(
        prompt,
        editor,
        model,
        strength=DEFAULT_STRENGTH if strength is None else strength,
        kl=kl,
        scope=scope,
        max_new_tokens=max_new_tokens,
        qa=qa,
        strict=strict,
        dtype=dtype,
        device=device,
        device_map=device_map,
    )
    if result.note:
        err.print(result.note, highlight=False, soft_wrap=True)
    console.print(side_by_side_table(result))


@app.command()
def run(
    out: o.Out = Path("out/run"),
    model: o.Model = None,
    data: o.TruthfulQAData = None,
    seed: o.Seed = 0,
    limit: o.Limit = None,
    top_k: o.TopK = 5,
    epochs: o.Epochs = 5,
    batch_size: o.BatchSize = 16,
    save_activations: o.SaveActivations = True,
    evaluate: Annotated[bool, typer.Option(help="Choose the strength on val and report MC1/2/3 on test.")] = True,
    strengths: o.Strengths = "0.25,0.5,1.0",
    kl_cap: o.KLCap = 0.5,
    max_halvings: o.MaxHalvings = None,
    protocol: o.Protocol = DEFAULT_PROTOCOL,
    kl_tol: o.KLTol = None,
    dtype: o.Dtype = "float32",
    store_dtype: o.StoreDtype = "auto",
    device: o.Device = None,
    device_map: o.DeviceMap = None,
    force: o.Force = False,
) -> None:
    """The main job: fit HPR on the TruthfulQA train split (layers by val probe accuracy), choose the
    strength on val by MC2 under a fluency-cost cap, report unedited vs edited on test; save to --out."""
    r = run_job(
        out,
        model,
        data,
        seed=seed,
        limit=limit,
        top_k=top_k,
        epochs=epochs,
        batch_size=batch_size,
        save_activations=save_activations,
        evaluate=evaluate,
        strengths=o.parse_list(strengths, "--strengths", float, "numbers"),
        kl_cap=kl_cap,
        max_halvings=max_halvings,
        protocol=protocol,
        kl_tol=kl_tol,
        dtype=dtype,
        store_dtype=store_dtype,
        device=device,
        device_map=device_map,
        force=force,
        command=command_line(),
    )
    title = "HPR on TruthfulQA: validation probe accuracy per layer"
    console.print(accuracy_table(r.val_probe_accuracy, r.layers_edited, title))
    if r.evaluation is not None:
        console.print(strength_line(r.evaluation.choice), highlight=False)
    console.print(
        f"{r.pairs} pairs from {r.questions['train']} train / {r.questions['val']} val questions; "
        f"edited layers {r.layers_edited}\n"
        f"time: {r.timing_s} s; activation store {r.activation_store_bytes / 1e6:.1f} MB, "
        f"editor {r.editor_bytes / 1e6:.1f} MB\nsaved to {out}"
    )


@app.command("eval")
def eval_(
    task: o.Task = "truthfulqa-mc",
    model: o.Model = None,
    editor: Annotated[
        Path | None,
        typer.Option(
            "--editor",
            "-e",
            parser=o.editor_dir,
            metavar="<path>",
            help="Editor directory: also evaluate edited, with the difference and its 95% CI.",
        ),
    ] = None,
    split: Annotated[
        str, typer.Option(help="test, val, train or all of the 40/10/50 split; fold0 or fold1 of ITI's 2-fold split.")
    ] = "test",
    seed: Annotated[int, typer.Option(help="Seed of the question split and of the bootstrap.")] = 0,
    limit: o.Limit = None,
    strength: o.OptionalStrength = None,
    kl: o.KL = None,
    scope: Annotated[
        str, typer.Option(help="Edited tokens: all (required for MC), last-prompt-and-generated or generated.")
    ] = "all",
    data: o.TaskData = None,
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
    strict: o.Strict = True,
    dtype: o.Dtype = "float32",
    device: o.Device = None,
    device_map: o.DeviceMap = None,
    force: o.Force = False,
) -> None:
    """Evaluate on a task (TruthfulQA MC or generation, BBQ, ToxiGen, refusal, A/B), unedited and,
    with --editor, edited."""
    judges = {name: path for name, path in (("truth", truth_judge), ("info", info_judge)) if path}
    evaluate_job(
        model=model,
        editor=editor,
        task=task,
        split=split,
        seed=seed,
        limit=limit,
        strength=DEFAULT_STRENGTH if strength is None else strength,
        kl=kl,
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
        command=command_line(),
    )


@app.command()
def compare(
    methods: Annotated[
        str,
        typer.Option(help=f"Comma-separated, of: {', '.join(METHODS)} (docs/methods.md)."),
    ] = "none,hpr,caa,caa-norm,iti",
    model: o.Model = None,
    task: o.Task = "truthfulqa-mc",
    seeds: Annotated[str, typer.Option(help="Comma-separated split seeds; mean ± std over them.")] = "0,1,2",
    protocol: o.Protocol = DEFAULT_PROTOCOL,
    targets: o.Targets = None,
    kl_tol: o.KLTol = None,
    steps: o.Steps = None,
    kl_cap: o.CompareKLCap = None,
    limit: o.Limit = None,
    refine: o.Refine = None,
    data: o.TaskData = None,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Writes results.json, table.md and a figure (task metric against KL) here."),
    ] = Path("out/compare"),
    dtype: o.Dtype = "float32",
    store_dtype: o.StoreDtype = "auto",
    device: o.Device = None,
    device_map: o.DeviceMap = None,
    force: o.Force = False,
) -> None:
    """Fit every method on train, compare on test at equal fluency cost (each --targets KL; --protocol grid:
    the strength chosen on validation under --kl-cap), with task metrics, KL and perplexity."""
    result = compare_job(
        model,
        None,
        methods=[x.strip() for x in methods.split(",") if x.strip()],
        seeds=o.parse_list(seeds, "--seeds", int, "integers"),
        task=task,
        data=data,
        kl_cap=kl_cap,
        limit=limit,
        refine=refine,
        out=out,
        protocol=protocol,
        targets=None if targets is None else o.parse_list(targets, "--targets", float, "numbers"),
        kl_tol=kl_tol,
        steps=steps,
        store_dtype=store_dtype,
        dtype=dtype,
        device=device,
        device_map=device_map,
        force=force,
        command=command_line(),
    )
    console.print(markdown_table(result))
    console.print(f"results in {out} ({result.seconds} s)")
