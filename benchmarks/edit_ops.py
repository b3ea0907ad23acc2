"""What one call of a layer's edit launches and costs: ATen ops / kernels (torch.profiler) and time per call.

    TRITON_INTERPRET=1 python benchmarks/edit_ops.py --d 4096 --compile --threads 1 \
        --out benchmarks/results/edit_ops_cpu_d4096_1thread.json                  # CPU; counts the Triton path too
    python benchmarks/edit_ops.py --d 4096 --dtype bfloat16 --compile               # on a GPU

One layer's edit on random activations of the shapes of decode at batch 1 and 16 (one token per row)
and prefill 4 x 512, with a random HPR editor of the reference angle MLP (d → d/2 → d/4 → d/8 → 1):
``before`` is ``HPREditor``'s fast path as of commit 15fad2c (kept in ``benchmarks/_before.py``),
``fused`` the current one (``hpredit.kernels``: its PyTorch step on CPU, the Triton kernel on CUDA),
``fused-torch`` the current one forced to its PyTorch step, ``reference`` the float32 reference path,
``additive`` a CAA edit (x + αv). With ``--compile`` also ``compiled`` (``torch.compile`` of the fused
edit, inductor) and, on CUDA, ``cuda-graph`` (the fused edit captured once and replayed).

Op counts: ATen ops called directly by the edit (each one a launch on a GPU), all ATen ops
including nested ones, and on CUDA the device kernels. Time: the median over ``--rounds``
interleaved rounds (every variant once per round) of the mean time per call over a batch of calls,
and per round the ratio of each variant to ``before``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

from _before import REVISION, fast_edit_15fad2c
from _common import emit, run_record

#: ATen ops that launch no kernel (views, metadata, allocation) unless they copy (see ``_copies``)
NO_KERNEL = {
    f"aten::{n}"
    for n in (
        "view",
        "reshape",
        "_reshape_alias",
        "_unsafe_view",
        "as_strided",
        "t",
        "transpose",
        "expand",
        "broadcast_to",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "detach",
        "alias",
        "empty",
        "empty_like",
        "empty_strided",
        "resolve_conj",
        "resolve_neg",
        "lift_fresh",
        "contiguous",
        "to",
        "_to_copy_noop",
    )
}
SHAPES = {"decode b1": (1, 1), "decode b16": (16, 1), "prefill 4x512": (4, 512)}


def make_edits(d: int, dtype, device, before: bool, compiled: bool, seed: int = 0, backend: str = "inductor") -> dict:
    """name → edit function ``(hidden, mask, strength) -> hidden`` of one layer, built once."""
    import torch

    from hpredit.editors import CAAEditor, HPRConfig, HPREditor
    from hpredit.editors.additive import AdditiveConfig
    from hpredit.kernels import triton_available
    from hpredit.models import ModelFingerprint

    g = torch.Generator().manual_seed(seed)
    fp = ModelFingerprint("LlamaForCausalLM", d, 1, "random")
    config = HPRConfig(layers=[0])
    widths = config.mlp_widths(d)
    weights = [torch.randn(1, widths[j + 1], widths[j], generator=g) / math.sqrt(widths[j]) for j in range(4)]
    biases = [torch.randn(1, widths[j + 1], generator=g) * 0.1 for j in range(4)]
    probe = torch.randn(1, d, generator=g)
    args = (config, [0], fp, [0], probe, weights, biases, {})
    hpr = HPREditor(*args)
    forced = HPREditor(*args)
    forced.kernel_backend = "torch"
    edits = {
        "additive": CAAEditor(
            AdditiveConfig(layers=[0]), [0], fp, [0], torch.randn(1, d, generator=g) * 0.1, {}
        ).layer_edit(0, device, dtype)
    }
    if before:
        edits["before"] = fast_edit_15fad2c(HPREditor(*args), 0, device, dtype)
    edits["fused"] = hpr.layer_edit(0, device, dtype)
    if device.type == "cuda":
        edits["fused-torch"] = forced.layer_edit(0, device, dtype)
    elif triton_available() and os.environ.get("TRITON_INTERPRET") == "1":  # counted, not timed
        kernel = HPREditor(*args)
        kernel.kernel_backend = "triton"
        edits["fused-triton"] = kernel.layer_edit(0, device, dtype)
    edits["reference"] = hpr.layer_edit(0, device, dtype, fast=False)
    if compiled:
        edits["compiled"] = torch.compile(hpr.layer_edit(0, device, dtype), fullgraph=True, backend=backend)
    return edits


def count_ops(fn, hidden) -> dict[str, int]:
    """ATen ops one call launches: direct children of the call, all of them, and CUDA kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if hidden.is_cuda else [])
    with profile(activities=activities) as prof:
        with record_function("edit_call"):
            fn(hidden, None, 1.0)
        if hidden.is_cuda:
            torch.cuda.synchronize()
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    direct = [
        e
        for e in events
        if e.cpu_parent is not None
        and e.cpu_parent.name == "edit_call"
        and (e.name.startswith("aten::") or e.name.startswith("triton::"))
    ]
    launching = [e for e in direct if e.name not in NO_KERNEL or _copies(e)]
    out = {
        "launches": len(launching),
        "aten_ops_direct": len(direct),
        "aten_ops_all": len(aten),
        "triton_kernels": sum(e.name.startswith("triton::") for e in direct),
    }
    if hidden.is_cuda:
        out["cuda_kernels"] = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return out


