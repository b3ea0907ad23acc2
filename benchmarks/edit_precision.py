"""Where the fused HPR edit's 16-bit error comes from, and what its precision costs per call.

    OMP_NUM_THREADS=1 python benchmarks/edit_precision.py --d 4096 --tokens 512 --rounds 7 --threads 1 \
        --out benchmarks/results/edit_precision_cpu_d4096.json                        # CPU
    python benchmarks/edit_precision.py --d 4096 --tokens 2048 --rounds 9            # on a GPU

A random HPR editor (the reference angle MLP d → d/2 → d/4 → d/8 → 1, weights N(0, 1/fan_in),
biases N(0, 0.01), as ``gpu_overhead.py``) on random activations ×4 in ``--dtype``, strength 1.

1. Sources: the angle's error (radians, max and rms over tokens) when the angle MLP is computed in
   float64 except for one rounding to bfloat16 (and, for comparison, float16): the inputs, each
   layer's weights, each layer's input activations, each matmul's accumulation and output (the
   16-bit matmul of already rounded operands against float64 of the same operands), the logit; and
   the angle from an exact logit in float32.
2. Paths: per-token relative error ‖edit − float64‖ / ‖x‖ (max, mean over tokens) of the float32
   reference path and the fused path with the MLP's hidden layers in float16 (the default on CUDA),
   in float32 (elsewhere) and in the activations' dtype (``model``), and each max as a multiple of
   the reference's.
3. Time per call of the same paths at the shapes of decode b1, b16 and prefill 4×512 (median over
   ``--rounds`` interleaved rounds, every path once per round; on CUDA each call a replay of a CUDA
   graph of the edit) and per round the ratio to ``model`` (the cheapest: what precision costs).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from _common import emit, run_record
from edit_ops import SHAPES, time_per_call


def make_editor(d: int, seed: int = 0):
    """A random HPR editor of width ``d`` (one layer, the reference angle MLP)."""
    import torch

    from hpredit.editors import HPRConfig, HPREditor
    from hpredit.models import ModelFingerprint

    g = torch.Generator().manual_seed(seed)
    config = HPRConfig(layers=[0])
    widths = config.mlp_widths(d)
    weights = [torch.randn(1, widths[j + 1], widths[j], generator=g) / math.sqrt(widths[j]) for j in range(4)]
    biases = [torch.randn(1, widths[j + 1], generator=g) * 0.1 for j in range(4)]
    probe = torch.randn(1, d, generator=g)
    return HPREditor(config, [0], ModelFingerprint("LlamaForCausalLM", d, 1, "random"), [0], probe, weights, biases, {})


def float64_edit(ed, x):
    """The edit of ``x`` (n, d) in float64 throughout: gate, angle MLP, pseudo-rotation."""
    import torch

    from hpredit.geometry import pseudo_rotate

    x64 = x.double()
    w = ed.probe[0].double()
    theta = math.pi * torch.sigmoid(mlp64(ed, x64))
    out = pseudo_rotate(x64, w, theta)
    return torch.where((x64 @ w < 0).unsqueeze(-1), out, x64)


def mlp64(ed, x64, round_at: tuple[str, int] | None = None, dtype=None):
    """The angle MLP's logit (n,) in float64, with one rounding to ``dtype`` at ``round_at``:
    ``("input", j)``, ``("weight", j)``, ``("matmul", j)`` (operands rounded, then the 16-bit matmul
    against float64 of the same operands: accumulation and output rounding only) or ``("logit", 0)``."""
    import torch
    import torch.nn.functional as F

    depth = len(ed.weights)
    z = x64
    for j in range(depth):
        if j:
            z = F.gelu(z)
        w, b = ed.weights[j][0].double(), ed.biases[j][0].double()
        if round_at == ("input", j):
            z = z.to(dtype).double()
        if round_at == ("weight", j):
            w = w.to(dtype).double()
        if round_at == ("matmul", j):
            zr, wr, br = z.to(dtype), w.to(dtype), b.to(dtype)
            exact = zr.double() @ wr.double().t() + br.double()
            z = exact + (torch.addmm(br, zr, wr.t()).double() - exact)
        else:
            z = z @ w.t() + b
    z = z.squeeze(-1)
    return z.to(dtype).double() if round_at == ("logit", 0) else z


def sources(ed, x) -> dict:
    """The angle's error (rad) from each single rounding, max and rms over tokens."""
    import torch

    x64 = x.double()
    exact = math.pi * torch.sigmoid(mlp64(ed, x64))
    depth = len(ed.weights)
    out: dict[str, dict] = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        rows = {}
        places = [("input", 0)] + [(k, j) for j in range(depth) for k in ("weight", "matmul")]
        places += [("input", j) for j in range(1, depth)] + [("logit", 0)]
        for where in places:
            err = (math.pi * torch.sigmoid(mlp64(ed, x64, where, dtype)) - exact).abs()
            label = "logit" if where[0] == "logit" else f"{where[0]} of layer {where[1] + 1}"
            rows[label] = {"max": float(err.max()), "rms": float(err.pow(2).mean().sqrt())}
        out[name] = rows
    logit32 = mlp64(ed, x64).float()
    err = (math.pi * torch.sigmoid(logit32).double() - exact).abs()
    out["angle in float32 from the exact logit"] = {"max": float(err.max()), "rms": float(err.pow(2).mean().sqrt())}
    return out


