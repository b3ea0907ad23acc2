"""hpredit's TruthfulQA MC scorer against lm-evaluation-harness, on the same questions, in one run.

lm-eval's ``truthfulqa_mc1``/``truthfulqa_mc2`` read the hub dataset's ``multiple_choice``
configuration, whose answer lists come from TruthfulQA's ``mc_task.json`` and differ from the
CSV. To compare like with like, this script writes a local dataset in that format from the CSV
(for the first ``--limit`` questions only, into a temporary directory, never into the repository):
``mc1_targets`` = [best answer] + incorrect answers, ``mc2_targets`` = correct + incorrect
answers, all cleaned exactly as hpredit cleans them, and two tasks that include lm-eval's own task
files (same prompt, same `` `` delimiter, same metrics) but point at that file. Nothing is
downloaded.

It then times, in one process on one model copy: hpredit cached (the default), lm-eval (HF
backend), hpredit cached again, and hpredit's uncached reference path; and compares per question
MC1, MC2 and every answer's log-likelihood.

    python benchmarks/lm_eval_compare.py --limit 40 --out benchmarks/results/lm_eval_compare_40.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from _common import DEFAULT_CSV, ROOT, command_line, cpu_name  # noqa: E402  (also sets TOKENIZERS_PARALLELISM)


def machine() -> dict:
    import torch

    cpu = cpu_name()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
    }


def write_task(tmp: Path, questions) -> list[str]:
    """The local dataset (JSON lines) and two lm-eval task files that include lm-eval's own."""
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa"
    data = tmp / "truthfulqa_mc_local.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for q in questions:
            mc1 = [q.best_answer, *q.incorrect_answers]
            mc2 = [*q.correct_answers, *q.incorrect_answers]
            f.write(
                json.dumps(
                    {
                        "question": q.question,
                        "mc1_targets": {"choices": mc1, "labels": [1] + [0] * len(q.incorrect_answers)},
                        "mc2_targets": {
                            "choices": mc2,
                            "labels": [1] * len(q.correct_answers) + [0] * len(q.incorrect_answers),
                        },
                    }
                )
                + "\n"
            )
    names = []
    for kind in ("mc1", "mc2"):
        name = f"hpredit_truthfulqa_{kind}"
        (tmp / f"{name}.yaml").write_text(
            f"include: {tasks_dir / f'truthfulqa_{kind}.yaml'}\n"
            f"task: {name}\n"
            "tag: []\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        )
        names.append(name)
    return names


def run_lm_eval(model_dir: Path, tmp: Path, tasks: list[str], batch_size: int) -> tuple[dict, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=tasks,
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp)),
    )
    return out, time.perf_counter() - start


def run_ours(model, tok, questions, cached: bool = True):
    from hpredit.evaluation import score_truthfulqa_mc

    start = time.perf_counter()
    scores = score_truthfulqa_mc(model, tok, questions, cached=cached)
    return scores, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=40, help="the first N questions of the CSV")
    parser.add_argument("--data", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--no-uncached", action="store_true", help="skip timing hpredit's uncached reference")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lm_eval_compare.json")
    args = parser.parse_args()

    import lm_eval
    import numpy as np
    import torch

    import hpredit
    from hpredit.data import load_truthfulqa

    if args.threads:
        torch.set_num_threads(args.threads)
    questions = load_truthfulqa(args.data)[: args.limit]
    model_dir = hpredit.models.embedded_default_path()
    info = {
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
        "command": command_line(),
        "machine": machine(),
        "questions": len(questions),
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "?",
        "torch": torch.__version__,
        "model": str(model_dir),
    }

    t0 = time.perf_counter()
    model, tok = hpredit.load_model()
    load_s = time.perf_counter() - t0
    run_ours(model, tok, questions[:2])  # warm-up
    ours, ours_s1 = run_ours(model, tok, questions)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = write_task(Path(tmp), questions)
        lm, lm_s = run_lm_eval(model_dir, Path(tmp), tasks, args.batch_size)
    _, ours_s2 = run_ours(model, tok, questions)
    uncached_s = None
    if not args.no_uncached:
        reference, uncached_s = run_ours(model, tok, questions, cached=False)
        ref_diff = max(
            abs(a.scores[k] - b.scores[k]) for a, b in zip(ours.questions, reference.questions) for k in a.scores
        )

    # per-question comparison
    samples = {t: sorted(lm["samples"][t], key=lambda s: s["doc_id"]) for t in tasks}
    mc1_lm = np.array([s["acc"] for s in samples[tasks[0]]], dtype=float)
    mc2_lm = np.array([s["acc"] for s in samples[tasks[1]]], dtype=float)
    mine = [q.metrics() for q in ours.questions]
    mc1_ours = np.array([m["mc1"] for m in mine])
    mc2_ours = np.array([m["mc2"] for m in mine])
    ll_diff = 0.0
    for q, s1, s2 in zip(ours.questions, samples[tasks[0]], samples[tasks[1]]):
        lls1 = [r[0][0] for r in s1["resps"]]
        lls2 = [r[0][0] for r in s2["resps"]]
        want1 = [q.scores[a] for a in [q.question.best_answer, *q.question.incorrect_answers]]
        want2 = q.true + q.false
        ll_diff = max(ll_diff, *(abs(float(a) - b) for a, b in zip(lls1 + lls2, want1 + want2)))
    ties = sum(q.mc1_tie() for q in ours.questions)
    ours_s = statistics.mean([ours_s1, ours_s2])
    result = {
        **info,
        "hpredit": {
            "MC1": float(mc1_ours.mean()),
            "MC2": float(mc2_ours.mean()),
            "MC3": float(np.mean([m["mc3"] for m in mine])),
            "seconds": [round(ours_s1, 2), round(ours_s2, 2)],
            "model_load_s": round(load_s, 2),
        },
        "lm_eval": {
            "MC1": float(mc1_lm.mean()),
            "MC2": float(mc2_lm.mean()),
            "seconds": round(lm_s, 2),
            "batch_size": args.batch_size,
            "reported": {t: lm["results"][t] for t in tasks},
        },
        "agreement": {
            "mc1_questions_differing": int((mc1_ours != mc1_lm).sum()),
            "mc1_mean_abs_diff": float(abs(mc1_ours.mean() - mc1_lm.mean())),
            "mc2_max_abs_diff_per_question": float(np.abs(mc2_ours - mc2_lm).max()),
            "mc2_mean_abs_diff": float(abs(mc2_ours.mean() - mc2_lm.mean())),
            "loglikelihood_max_abs_diff": ll_diff,
            "mc1_exact_ties": ties,
        },
        "speedup_vs_lm_eval": round(lm_s / ours_s, 1),
    }
    if uncached_s is not None:
        result["hpredit_uncached"] = {
            "seconds": round(uncached_s, 2),
            "max_abs_score_diff_vs_cached": ref_diff,
            "speedup_of_cached": round(uncached_s / ours_s, 1),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
