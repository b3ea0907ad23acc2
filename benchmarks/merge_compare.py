"""Merge compare results of several processes (one split seed each) into one table and figure.

    python benchmarks/merge_compare.py --methods none,hpr,caa,caa-norm,iti \
        --out benchmarks/results/compare-smollm2 benchmarks/results/compare-seed0 benchmarks/results/compare-seed1 ...

An input written ``DIR:m1,m2`` contributes only those methods' runs (e.g. the rows of an earlier
published result that a newer run does not redo); the first input's provenance is kept.
"""

import argparse
import json
from pathlib import Path

from hpredit.compare import markdown_table, merge, write_results


def read(spec: str) -> dict:
    path, _, only = spec.partition(":")
    result = json.loads((Path(path) / "results.json").read_text())
    if only:
        keep = only.split(",")
        result["runs"] = [r for r in result["runs"] if "method" not in r or r["method"] in keep]
        result["methods"] = {m: v for m, v in result["methods"].items() if m in keep}
    return result


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("inputs", nargs="+", help="result directories, each DIR or DIR:method,method")
parser.add_argument("--methods", default=None)
parser.add_argument("--out", required=True, type=Path)
args = parser.parse_args()
merged = merge([read(spec) for spec in args.inputs], args.methods.split(",") if args.methods else None)
write_results(merged, args.out)
print(markdown_table(merged))
