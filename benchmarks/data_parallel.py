"""Speed-up of data parallelism: N processes × 1 thread against 1 process × 1 thread, same numbers.

    python benchmarks/data_parallel.py --ranks 2 --collect-limit 120 --out benchmarks/results/data_parallel.json

Two jobs on the embedded SmolLM2-135M-Instruct (float32): collecting activations of the TruthfulQA
train+val pairs of the first ``--collect-limit`` questions (all 30 layers, prefix-cached), and
TruthfulQA MC on all 817 questions (unedited). Each job runs first in one process, then under
``torchrun --nproc-per-node N``, alternating ``--rounds`` times; the record keeps every wall time,
the median speed-up, and whether the outputs agree (activation store bit for bit, MC metrics and
per-question scores to float rounding).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_CSV, emit, run_record  # noqa: E402  (also sets TOKENIZERS_PARALLELISM)


def worker(job: str, data: Path, limit: int, out: Path) -> None:
    """One job in this process (or as one rank); rank 0 writes timing and a digest of the result."""
    import torch

    import hpredit
    from hpredit import distributed
    from hpredit.data import truthfulqa_pairs

    distributed.init()
    torch.set_num_threads(1)
    model, tok = hpredit.load_model()
    if job == "collect":
        pairs = truthfulqa_pairs(split="train+val", seed=0, path=data, limit=limit)
        start = time.perf_counter()
        store = hpredit.collect_activations(model, tok, pairs, progress=False)
        wall = time.perf_counter() - start
        digest = hashlib.sha256(store.acts.view(torch.int16).numpy().tobytes()).hexdigest()
        result = {"texts": len(store.texts), "tokens": store.n_tokens, "acts_sha256": digest}
    else:
        start = time.perf_counter()
        evaluation = hpredit.evaluate(
            model=model, tokenizer=tok, task="truthfulqa-mc", split="all", data=data, show=False
        )
        wall = time.perf_counter() - start
        scores = [[a["score"]["unedited"] for a in q["answers"]] for q in evaluation.per_question]
        result = {"questions": len(scores), "metrics": evaluation.metrics["unedited"], "scores": scores}
    if distributed.is_main():
        out.write_text(json.dumps({"wall_s": wall, "ranks": distributed.world_size(), **result}))


def launch(job: str, ranks: int, data: Path, limit: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        args = [__file__, "--worker", job, "--data", str(data), "--collect-limit", str(limit), "--out", str(out)]
        launcher = [sys.executable]
        if ranks > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        subprocess.run([*launcher, *args], env=env, check=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alternations of 1 process and N processes")
    parser.add_argument("--collect-limit", type=int, default=120, help="train+val questions collected")
    parser.add_argument("--jobs", default="collect,mc")
    parser.add_argument("--data", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.collect_limit, args.out)
        return

    load_before = os.getloadavg()
    record: dict = {"ranks": args.ranks, "rounds": args.rounds, "collect_limit": args.collect_limit, "jobs": {}}
    for job in args.jobs.split(","):
        runs: dict[int, list[dict]] = {1: [], args.ranks: []}
        for _ in range(args.rounds):
            for ranks in (1, args.ranks):
                runs[ranks].append(launch(job, ranks, args.data, args.collect_limit))
        one, many = runs[1][-1], runs[args.ranks][-1]
        if job == "collect":
            same = one["acts_sha256"] == many["acts_sha256"]
            detail = {"texts": one["texts"], "tokens": one["tokens"], "store_bit_identical": same}
        else:
            diffs = [abs(a - b) for q1, q2 in zip(one["scores"], many["scores"]) for a, b in zip(q1, q2)]
            detail = {
                "questions": one["questions"],
                "metrics_1": one["metrics"],
                f"metrics_{args.ranks}": many["metrics"],
                "max_score_difference": max(diffs),
            }
        speedups = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[1], runs[args.ranks])]
        record["jobs"][job] = {
            "wall_s_1": [round(r["wall_s"], 1) for r in runs[1]],
            f"wall_s_{args.ranks}": [round(r["wall_s"], 1) for r in runs[args.ranks]],
            "speedup_median": round(statistics.median(speedups), 3),
            **detail,
        }
        print(job, json.dumps(record["jobs"][job]), flush=True)
    emit({**run_record(load_before), **record}, args.out)


if __name__ == "__main__":
    main()
