"""Activation collection against a plain forward pass of the same model over the same texts.

    python benchmarks/collection_throughput.py --questions 80 --rounds 3 \
        --out benchmarks/results/collection_throughput.json

SmolLM2-135M-Instruct (float32, CPU), the TruthfulQA pairs of the first ``--questions`` questions
(eval-format prompts with the 6-shot primer). In one process, alternating, ``--rounds`` times:

- ``plain``: the model's backbone over every unique text (prompt + completion), right-padded
  batches sorted by length, no hooks, no cache — what "a forward pass over the texts" costs;
- ``collect-whole``: ``collect_activations(prefix_cache=False)``: the same passes, plus hooks on all
  30 layers and the copies of every completion token into the store;
- ``collect``: ``collect_activations()`` as used (each shared prefix once through the KV cache).

Throughput = text tokens / s (all tokens of all unique texts, for every mode); the ratios use the
median time per mode. Also the store's bytes per token per layer against 2·d.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from _common import DEFAULT_CSV, emit, run_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--questions", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    import hpredit
    from hpredit.activations import collect_activations, tokenize_completion
    from hpredit.data import load_truthfulqa, truthfulqa_pairs
    from hpredit.models import backbone, decoder_layers
    from hpredit.prefix import pad_right

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = hpredit.load_model()
    questions = load_truthfulqa(args.data)[: args.questions]
    pairs = truthfulqa_pairs(split="all", seed=0, questions=questions)
    texts = sorted({(p.prompt, c) for p in pairs for c in (p.positive, p.negative)})
    encoded = [tokenize_completion(tok, *t)[0] for t in texts]
    n_tokens = sum(len(ids) for ids in encoded)
    path, blocks = decoder_layers(model)
    runner = backbone(model, path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @torch.no_grad()
    def plain() -> None:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for b in range(0, len(order), args.batch_size):
            ids, mask = pad_right([encoded[i] for i in order[b : b + args.batch_size]], pad)
            runner(input_ids=ids, attention_mask=mask, use_cache=False)

    stores = {}

    def collect(prefix: bool):
        def run() -> None:
            stores[prefix] = collect_activations(
                model, tok, pairs, batch_size=args.batch_size, progress=False, prefix_cache=prefix
            )

        return run

    modes = {"plain": plain, "collect-whole": collect(False), "collect": collect(True)}
    plain()  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, fn in modes.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {m: statistics.median(t) for m, t in times.items()}
    store = stores[True]
    d, layers = store.hidden_size, len(store.layers)
    per_token_layer = store.nbytes() / (store.n_tokens * layers)
    record = {
        **run_record(load_before),
        "model": "SmolLM2-135M-Instruct float32",
        "questions": len(questions),
        "unique_texts": len(texts),
        "text_tokens": n_tokens,
        "completion_tokens_stored": store.n_tokens,
        "layers_kept": layers,
        "seconds": times,
        "median_seconds": median,
        "tokens_per_second": {m: n_tokens / t for m, t in median.items()},
        "throughput_ratio_vs_plain": {m: median["plain"] / t for m, t in median.items() if m != "plain"},
        "store_bytes_per_token_per_layer": per_token_layer,
        "two_bytes_times_d": 2 * d,
    }
    emit(record, args.out)


if __name__ == "__main__":
    main()
