"""The jobs: each command is its config (options built from its fields), one call into the library, and printing."""

from __future__ import annotations

from ..compare import markdown_table
from ..compare.harness import CompareConfig
from ..compare.harness import compare as compare_job
from ..evaluation.job import EvalConfig
from ..evaluation.job import evaluate as evaluate_job
from ..pipeline import FitConfig, GenerateConfig, RunConfig
from ..pipeline import fit as fit_job
from ..pipeline import generate as generate_job
from ..pipeline import run as run_job
from .app import command_line, console, err
from .configs import job_command
from .show import accuracy_table, side_by_side_table, strength_line


@job_command(FitConfig)
def fit(cfg: FitConfig) -> None:
    """Fit an HPR editor on contrastive pairs (JSONL) or TruthfulQA and save it."""
    result = fit_job(cfg)
    ed = result.editor
    console.print(accuracy_table(ed.probe_accuracy, ed.layers, "HPR probes"))
    t = result.timing
    console.print(f"editor saved to {cfg.out / 'editor'} ({t['collect_s']} s collecting, {t['fit_s']} s training)")


@job_command(GenerateConfig)
def generate(cfg: GenerateConfig) -> None:
    """Generate greedily with and without the editor and show both side by side."""
    result = generate_job(config=cfg)
    if result.note:
        err.print(result.note, highlight=False, soft_wrap=True)
    console.print(side_by_side_table(result))


@job_command(RunConfig)
def run(cfg: RunConfig) -> None:
    """The main job: fit HPR on the TruthfulQA train split (layers by val probe accuracy), choose the
    strength on val by MC2 under a fluency-cost cap, report unedited vs edited on test; save to --out."""
    r = run_job(cfg, command=command_line())
    title = "HPR on TruthfulQA: validation probe accuracy per layer"
    console.print(accuracy_table(r.val_probe_accuracy, r.layers_edited, title))
    if r.evaluation is not None:
        console.print(strength_line(r.evaluation.choice), highlight=False)
    console.print(
        f"{r.pairs} pairs from {r.questions['train']} train / {r.questions['val']} val questions; "
        f"edited layers {r.layers_edited}\n"
        f"time: {r.timing_s} s; activation store {r.activation_store_bytes / 1e6:.1f} MB, "
        f"editor {r.editor_bytes / 1e6:.1f} MB\nsaved to {cfg.out}"
    )


@job_command(EvalConfig, "eval")
def eval_(cfg: EvalConfig) -> None:
    """Evaluate on a task (TruthfulQA MC or generation, BBQ, ToxiGen, refusal, A/B), unedited and,
    with --editor, edited."""
    evaluate_job(config=cfg, progress=True, show=True, command=command_line())


@job_command(CompareConfig)
def compare(cfg: CompareConfig) -> None:
    """Fit every method on train, compare on test at equal fluency cost (each --targets KL; --protocol grid:
    the strength chosen on validation under --kl-cap), with task metrics, KL and perplexity."""
    result = compare_job(config=cfg, command=command_line())
    console.print(markdown_table(result))
    console.print(f"results in {cfg.out} ({result.seconds} s)")
