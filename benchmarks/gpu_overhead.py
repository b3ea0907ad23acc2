"""What an attached editor costs at 8B scale: unedited vs additive hook vs HPR, alternating, one process.

    python benchmarks/gpu_overhead.py --sections op,static --scenarios b1,b16 --new 32 --static-rounds 15 \
        --out $OUT/gpu_static.json                                                     # on the GPU (issue 20)
    python benchmarks/gpu_overhead.py --tiny --rounds 2 --static-rounds 2 --per-call-rounds 2 \
        --compile-backend aot_eager --precision-tokens 128                           # debug on CPU
    python benchmarks/gpu_overhead.py --model embedded --dtype float32 --layers 15,16,17,18,19 \
        --sections eager --out benchmarks/results/edit_overhead_cpu_smollm2.json     # a real model, CPU

Builds a Llama-3-8B-shaped model from its config with random weights (no download), bfloat16,
and random editors on 5 decoder layers: an additive hook (CAA, x + αv), HPR's fast path (what
``attach`` uses) and HPR's float32 reference path, with the reference angle predictor
(d → d/2 → d/4 → d/8 → 1). ``--sections`` chooses what runs (all by default), in this order:

- ``op``: one layer's edit at decode shapes under ``torch.compile(fullgraph=True)``: graph breaks,
  and the fused op ``hpredit::hpr_rows`` in the graph AOT dispatch hands to the compiler;
- ``exactness``: the fast path against the reference on random activations (relative error per
  token, norm ratio) and on greedy generation (same tokens);
- ``eager``: ``--rounds`` times in the order none, add, hpr, hpr-reference: decode at batch 1 and 16
  (``generate()`` with KV cache, ``--new`` tokens after a 128-token prompt) and prefill (one forward
  over 4 × 512 tokens, logits of the last position only); on CUDA also the GPU time of the edits
  (CUDA events around 200 calls of the 5 layers' edits) against the model's GPU time per step;
- ``static``: decode with ``cache_implementation="static"``: transformers compiles the decode step
  (on CUDA with CUDA graphs, ``mode="reduce-overhead"``). HPR is attached once; after compiling and
  capturing the edited and the unedited step, ``--static-rounds`` interleaved A/B rounds (none, hpr,
  none, …) switch its hooks off and on (the same hook objects: no recompilation, which is counted
  and reported, as are graph breaks and the fused op's calls in inductor's code);
- ``per-call``: one layer's edit per call (``benchmarks/edit_ops.py``): additive, HPR's fast path
  as of 15fad2c, the fused edit (Triton kernel on CUDA), ``torch.compile`` of it and a CUDA graph of
  it (the per-layer µs inside a CUDA graph at decode shapes), with the kernels each launches;
- ``precision``: ``benchmarks/edit_precision.py`` on the device: each path's error against float64
  (``--precision-tokens`` random tokens at d = 4096) and its µs per call in a CUDA graph, for the
  angle MLP in float16 (the default on CUDA), float32 and the activations' dtype.

Reported: tokens/s of each variant (median) and the median over rounds of the time ratio variant /
unedited of the same round, with [min, max] (decode at batch 1 is host-bound and noisy).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

from _common import LLAMA3_8B, command_line, cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small config, for debugging on CPU")
    parser.add_argument("--model", default=None, help="a real model instead ('embedded': SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new", type=int, default=64, help="tokens generated per decode run")
    parser.add_argument("--layers", default="10,12,14,16,18", help="edited decoder layers")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: quick on CPU)")
    parser.add_argument("--per-call-rounds", type=int, default=9, help="rounds of the per-call table (0: skip it)")
    parser.add_argument("--static-rounds", type=int, default=15, help="interleaved A/B rounds, static cache + compile")
    parser.add_argument(
        "--sections",
        default="exactness,eager,static,per-call,precision,op",
        help="what to run, comma-separated (a GPU's time is short: choose)",
    )
    parser.add_argument(
        "--scenarios", default="b1,b16,prefill", help="eager/static scenarios: b1, b16, prefill (comma-separated)"
    )
    parser.add_argument("--precision-tokens", type=int, default=2048, help="tokens of the bfloat16 error measurement")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}: choose from {', '.join(SECTIONS)}")
    chosen = {"b1": "decode batch 1", "b16": "decode batch 16", "prefill": "prefill 4x512"}
    if set(args.scenarios.split(",")) - set(chosen):
        parser.error(f"unknown scenarios in {args.scenarios!r}: choose from {', '.join(chosen)}")
    scenarios = [chosen[k] for k in args.scenarios.split(",")]

    import torch
    from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

    from hpredit.editors import CAAEditor, HPRConfig, HPREditor
    from hpredit.editors.additive import AdditiveConfig
    from hpredit.models import fingerprint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = None
    if args.model:
        import hpredit

        model, _ = hpredit.load_model(
            None if args.model == "embedded" else args.model, dtype=args.dtype, device=str(device)
        )
        config = model.config
        shapes = {"decode batch 1": (1, 128), "decode batch 16": (16, 128), "prefill 4x512": (4, 512)}
    elif args.tiny:
        config = LlamaConfig(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=20,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=2048,
            max_position_embeddings=2048,
        )
        shapes = {"decode batch 1": (1, 32), "decode batch 16": (16, 32), "prefill 4x512": (4, 512)}
    else:
        config = LlamaConfig(**LLAMA3_8B)
        shapes = {"decode batch 1": (1, 128), "decode batch 16": (16, 128), "prefill 4x512": (4, 512)}
    torch.manual_seed(0)
    if not args.model:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    fp = fingerprint(model)
    layers = [int(i) for i in args.layers.split(",")]
    d, n = config.hidden_size, len(layers)

    # Random editors. The probe and angle MLP get weights that gate about half the tokens and give
    # varied angles; the steering vector has a tenth of a typical activation's norm.
    g = torch.Generator().manual_seed(1)
    hcfg = HPRConfig(layers=layers)
    widths = hcfg.mlp_widths(d)
    weights = [
        torch.randn(n, widths[j + 1], widths[j], generator=g) / math.sqrt(widths[j]) for j in range(len(widths) - 1)
    ]
    biases = [torch.randn(n, widths[j + 1], generator=g) * 0.1 for j in range(len(widths) - 1)]
    hpr = HPREditor(hcfg, layers, fp, layers, torch.randn(n, d, generator=g), weights, biases, {})
    add = CAAEditor(AdditiveConfig(layers=layers), layers, fp, layers, torch.randn(n, d, generator=g) * 0.1, {})

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    exact: dict = {}
    op_check = _op_in_compiled_graphs(hpr, layers[0], d, dtype, device) if "op" in sections else {}
    if op_check:
        print("custom op in compiled graphs:", json.dumps(op_check), flush=True)
    if "exactness" in sections:
        exact = _exactness(hpr, model, layers, config, d, dtype, device)
        print("exactness:", json.dumps(exact, indent=1), flush=True)

    # ---- timing
    def reference_attach(model, strength):
        hpr.layer_edit = lambda layer, dev, dt: HPREditor.layer_edit(hpr, layer, dev, dt, fast=False)
        try:
            return hpr.attach(model, strength=strength)
        finally:
            del hpr.layer_edit

    variants = {
        "none": None,
        "add": lambda: add.attach(model, strength=1.0),
        "hpr": lambda: hpr.attach(model, strength=1.0),
        "hpr-reference": lambda: reference_attach(model, 1.0),
        "none-static": None,  # static cache: generate() compiles the decode step
        "hpr-static": lambda: hpr.attach(model, strength=1.0),
    }
    compile_config = None
    if device.type != "cuda" or args.compile_backend != "inductor":  # else transformers' default (CUDA graphs)
        compile_config = CompileConfig(
            backend=args.compile_backend, mode=None if device.type != "cuda" else "reduce-overhead"
        )
        compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told

    @torch.no_grad()
    def run(scenario: str, static: bool = False) -> tuple[float, int]:
        batch, length = shapes[scenario]
        ids = torch.randint(10, config.vocab_size, (batch, length), device=device)
        extra = dict(cache_implementation="static", compile_config=compile_config) if static else {}
        sync()
        start = time.perf_counter()
        if scenario.startswith("prefill"):
            model(input_ids=ids, logits_to_keep=1)
            tokens = batch * length
        else:
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                **extra,
            )
            tokens = batch * args.new
        sync()
        return time.perf_counter() - start, tokens

    results = {}
    for scenario in scenarios if sections & {"eager", "static"} else []:
        static = [] if scenario.startswith("prefill") else ["none-static", "hpr-static"]
        names = [k for k in variants if not k.endswith("-static")] if "eager" in sections else []
        if not names and not static:
            continue
        for name in names:  # warm-up: allocate, autotune
            handle = variants[name]() if variants[name] else None
            try:
                run(scenario)
            finally:
                if handle:
                    handle.remove()
        rates: dict[str, list[float]] = {k: [] for k in names + static}
        failed: dict[str, str] = {}
        static_check = {}
        if static and "static" in sections:
            static_check = _static_ab(hpr, model, functools.partial(run, scenario, True), args.static_rounds, rates)
        for _ in range(args.rounds):
            for name in names:
                make = variants[name]
                if name in failed:
                    continue
                handle = make() if make else None
                try:
                    seconds, tokens = run(scenario)
                    rates[name].append(tokens / seconds)
                except torch.OutOfMemoryError as e:  # the reference path at prefill may not fit
                    failed[name] = f"out of memory: {str(e).splitlines()[0]}"
                    torch.cuda.empty_cache()
                finally:
                    if handle:
                        handle.remove()
        row = {
            "tokens_per_second": {k: statistics.median(v) for k, v in rates.items() if v},
            "failed": failed,
            "static_compile": static_check,
        }
        ratios = {}
        for name in names + static:
            base = "none-static" if name.endswith("-static") else "none"
            if name.startswith("none") or not rates[name] or not rates[base]:
                continue
            per_round = [rates[base][i] / rates[name][i] for i in range(len(rates[name]))]  # time ratio
            ratios[name] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}
        row["time_ratio_vs_unedited"] = ratios
        if device.type == "cuda" and names:
            row["edit_gpu_ms_per_step"] = _edit_gpu_ms(hpr, add, layers, shapes[scenario], scenario, d, dtype, device)
            row["model_ms_per_step"] = (
                1000 * shapes[scenario][0] / row["tokens_per_second"]["none"]
                if not scenario.startswith("prefill")
                else 1000 * shapes[scenario][0] * shapes[scenario][1] / row["tokens_per_second"]["none"]
            )
        results[scenario] = row
        print(scenario, json.dumps(row, indent=1), flush=True)

    lines = [
        "| scenario | unedited tok/s | add | HPR (fused) | HPR (reference) | unedited tok/s, static cache + compile "
        "| HPR, static cache + compile |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario, row in results.items():
        cells = []
        for name in ("add", "hpr", "hpr-reference", "none-static", "hpr-static"):
            if name == "none-static":
                tps = row["tokens_per_second"].get(name)
                cells.append(f"{tps:.1f}" if tps else "-")
                continue
            r = row["time_ratio_vs_unedited"].get(name)
            cells.append(
                f"{(r['median'] - 1) * 100:+.1f}% [{(r['min'] - 1) * 100:+.1f}, {(r['max'] - 1) * 100:+.1f}]"
                if r
                else row["failed"].get(name, "-")
            )
        unedited = row["tokens_per_second"].get("none")
        lines.append(f"| {scenario} | {f'{unedited:.1f}' if unedited else '-'} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)

    per_call, per_call_table = {}, ""
    if (
        args.per_call_rounds and "per-call" in sections
    ):  # one layer's edit per call, shapes of decode b1/b16 and prefill 4x512
        import edit_ops

        per_call = edit_ops.measure(
            d,
            args.dtype,
            device.type,
            args.per_call_rounds,
            before=True,
            compiled=True,
            graphs=True,
            backend=args.compile_backend,
        )
        per_call_table = edit_ops.per_call_table(per_call)
        print(per_call_table)
    precision = {}
    if "precision" in sections:  # bfloat16 error vs float64 and time per call of each MLP precision
        import edit_precision

        precision = edit_precision.measure(
            d, args.precision_tokens, args.dtype, device, args.per_call_rounds or 5, sources_too=False
        )
    record = {
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "command": command_line(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "config": args.model or ("tiny" if args.tiny else "Llama-3-8B shape, random weights"),
        "dtype": args.dtype,
        "edited_layers": layers,
        "rounds": args.rounds,
        "new_tokens": args.new,
        "exactness": exact,
        "results": results,
        "table": table,
        "per_call": per_call,
        "per_call_table": per_call_table,
        "custom_op_in_compiled_graphs": op_check,
        "precision": precision,
    }
    out = args.out or (Path(os.environ["OUT"]) / "gpu_overhead.json" if os.environ.get("OUT") else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")


SECTIONS = ("exactness", "eager", "static", "per-call", "precision", "op")


def _exactness(hpr, model, layers, config, d, dtype, device) -> dict:
    """The fast path against the reference on random activations, and on greedy generation."""
    import torch

    from hpredit.editors import HPREditor

    x = torch.randn(4, 512, d, device=device, generator=torch.Generator(device).manual_seed(2)).to(dtype) * 4
    exact = {}
    for layer in layers[:2]:
        fast = hpr.edit(layer, x, 1.0, fast=True).float()
        ref = hpr.edit(layer, x, 1.0, fast=False).float()
        rel = (fast - ref).norm(dim=-1) / x.float().norm(dim=-1)
        norm_ratio = fast.norm(dim=-1) / x.float().norm(dim=-1)
        exact[layer] = {
            "max_rel_diff_vs_reference": float(rel.max()),
            "max_norm_error_fast": float((norm_ratio - 1).abs().max()),
            "edited_fraction": float((ref != x.float()).any(-1).float().mean()),
            "dtype_eps": torch.finfo(dtype).eps,
        }
    ids = torch.randint(10, config.vocab_size, (2, 16), device=device, generator=torch.Generator(device).manual_seed(3))
    seqs = {}
    for fast in (True, False):
        hpr.layer_edit = lambda layer, dev, dt, fast=fast: HPREditor.layer_edit(hpr, layer, dev, dt, fast=fast)
        with torch.no_grad(), hpr.attach(model, strength=1.0):
            seqs[fast] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    del hpr.layer_edit
    exact["generation_same_tokens"] = bool(torch.equal(seqs[True], seqs[False]))
    exact["generation_token_agreement"] = float((seqs[True] == seqs[False]).float().mean())
    return exact


class _HookToggle:
    """Switch an attached editor's hooks off and on without new hook objects: dynamo guards on the
    hooks, so the compiled graphs of both states stay valid and alternating recompiles nothing."""

    def __init__(self, handle):
        self.entries = [(h.hooks_dict_ref(), h.id) for h in handle._hooks]  # (hooks dict, key)
        self.entries = [(hooks, key, hooks[key]) for hooks, key in self.entries]

    def set(self, on: bool) -> None:
        for hooks, key, fn in self.entries:
            if on and key not in hooks:
                hooks[key] = fn
                hooks.move_to_end(key, last=False)  # attach puts its hooks first
            elif not on and key in hooks:
                del hooks[key]


def _static_ab(hpr, model, run, rounds: int, rates: dict) -> dict:
    """Static cache + compile, unedited vs HPR, interleaved (none, hpr, none, …) after compiling and
    capturing both; appends tokens/s to ``rates["none-static"]`` / ``rates["hpr-static"]`` and
    returns what was compiled while timing (nothing, or the timing is not of the compiled step) and
    how often inductor's code calls the fused op."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    handle = hpr.attach(model, strength=1.0)
    toggle = _HookToggle(handle)
    try:
        _, code = run_and_get_code(run)  # compile and capture the edited decode step
        toggle.set(False)
        run()  # … and the unedited one
        graphs = counters["stats"]["unique_graphs"]
        for _ in range(rounds):
            for name, on in (("none-static", False), ("hpr-static", True)):
                toggle.set(on)
                seconds, tokens = run()
                rates[name].append(tokens / seconds)
    finally:
        toggle.set(True)
        handle.remove()
    return {
        "graphs_compiled_while_timing": counters["stats"]["unique_graphs"] - graphs,
        "graph_breaks": sum(counters["graph_break"].values()),
        "fused_op_calls_in_inductor_code": sum(c.count("= torch.ops.hpredit.hpr_rows.default(") for c in code)
        if code
        else None,  # (no inductor: aot_eager)
    }


