"""Time TruthfulQA MC scoring of several edit configurations in one widened pass against one pass each.

An HPR editor with random parameters on SmolLM2's layers 15–19 (the layers ``hpredit run`` chooses
there; the weights do not change the work) scores the first ``--questions`` questions: unedited
alone, edited alone, then 2, 5 and 16 variants in one pass (hpredit.variants). Prints seconds,
ratios, the largest score difference between a widened variant and its own pass, and peak memory.

    OMP_NUM_THREADS=1 python benchmarks/variants_pass.py --questions 48 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time

import torch

from hpredit.data import load_truthfulqa
from hpredit.editors import HPRConfig, HPREditor
from hpredit.evaluation.truthfulqa import score_truthfulqa_variants
from hpredit.models import fingerprint, load_model
from hpredit.variants import Variant

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import DEFAULT_CSV  # noqa: E402


def random_hpr(model, layers: list[int], seed: int = 0) -> HPREditor:
    """An HPR editor with random parameters (the work of an edit does not depend on them)."""
    fp = fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    config = HPRConfig(angle_depth=2)
    widths = config.mlp_widths(fp.hidden_size)
    n = len(layers)
    weights = [torch.randn(n, widths[j + 1], widths[j], generator=g) / math.sqrt(widths[j]) for j in range(2)]
    biases = [torch.randn(n, widths[j + 1], generator=g) * 0.1 for j in range(2)]
    return HPREditor(config, layers, fp, layers, torch.randn(n, fp.hidden_size, generator=g), weights, biases, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=str(DEFAULT_CSV))
    args = parser.parse_args()
    if args.questions < 1 or args.threads < 1:
        parser.error("--questions and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    model, tok = load_model(None)
    questions = load_truthfulqa(args.data)[: args.questions]
    editor = random_hpr(model, [15, 16, 17, 18, 19])

    def timed(variants):
        t0 = time.perf_counter()
        out = score_truthfulqa_variants(model, tok, questions, variants)
        return time.perf_counter() - t0, out

    unedited, _ = timed([Variant()])
    edited, (alone,) = timed([Variant(editor, 0.5)])
    results = {"unedited_s": unedited, "edited_s": edited}
    for k in (2, 5, 16):
        variants = [Variant()] + [Variant(editor, 0.5 * (i + 1)) for i in range(k - 1)]
        seconds, out = timed(variants)
        results[f"{k}_in_one_s"] = seconds
        results[f"{k}_separate_s"] = unedited + (k - 1) * edited
        if k == 2:
            results["max_abs_diff"] = max(
                abs(a - b)
                for x, y in zip(out[1].questions, alone.questions)
                for a, b in zip(x.scores.values(), y.scores.values())
            )
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps({k: round(v, 4) for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