def _copies(event) -> bool:
    """Whether a view-like op (``to``, ``reshape``, ``contiguous``) did copy data, i.e. launched a kernel."""
    return any(c.name in ("aten::copy_", "aten::_to_copy", "aten::clone") or _copies(c) for c in event.cpu_children)


def cuda_graph(fn, hidden):
    """``fn`` on ``hidden`` captured as one CUDA graph; returns a replaying callable (same signature)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(hidden, None, 1.0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(hidden, None, 1.0)

    def replay(_hidden, _mask, _strength):
        graph.replay()
        return out

    return replay


def time_per_call(edits: dict, hidden, rounds: int, min_seconds: float = 0.02, baseline: str = "before") -> dict:
    """Interleaved rounds: µs per call of each edit (median over rounds) and, when ``baseline`` is
    among them, per round the ratio of each edit to it (and its median)."""
    import torch

    def sync():
        if hidden.is_cuda:
            torch.cuda.synchronize()

    calls = {}
    for name, fn in edits.items():  # warm up, and size the batch of calls per measurement
        for _ in range(3):
            fn(hidden, None, 1.0)
        sync()
        t = time.perf_counter()
        fn(hidden, None, 1.0)
        sync()
        calls[name] = max(1, min(1000, int(min_seconds / max(time.perf_counter() - t, 1e-6))))
    per_call: dict[str, list[float]] = {k: [] for k in edits}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in edits.items():
                sync()
                t = time.perf_counter()
                for _ in range(calls[name]):
                    fn(hidden, None, 1.0)
                sync()
                per_call[name].append((time.perf_counter() - t) / calls[name] * 1e6)
    out = {
        "us_per_call_median": {k: statistics.median(v) for k, v in per_call.items()},
        "us_per_call_min": {k: min(v) for k, v in per_call.items()},
        "calls_per_measurement": calls,
    }
    if baseline in per_call:
        ratios = {k: [a / b for a, b in zip(v, per_call[baseline])] for k, v in per_call.items() if k != baseline}
        out[f"ratio_to_{'before' if baseline == 'before' else 'baseline'}_median"] = {
            k: statistics.median(v) for k, v in ratios.items()
        }
        out["ratio_to_baseline_per_round"] = ratios
    return out


def measure(
    d: int,
    dtype_name: str,
    device_name: str,
    rounds: int,
    before: bool,
    compiled: bool,
    graphs: bool,
    backend: str = "inductor",
) -> dict:
    """Op counts and per-call times of every edit, per shape."""
    import torch

    device = torch.device(device_name)
    dtype = getattr(torch, dtype_name)
    edits = make_edits(d, dtype, device, before, compiled, backend=backend)
    results = {}
    for shape_name, (batch, seq) in SHAPES.items():
        g = torch.Generator(device).manual_seed(1)
        hidden = (torch.randn(batch, seq, d, device=device, generator=g) * 4).to(dtype)
        with torch.no_grad():
            ops = {name: count_ops(fn, hidden) for name, fn in edits.items() if name != "compiled"}
            timed = {k: v for k, v in edits.items() if k != "fused-triton"}  # the interpreter's time means nothing
            if graphs and device.type == "cuda":
                timed["cuda-graph"] = cuda_graph(edits["fused"], hidden)
            if "compiled" in timed:
                timed["compiled"](hidden, None, 1.0)  # compile outside the counts and timing
                ops["compiled"] = count_ops(timed["compiled"], hidden)
                if device.type != "cuda":  # inductor's C++ kernels are no ATen ops: nothing to count on CPU
                    ops["compiled"]["launches"] = None
            timing = time_per_call(timed, hidden, rounds)
        results[shape_name] = {"ops": ops, **timing}
        print(
            shape_name,
            {k: v["launches"] for k, v in ops.items()},
            {k: round(v, 1) for k, v in timing["us_per_call_median"].items()},
            flush=True,
        )
    return results


def table(results: dict, key: str = "launches") -> str:
    first = next(iter(results.values()))
    names = list(dict.fromkeys([*first["us_per_call_median"], *first["ops"]]))
    lines = ["| shape | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for shape, row in results.items():
        cells = []
        for n in names:
            ops = row["ops"].get(n, {}).get(key)
            ops = "-" if ops is None else ops
            us = row["us_per_call_median"].get(n)
            cells.append(f"{us:,.0f} µs, {ops} launches" if us is not None else f"{ops} launches")
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: the per-call table of issue 12: column → variant
PER_CALL_COLUMNS = {
    "additive, eager": "additive",
    "HPR fast, eager (15fad2c)": "before",
    "HPR fused": "fused",
    "HPR fused, torch.compile": "compiled",
    "HPR fused, CUDA graph": "cuda-graph",
}


def per_call_table(results: dict) -> str:
    """µs per call (and launches) of one layer's edit, in the columns of :data:`PER_CALL_COLUMNS`."""
    lines = ["| shape | " + " | ".join(PER_CALL_COLUMNS) + " |", "|---|" + "---|" * len(PER_CALL_COLUMNS)]
    for shape, row in results.items():
        cells = []
        for name in PER_CALL_COLUMNS.values():
            us = row["us_per_call_median"].get(name)
            ops = row["ops"].get(name, {})
            launches = ops.get("cuda_kernels", ops.get("launches"))
            cells.append(
                "-" if us is None else f"{us:,.0f} µs" + (f" ({launches} launches)" if launches is not None else "")
            )
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=4096, help="hidden size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--before",
        default=REVISION,
        choices=[REVISION, ""],
        help=f"include the fast path of {REVISION} (benchmarks/_before.py); '' for none",
    )
    parser.add_argument("--compile", action="store_true", help="also torch.compile the fused edit (inductor)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    load = os.getloadavg()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = measure(args.d, args.dtype, device, args.rounds, bool(args.before), args.compile, graphs=True)
    record = {
        **run_record(load),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "d": args.d,
        "dtype": args.dtype,
        "rounds": args.rounds,
        "before": args.before,
        "results": results,
        "table": table(results),
    }
    print(record["table"])
    emit(record, args.out)


if __name__ == "__main__":
    main()
