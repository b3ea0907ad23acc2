"""Benchmark: every method on TruthfulQA MC with SmolLM2-135M-Instruct, 3 split seeds.

Same as ``hpredit compare --methods ... --seeds 0,1,2 --out DIR``; kept as a script so the
benchmark's exact call lives in the repository:

    HPREDIT_TRUTHFULQA=../shared/data/truthfulqa/TruthfulQA.csv \
        python benchmarks/compare_truthfulqa.py --out benchmarks/results/compare
"""

import argparse
import json

import hpredit
from hpredit.compare import METHODS, compare, markdown_table

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--methods", default=",".join(METHODS))
parser.add_argument("--seeds", default="0,1,2")
parser.add_argument("--limit", type=int, default=None)
parser.add_argument("--kl-cap", type=float, default=0.5)
parser.add_argument("--out", required=True)
args = parser.parse_args()

model, tok = hpredit.load_model()
result = compare(
    model,
    tok,
    methods=args.methods.split(","),
    seeds=[int(s) for s in args.seeds.split(",")],
    kl_cap=args.kl_cap,
    limit=args.limit,
    out=args.out,
    progress=False,
)
print(markdown_table(result))
print(json.dumps({"seconds": result["seconds"]}))
