"""Merge compare results of several processes (one split seed each) into one table and figure.

    python benchmarks/merge_compare.py --methods none,hpr,caa,caa-norm,iti \
        --out benchmarks/results/compare-smollm2 benchmarks/results/compare-seed0 benchmarks/results/compare-seed1 ...
"""

import argparse
import json
from pathlib import Path

from hpredit.compare import markdown_table, merge, write_results

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("inputs", nargs="+", type=Path)
parser.add_argument("--methods", default=None)
parser.add_argument("--out", required=True, type=Path)
args = parser.parse_args()
results = [json.loads((p / "results.json").read_text()) for p in args.inputs]
merged = merge(results, args.methods.split(",") if args.methods else None)
write_results(merged, args.out)
print(markdown_table(merged))
