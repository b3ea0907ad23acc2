"""HPR training time on SmolLM2's TruthfulQA activations, against plain PyTorch loops over the same data.

    python benchmarks/training_speed.py --store out/acts-seed0 --out benchmarks/results/training_speed.json

The activations of ``hpredit run``'s fitting data (TruthfulQA train+val questions of split seed 0,
all 30 layers) are collected once, or read from ``--store`` (saved there when missing). Then, in one
process, with the reference hyper-parameters (5 epochs, batch 16 token pairs, AdamW 5e-4):

- ``hpredit``: ``HPREditor.fit`` as shipped (probes of all 30 layers, angle predictors of the 5
  chosen layers) and with ``angle_layers="all"`` (angle predictors of all 30 layers);
- ``data-pass``: one epoch that only gathers each batch's rows of all layers and converts them to
  float32 — the cost of reading the data once, a floor for any training loop;
- ``plain-loop``: one epoch of the straightforward implementation: per layer an ``nn.Linear`` probe
  and an ``nn.Sequential`` angle MLP (d → d/2 → d/4 → d/8 → 1), the same BCE + MSE loss, a Python
  loop over layers, ``torch.optim.AdamW`` — the same work as ``angle_layers="all"``.

Reported: seconds per epoch of each, and the ratios hpredit / data-pass and hpredit / plain-loop.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from _common import DEFAULT_CSV, emit, run_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--store", type=Path, default=None, help="activation store directory (reused or written)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions of each split")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch import nn

    import hpredit
    from hpredit.activations import ActivationStore, collect_activations
    from hpredit.data import truthfulqa_pairs
    from hpredit.editors import HPRConfig, HPREditor
    from hpredit.editors.base import train_val_masks

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.store and (args.store / "meta.json").exists():
        acts = ActivationStore.load(args.store)
        collect_s = None
    else:
        model, tok = hpredit.load_model()
        pairs = truthfulqa_pairs(split="train+val", seed=args.seed, path=args.data, limit=args.limit)
        start = time.perf_counter()
        acts = collect_activations(model, tok, pairs, progress=False)
        collect_s = time.perf_counter() - start
        if args.store:
            acts.save(args.store)
        del model

    config = HPRConfig()
    load_before = os.getloadavg()
    timings: dict[str, float] = {}
    for name, overrides in (("hpredit", {}), ("hpredit-angle-all-layers", {"angle_layers": "all"})):
        start = time.perf_counter()
        HPREditor.fit(acts, config, progress=False, **overrides)
        timings[name] = time.perf_counter() - start

    train_mask, _ = train_val_masks(acts, config.val_fraction, config.seed)
    tp, tn = acts.token_pairs(train_mask)
    X = acts.acts
    L, d = X.shape[0], X.shape[-1]
    order = torch.randperm(len(tp), generator=torch.Generator().manual_seed(0))
    bs = config.batch_size

    def batches():
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            yield idx, torch.cat([X[:, tp[idx]], X[:, tn[idx]]], dim=1).float()  # (L, 2B, d)

    start = time.perf_counter()
    for _ in batches():
        pass
    timings["data-pass-epoch"] = time.perf_counter() - start

    torch.manual_seed(0)
    widths = config.mlp_widths(d)
    probes = nn.ModuleList(nn.Linear(d, 1, bias=False) for _ in range(L))
    mlps = nn.ModuleList()
    for _ in range(L):
        mods: list[nn.Module] = []
        for j in range(len(widths) - 1):
            mods += [nn.Linear(widths[j], widths[j + 1])] + ([nn.GELU()] if j < len(widths) - 2 else [])
        mlps.append(nn.Sequential(*mods))
    opt = torch.optim.AdamW([*probes.parameters(), *mlps.parameters()], lr=config.lr, weight_decay=config.weight_decay)
    target = torch.rand(len(tp)) * math.pi  # stands in for the pair angles (same shape, same cost)
    start = time.perf_counter()
    for idx, z in batches():
        n = len(idx)
        y = torch.cat([torch.ones(n), torch.zeros(n)])
        tgt = torch.cat([torch.zeros(n), target[idx]])
        loss = 0.0
        for layer in range(L):
            loss = loss + F.binary_cross_entropy_with_logits(probes[layer](z[layer]).squeeze(-1), y)
            theta = math.pi * torch.sigmoid(mlps[layer](z[layer]).squeeze(-1))
            loss = loss + F.mse_loss(theta, tgt)
        loss = loss / L
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    timings["plain-loop-epoch"] = time.perf_counter() - start

    epochs = config.epochs
    per_epoch = {
        "hpredit": timings["hpredit"] / epochs,
        "hpredit-angle-all-layers": timings["hpredit-angle-all-layers"] / epochs,
    }
    record = {
        **run_record(load_before),
        "layers": L,
        "hidden_size": d,
        "train_token_pairs": len(tp),
        "epochs": epochs,
        "batch_size": bs,
        "collection_seconds": collect_s,
        "fit_seconds": {k: timings[k] for k in ("hpredit", "hpredit-angle-all-layers")},
        "seconds_per_epoch": {
            **per_epoch,
            "data-pass": timings["data-pass-epoch"],
            "plain-loop": timings["plain-loop-epoch"],
        },
        "ratio_vs_data_pass": {k: v / timings["data-pass-epoch"] for k, v in per_epoch.items()},
        "ratio_vs_plain_loop": {k: v / timings["plain-loop-epoch"] for k, v in per_epoch.items()},
    }
    emit(record, args.out)


if __name__ == "__main__":
    main()