def _op_in_compiled_graphs(hpr, layer: int, d: int, dtype, device) -> dict:
    """One layer's edit at decode shapes under torch.compile(fullgraph=True): graph breaks, and the
    fused op ``hpredit::hpr_rows`` in the graph AOT dispatch hands to the compiler."""
    import torch
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return gm

    fn = hpr.layer_edit(layer, device, dtype)
    out = {}
    for batch in (1, 16):
        x = (torch.randn(batch, 1, d, device=device) * 4).to(dtype)
        explained = torch._dynamo.explain(fn)(x, None, 1.0)
        graphs.clear()
        got = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep))(x, None, 1.0)
        op = torch.ops.hpredit.hpr_rows.default
        out[f"decode b{batch}"] = {
            "graph_breaks": explained.graph_break_count,
            "fused_op_nodes": sum(n.target is op for g in graphs for n in g.graph.nodes),
            "equal_to_eager": bool(torch.equal(got, fn(x, None, 1.0))),
        }
        torch._dynamo.reset()
    return out


def _edit_gpu_ms(hpr, add, layers, shape, scenario, d, dtype, device) -> dict[str, float]:
    """GPU milliseconds of one model step's worth of edits (all edited layers), by CUDA events."""
    import torch

    batch, length = shape
    seq = 1 if scenario.startswith("decode") else length
    h = torch.randn(batch, seq, d, device=device, dtype=dtype)
    out = {}
    for name, ed, kw in (("add", add, {}), ("hpr", hpr, {"fast": True}), ("hpr-reference", hpr, {"fast": False})):
        fns = [ed.layer_edit(i, device, dtype, **kw) for i in layers]
        for fn in fns:
            fn(h, None, 1.0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            for fn in fns:
                fn(h, None, 1.0)
        end.record()
        torch.cuda.synchronize()
        out[name] = start.elapsed_time(end) / 200
    return out


if __name__ == "__main__":
    main()
