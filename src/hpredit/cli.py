"""The ``hpredit`` command: a thin layer over the Python API.

User mistakes (:class:`HpreditError`) print one line and exit with status 2; nothing else.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import HpreditError

app = typer.Typer(
    help="Householder Pseudo-Rotation (HPR) activation editing for Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Hub id or local directory; default: the embedded SmolLM2-135M-Instruct."),
]
DataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", help="TruthfulQA CSV (default: $HPREDIT_TRUTHFULQA, else the Hugging Face hub)."),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, float16, bfloat16 or auto.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1, … (default: cpu).")]


def _layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HpreditError(f"--layers must be comma-separated integers, got {text!r}") from None


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not force:
        raise HpreditError(f"{out} already exists and is not empty: choose another --out or pass --force")


def _accuracy_table(editor, title: str) -> Table:
    table = Table(title=title)
    table.add_column("layer", justify="right")
    table.add_column("val probe acc", justify="right")
    table.add_column("edited", justify="center")
    for layer, acc in sorted(editor.probe_accuracy.items()):
        table.add_row(str(layer), f"{acc:.3f}", "●" if layer in editor.layers else "")
    return table


def _fit_and_save(model, tok, pairs, out: Path, config_overrides: dict, batch_size: int, save_acts: bool) -> tuple:
    from . import collect_activations
    from .editors import HPREditor

    t0 = time.perf_counter()
    acts = collect_activations(model, tok, pairs, batch_size=batch_size)
    t1 = time.perf_counter()
    editor = HPREditor.fit(acts, **config_overrides)
    t2 = time.perf_counter()
    editor.save_pretrained(out / "editor")
    if save_acts:
        acts.save(out / "activations")
    timing = {"collect_s": round(t1 - t0, 1), "fit_s": round(t2 - t1, 1)}
    return acts, editor, timing


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


@app.command()
def fit(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (editor/ inside).")],
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="JSONL of {prompt, positive, negative}; default TruthfulQA.")] = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    split: Annotated[str, typer.Option(help="TruthfulQA split(s) to fit on, e.g. train+val.")] = "train+val",
    seed: Annotated[int, typer.Option(help="Seed of the question split.")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N questions (quick runs).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Edit these layers (e.g. 10,12,14) instead of top-k.")] = None,
    top_k: Annotated[int, typer.Option(help="Edit the k layers with the best validation probe accuracy.")] = 5,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 5,
    train_seed: Annotated[int, typer.Option(help="Seed of training.")] = 42,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass when collecting.")] = 16,
    save_activations: Annotated[bool, typer.Option(help="Also save the activation store.")] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option(help="Overwrite a non-empty --out.")] = False,
) -> None:
    """Fit an HPR editor on contrastive pairs (JSONL) or TruthfulQA and save it."""
    from . import data as data_mod
    from . import load_model

    _check_out(out, force)
    if pairs is not None:
        contrastive = data_mod.ContrastivePairs.from_jsonl(pairs)
    else:
        contrastive = data_mod.truthfulqa_pairs(split=split, seed=seed, path=data, limit=limit)
    m, tok = load_model(model, dtype=dtype, device=device)
    overrides = {"layers": _layers(layers), "top_k": top_k, "epochs": epochs, "seed": train_seed}
    _, editor, timing = _fit_and_save(m, tok, contrastive, out, overrides, batch_size, save_activations)
    if contrastive.split is not None:
        contrastive.split.save(out / "split.json")
    console.print(_accuracy_table(editor, "HPR probes"))
    console.print(f"editor saved to {out / 'editor'} ({timing['collect_s']} s collecting, {timing['fit_s']} s training)")


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    editor: Annotated[Path, typer.Option("--editor", "-e", help="Editor directory (from fit / run).")],
    model: ModelOpt = None,
    strength: Annotated[float, typer.Option(help="Edit strength α.")] = 1.0,
    scope: Annotated[str, typer.Option(help="all, last-prompt-and-generated or generated.")] = "last-prompt-and-generated",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 40,
    qa: Annotated[bool, typer.Option(help="Wrap each prompt in the TruthfulQA QA format (primer, Q:, A:).")] = False,
    strict: Annotated[bool, typer.Option(help="Refuse a model whose name differs from the editor's.")] = True,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = None,
) -> None:
    """Generate greedily with and without the editor and show both side by side."""
    from . import load_editor, load_model
    from .data import qa_prompt

    ed = load_editor(editor)
    m, tok = load_model(model, dtype=dtype, device=device)
    texts = [qa_prompt(p) if qa else p for p in prompt]
    if max_new_tokens < 1:
        raise HpreditError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True).to(m.device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if qa:  # a QA answer ends at the first blank line, before the next "Q:"
        kwargs.update(stop_strings=["\n\n"], tokenizer=tok)
    plain = m.generate(**enc, **kwargs)
    with ed.attach(m, strength=strength, scope=scope, strict=strict):
        edited = m.generate(**enc, **kwargs)
    n = enc["input_ids"].shape[1]
    table = Table(title=f"{ed.method.upper()} layers {ed.layers}, strength {strength}, scope {scope}", show_lines=True)
    table.add_column("prompt")
    table.add_column("unedited")
    table.add_column("edited")
    for p, a, b in zip(prompt, plain, edited):
        table.add_row(p, tok.decode(a[n:], skip_special_tokens=True).strip(),
                      tok.decode(b[n:], skip_special_tokens=True).strip())
    console.print(table)


@app.command()
def run(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("out/run"),
    model: ModelOpt = None,
    data: DataOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the 40/10/50 question split.")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N train+val questions (quick runs).")] = None,
    top_k: Annotated[int, typer.Option(help="Layers to edit, chosen by validation probe accuracy.")] = 5,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass when collecting.")] = 16,
    save_activations: Annotated[bool, typer.Option(help="Also save the activation store.")] = True,
    evaluate: Annotated[bool, typer.Option(help="Choose the strength on val and report MC1/2/3 on test.")] = True,
    strengths: Annotated[str, typer.Option(help="Strengths tried on the validation questions.")] = "0.25,0.5,1.0",
    kl_cap: Annotated[float, typer.Option(help="Largest fluency cost (KL nats/token on neutral text) a chosen strength may have.")] = 0.5,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option(help="Overwrite a non-empty --out.")] = False,
) -> None:
    """The main job: fit HPR on the TruthfulQA train split (layers by val probe accuracy), choose the
    strength on val by MC2 under a fluency-cost cap, report unedited vs edited on test; save to --out."""
    from . import __version__, load_model
    from .data import truthfulqa_pairs

    _check_out(out, force)
    start = time.perf_counter()
    pairs = truthfulqa_pairs(split="train+val", seed=seed, path=data, limit=limit)
    m, tok = load_model(model, dtype=dtype, device=device)
    t_load = time.perf_counter() - start
    acts, editor, timing = _fit_and_save(
        m, tok, pairs, out, {"top_k": top_k, "epochs": epochs}, batch_size, save_activations
    )
    pairs.split.save(out / "split.json")
    evaluation = None
    if evaluate:
        evaluation = _run_evaluation(m, tok, editor, pairs, data, seed, limit, strengths, kl_cap, out)
        timing["eval_s"] = evaluation.pop("seconds")
    total = time.perf_counter() - start
    summary = {
        "command": "hpredit " + " ".join(sys.argv[1:]),
        "hpredit_version": __version__,
        "model": editor.model_fingerprint.to_dict(),
        "split_seed": seed,
        "questions": {s: len({p.group for p in pairs if p.split == s}) for s in ("train", "val")},
        "pairs": len(pairs),
        "texts": len(acts.texts),
        "completion_tokens": acts.n_tokens,
        "layers_edited": editor.layers,
        "val_probe_accuracy": editor.probe_accuracy,
        "timing_s": {"load": round(t_load, 1), **timing, "total": round(total, 1)},
        "activation_store_bytes": _dir_size(out / "activations") if save_activations else acts.nbytes(),
        "editor_bytes": _dir_size(out / "editor"),
        "evaluation": evaluation,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    console.print(_accuracy_table(editor, "HPR on TruthfulQA: validation probe accuracy per layer"))
    console.print(
        f"{len(pairs)} pairs from {summary['questions']['train']} train / {summary['questions']['val']} val questions; "
        f"edited layers {editor.layers}\n"
        f"time: {summary['timing_s']} s; activation store {summary['activation_store_bytes'] / 1e6:.1f} MB, "
        f"editor {summary['editor_bytes'] / 1e6:.1f} MB\nsaved to {out}"
    )


def _run_evaluation(model, tok, editor, pairs, data, seed: int, limit: int | None, strengths: str, kl_cap: float,
                    out: Path) -> dict:
    """Pick the strength on the validation questions by MC2 among those whose fluency cost (KL on
    neutral text, as in ``compare``) is under ``kl_cap``; then evaluate unedited vs edited on test."""
    from .compare import choose_strength
    from .data import load_truthfulqa
    from .evaluation import evaluate as run_evaluate
    from .evaluation.side_effects import neutral_text

    t0 = time.perf_counter()
    try:
        grid = [float(x) for x in strengths.split(",") if x.strip()]
    except ValueError:
        raise HpreditError(f"--strengths must be comma-separated numbers, got {strengths!r}") from None
    if not grid:
        raise HpreditError("--strengths needs at least one value")
    if not kl_cap > 0:
        raise HpreditError(f"--kl-cap must be positive, got {kl_cap}")
    questions = load_truthfulqa(data)
    val = [questions[i] for i in pairs.split.val[: limit or None]]
    pick = choose_strength(model, tok, [editor], grid, val, neutral_text(model, tok), kl_cap,
                           log=lambda text: console.print(f"validation: {text}"))
    best = pick["strength"]
    result = run_evaluate(model=model, tokenizer=tok, editor=editor, task="truthfulqa-mc", split="test", seed=seed,
                          limit=limit, strength=best, scope="all", data=data, out=out / "eval", show=True,
                          command="hpredit " + " ".join(sys.argv[1:]))
    return {"validation_sweep": pick["tried"], "kl_cap": kl_cap, "strength": best, "over_kl_cap": pick["over_kl_cap"],
            "test": result.metrics,
            "seconds": round(time.perf_counter() - t0, 1)}


@app.command("eval")
def eval_(
    task: Annotated[str, typer.Option("--task", help="truthfulqa-mc (MC1/MC2/MC3) or truthfulqa-gen (BLEU/ROUGE-L acc).")] = "truthfulqa-mc",
    model: ModelOpt = None,
    editor: Annotated[Optional[Path], typer.Option("--editor", "-e", help="Editor directory: also evaluate edited, with the difference and its 95% CI.")] = None,
    split: Annotated[str, typer.Option(help="test, val, train or all of the 40/10/50 split; fold0 or fold1 of ITI's 2-fold split.")] = "test",
    seed: Annotated[int, typer.Option(help="Seed of the question split and of the bootstrap.")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N questions of the split.")] = None,
    strength: Annotated[float, typer.Option(help="Edit strength α.")] = 1.0,
    scope: Annotated[str, typer.Option(help="Edited tokens: all (required for MC), last-prompt-and-generated or generated.")] = "all",
    data: DataOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write summary.json, per_question.jsonl and split.json here.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation: tokens per answer at most.")] = 50,
    batch_size: Annotated[int, typer.Option(help="Questions per batch (speed only; the numbers do not change).")] = 16,
    truth_judge: Annotated[Optional[str], typer.Option(help="Generation: local HF model judging truthfulness (prompt ends 'True:').")] = None,
    info_judge: Annotated[Optional[str], typer.Option(help="Generation: local HF model judging informativeness (prompt ends 'Helpful:').")] = None,
    strict: Annotated[bool, typer.Option(help="Refuse a model whose name differs from the editor's.")] = True,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option(help="Overwrite a non-empty --out.")] = False,
) -> None:
    """Evaluate on TruthfulQA (MC or generation), unedited and, with --editor, edited."""
    from .evaluation import evaluate
    from .evaluation.judges import INFO_TEMPLATE, TRUTH_TEMPLATE, HFJudge

    judges = {}
    if (truth_judge or info_judge) and task != "truthfulqa-gen":
        raise HpreditError("--truth-judge/--info-judge apply to --task truthfulqa-gen only")
    if out is not None:
        _check_out(out, force)
    for name, judge_model, template in (("truth", truth_judge, TRUTH_TEMPLATE), ("info", info_judge, INFO_TEMPLATE)):
        if judge_model:
            judges[name] = HFJudge.from_pretrained(judge_model, template, dtype=dtype, device=device)
    evaluate(
        model=model, editor=editor, task=task, split=split, seed=seed, limit=limit, strength=strength,
        scope=scope, data=data, out=out, judges=judges or None, max_new_tokens=max_new_tokens,
        batch_size=batch_size, strict=strict, dtype=dtype, device=device, force=force, progress=True,
        show=True, command="hpredit " + " ".join(sys.argv[1:]),
    )


@app.command()
def compare(
    methods: Annotated[str, typer.Option(help="Comma-separated: none, hpr, hpr-no-gate, hpr-fixed-angle, hpr-bias, caa, caa-norm, iti.")] = "none,hpr,caa,caa-norm,iti",
    model: ModelOpt = None,
    task: Annotated[str, typer.Option(help="truthfulqa-mc, bbq, toxigen, refusal or ab:NAME (CAA's sets: ab:sycophancy, ab:refusal, ab:survival-instinct, …).")] = "truthfulqa-mc",
    seeds: Annotated[str, typer.Option(help="Comma-separated split seeds; mean ± std over them.")] = "0,1,2",
    kl_cap: Annotated[float, typer.Option(help="Largest fluency cost (KL nats/token on neutral text) a chosen strength may have.")] = 0.5,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N items (questions, pairs) of each split (quick runs).")] = None,
    refine: Annotated[int, typer.Option(help="Bisection steps between the strongest strength under the KL cap and the weakest over it.")] = 0,
    data: Annotated[Optional[Path], typer.Option("--data", help="Local data file of the task (default: see docs/tasks.md).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Writes results.json, table.md and a figure (task metric against KL) here.")] = Path("out/compare"),
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option(help="Overwrite a non-empty --out.")] = False,
) -> None:
    """Fit every method on train, choose its strength on validation, compare on test (task metrics, KL, perplexity)."""
    from . import load_model
    from .compare import compare as run_compare
    from .compare import markdown_table
    from .evaluation.tasks import get_task

    _check_out(out, force)
    get_task(task)
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise HpreditError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    m, tok = load_model(model, dtype=dtype, device=device)
    result = run_compare(m, tok, methods=[x.strip() for x in methods.split(",") if x.strip()], seeds=seed_list,
                         task=task, data=data, kl_cap=kl_cap, limit=limit, refine=refine, out=out)
    console.print(markdown_table(result))
    console.print(f"results in {out} ({result['seconds']} s)")


@app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                          "help_option_names": []})
def lm_eval_(ctx: typer.Context) -> None:
    """lm-evaluation-harness's own command line, with the model type `hpredit` registered.

    Every argument goes to lm-eval, for example: hpredit lm-eval run --model hpredit --model_args
    pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,editor=out/run/editor,strength=0.5 --tasks
    truthfulqa_mc2. Needs the lm-eval extra: pip install "hpredit[lm-eval]".
    """
    from .evaluation import lm_eval_backend  # noqa: F401  (registers the model type)
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv
    sys.argv = ["lm-eval", *ctx.args]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv


@app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    editor: Annotated[Path, typer.Option("--editor", help="Editor directory (from fit/run).")],
    model: ModelOpt = None,
    strength: Annotated[float, typer.Option("--strength", help="Default strength; a request may set its own.")] = 1.0,
    scope: Annotated[str, typer.Option("--scope", help="Default token scope: all, last-prompt-and-generated, generated.")] = "all",
    no_strict: Annotated[bool, typer.Option("--no-strict", help="Do not require the model name to match the editor's.")] = False,
) -> None:
    """vLLM's OpenAI-compatible server with the editor inside the engine (see docs/serving.md).

    Any other option goes to `vllm serve` (e.g. --port 8000 --dtype float32 --enforce-eager). Requests
    choose their own strength with the extra body {"vllm_xargs": {"strength": 0.5}}.
    """
    from .serving import serve as run_server

    run_server(editor, model, strength, scope, list(ctx.args), strict=not no_strict)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user mistakes into one line and exit status 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, standalone_mode=True)
    except HpreditError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