def paths(ed, dtype, device) -> dict:
    """name → the edit ``(hidden, mask, strength) -> hidden`` of each path."""
    import copy

    out = {"reference": ed.layer_edit(0, device, dtype, fast=False)}
    for precision in ("float16", "model", "float32"):
        variant = copy.copy(ed)
        variant.mlp_precision = precision
        out[f"fused ({precision})"] = variant.layer_edit(0, device, dtype)
    return out


def measure(d: int, tokens: int, dtype_name: str, device, rounds: int, sources_too: bool = True) -> dict:
    """Sources (optional), each path's error vs float64 and, with ``rounds``, its time per call at
    the shapes of :data:`edit_ops.SHAPES` (on CUDA each call a replay of a CUDA graph of the edit)."""
    import torch

    from edit_ops import cuda_graph

    device = torch.device(device)
    dtype = getattr(torch, dtype_name)
    ed = make_editor(d)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(tokens, d, generator=g) * 4).to(dtype)
    truth = float64_edit(ed, x)
    norm = x.double().norm(dim=-1)
    gated = (truth != x.double()).any(-1)
    with torch.no_grad():
        fns = paths(ed, dtype, device)
        errors = {}
        for name, fn in fns.items():
            rel = (fn(x.to(device), None, 1.0).double().cpu() - truth).norm(dim=-1) / norm
            errors[name] = {"max": float(rel.max()), "mean_edited": float(rel[gated].mean())}
        for row in errors.values():
            row["max_vs_reference"] = row["max"] / errors["reference"]["max"]
    summary = {k: f"{v['max']:.2e} ({v['max_vs_reference']:.2f}x)" for k, v in errors.items()}
    print("per-token error vs float64:", summary, flush=True)
    found = sources(ed, x) if sources_too else {}
    for name, rows in found.items():
        print(" ", name, {k: f"{v['max']:.1e}/{v['rms']:.1e}" for k, v in rows.items()} if "max" not in rows else rows)
    timing = {}
    for shape_name, (batch, seq) in SHAPES.items() if rounds else ():
        gen = torch.Generator(device).manual_seed(1)
        hidden = (torch.randn(batch, seq, d, device=device, generator=gen) * 4).to(dtype)
        timed = {k: cuda_graph(fn, hidden) for k, fn in fns.items()} if device.type == "cuda" else fns
        timing[shape_name] = time_per_call(timed, hidden, rounds, baseline="fused (model)")
        print(
            shape_name,
            {k: round(v, 1) for k, v in timing[shape_name]["us_per_call_median"].items()},
            {k: round(v, 2) for k, v in timing[shape_name]["ratio_to_baseline_median"].items()},
            flush=True,
        )
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "timed_as": "CUDA graph replays" if device.type == "cuda" else "eager calls",
        "d": d,
        "tokens": tokens,
        "dtype": dtype_name,
        "edited_fraction": float(gated.float().mean()),
        "angle_error_sources_rad": found,
        "per_token_error_vs_float64": errors,
        "time_per_call": timing,
        "ratio_spread": {
            shape: {k: [min(v), max(v)] for k, v in row["ratio_to_baseline_per_round"].items()}
            for shape, row in timing.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=4096, help="hidden size")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of the error measurement")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (0: no timing)")
    parser.add_argument("--no-sources", action="store_true", help="skip part 1 (slow at many tokens)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    load = os.getloadavg()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    record = measure(args.d, args.tokens, args.dtype, device, args.rounds, sources_too=not args.no_sources)
    emit({**run_record(load), **record}, args.out)


if __name__ == "__main__":
    main()
