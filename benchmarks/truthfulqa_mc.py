"""Time hpredit's TruthfulQA MC scorer on all 817 questions (unedited) and record MC1/MC2/MC3.

    python benchmarks/truthfulqa_mc.py --out benchmarks/results/truthfulqa_mc_all

Runs ``hpredit.evaluate`` (task truthfulqa-mc, split all) on the embedded SmolLM2-135M-Instruct in
float32 and writes to ``--out``: its ``summary.json`` and ``split.json``, and
``per_question_scores.jsonl`` (per question: index, MC1/MC2/MC3 and every answer's label and score,
without the question and answer texts, which stay in the dataset); and ``<out>.json`` with the
timing, the machine and the load average around the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from _common import DEFAULT_CSV, ROOT, command_line, cpu_name  # noqa: E402  (also sets TOKENIZERS_PARALLELISM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "truthfulqa_mc_all")
    args = parser.parse_args()

    import torch

    import hpredit
    from hpredit.files import atomic_directory

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = cpu_name()
    load_before = os.getloadavg()
    start = time.perf_counter()
    result = hpredit.evaluate(
        task="truthfulqa-mc",
        split="all",
        limit=args.limit,
        data=args.data,
        batch_size=args.batch_size,
        progress=True,
        show=True,
        command=command_line(),
    )
    wall = time.perf_counter() - start
    with atomic_directory(args.out) as tmp:
        (tmp / "summary.json").write_text(json.dumps(result.summary, indent=1) + "\n")
        (tmp / "split.json").write_text(json.dumps(result.split, indent=1) + "\n")
        with open(tmp / "per_question_scores.jsonl", "w") as f:
            for row in result.per_question:
                answers = [
                    {"label": a["label"], "best": a["best"], "score": a["score"]["unedited"]} for a in row["answers"]
                ]
                f.write(json.dumps({"index": row["index"], **row["unedited"], "answers": answers}) + "\n")
    record = {
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
        "command": command_line(),
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "questions": result["questions"],
        "metrics": {k.upper(): v for k, v in result.metrics["unedited"].items()},
        "seconds": {
            "scoring": result["timing_s"]["unedited"],
            "model_load": result["timing_s"]["load"],
            "end_to_end": round(wall, 2),
        },
        "answers_scored": result["answers_scored"],
        "answer_tokens": result["answer_tokens"],
        "boundary_merges": result["boundary_merges"],
        "mc1_ties": result["mc1_ties"]["unedited"],
    }
    Path(str(args.out) + ".json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
