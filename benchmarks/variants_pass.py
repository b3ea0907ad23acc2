"""Time TruthfulQA MC scoring of several edit configurations in one widened pass against one pass each.

An HPR editor with random parameters on SmolLM2's layers 15–19 (the layers ``hpredit run`` chooses
there; the weights do not change the work) scores the first ``--questions`` questions:

- ``before``: one pass per configuration as the code before issue 30 ran it (transformers copying
  each grouped KV head per query head, ``hpredit.prefix.grouped_kv_on_cpu`` off);
- ``separate``: one pass per configuration with today's code;
- ``widened``: the unedited model and ``K − 1`` strengths in one pass (``hpredit.variants``).

One pass each is measured for the unedited model and one edited configuration (every edited
configuration costs the same), in the order before, separate, widened, repeated ``--repeats`` times;
the medians are reported. Prints seconds, ratios, the largest score difference between a widened
variant and its own pass, and the peak memory.

    OMP_NUM_THREADS=1 python benchmarks/variants_pass.py --questions 48 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from hpredit import prefix
from hpredit.data import load_truthfulqa
from hpredit.editors import HPRConfig, HPREditor
from hpredit.evaluation.truthfulqa import score_truthfulqa_variants
from hpredit.models import fingerprint, load_model
from hpredit.variants import Variant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_CSV  # noqa: E402

GQA = prefix._SDPA_GQA


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
    parser.add_argument("--widths", default="2,5,16", help="comma-separated numbers of configurations K")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data", default=str(DEFAULT_CSV))
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    widths = [int(k) for k in args.widths.split(",")]
    if args.questions < 1 or args.threads < 1 or args.repeats < 1 or min(widths) < 2:
        parser.error("--questions, --threads and --repeats must be at least 1, each width at least 2")
    torch.set_num_threads(args.threads)
    model, tok = load_model(None)
    questions = load_truthfulqa(args.data)[: args.questions]
    editor = random_hpr(model, [15, 16, 17, 18, 19])
    score_truthfulqa_variants(model, tok, questions[:2], [Variant(), Variant(editor, 0.5)])  # warm up

    def timed(variants, copies: bool = False):
        prefix._SDPA_GQA = not copies and GQA
        try:
            t0 = time.perf_counter()
            out = score_truthfulqa_variants(model, tok, questions, variants)
            return time.perf_counter() - t0, out
        finally:
            prefix._SDPA_GQA = GQA

    runs: dict[str, list[float]] = {}
    diffs = []
    for _ in range(args.repeats):
        for mode, copies in (("before", True), ("separate", False)):
            runs.setdefault(f"{mode}_unedited_s", []).append(timed([Variant()], copies)[0])
            seconds, (alone,) = timed([Variant(editor, 0.5)], copies)
            runs.setdefault(f"{mode}_edited_s", []).append(seconds)
        for k in widths:
            variants = [Variant()] + [Variant(editor, 0.5 * (i + 1)) for i in range(k - 1)]
            seconds, out = timed(variants)
            runs.setdefault(f"widened_{k}_s", []).append(seconds)
            diffs += [
                abs(a - b) / max(1.0, abs(b))
                for x, y in zip(out[1].questions, alone.questions)
                for a, b in zip(x.scores.values(), y.scores.values())
            ]
    med = {name: statistics.median(values) for name, values in runs.items()}
    results: dict = {"questions": args.questions, "threads": args.threads, "repeats": args.repeats, **med}
    for k in widths:
        for mode in ("before", "separate"):
            total = med[f"{mode}_unedited_s"] + (k - 1) * med[f"{mode}_edited_s"]
            results[f"{mode}_{k}_s"] = total
            results[f"speedup_{k}_vs_{mode}"] = total / med[f"widened_{k}_s"]
    results["max_rel_score_diff"] = max(diffs)
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    text = json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in results.items()}, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
