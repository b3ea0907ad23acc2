"""Benchmark: every method on TruthfulQA MC with SmolLM2-135M-Instruct, 3 split seeds.

Same as ``hpredit compare --methods ... --seeds 0,1,2 --out DIR``; kept as a script so the
benchmark's exact call lives in the repository:

    HPREDIT_TRUTHFULQA=../shared/data/truthfulqa/TruthfulQA.csv \
        python benchmarks/compare_truthfulqa.py --out benchmarks/results/compare

Every method at each target fluency cost (``--protocol matched``, the default); the published
3-seed tables were made with ``--protocol grid`` (add it to reproduce them).
"""

import argparse
import json

import hpredit
from hpredit.compare import METHODS, compare, markdown_table

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--methods", default=",".join(METHODS))
parser.add_argument("--seeds", default="0,1,2")
parser.add_argument("--limit", type=int, default=None)
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
parser.add_argument("--out", required=True)
args = parser.parse_args()

model, tok = hpredit.load_model()
result = compare(
    model,
    tok,
    methods=args.methods.split(","),
    seeds=[int(s) for s in args.seeds.split(",")],
    kl_cap=args.kl_cap,
    protocol=args.protocol,
    targets=None if args.targets is None else [float(t) for t in args.targets.split(",")],
    kl_tol=args.kl_tol,
    limit=args.limit,
    out=args.out,
    progress=False,
)
print(markdown_table(result))
print(json.dumps({"seconds": result["seconds"]}))
