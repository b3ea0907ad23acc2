"""Time to first token of a repeated ~1k-token system prompt, `hpredit serve` with prefix caching on vs off (CPU).

    OMP_NUM_THREADS=1 python benchmarks/serve_prefix_cache.py --editor out/run/editor \
        --out benchmarks/results/serve_prefix_cache-cpu.json

Two servers, one after the other (the embedded SmolLM2-135M-Instruct, float32, eager, the editor as
the default at strength 1): `hpredit serve` as it is (prefix caching on, each request's cache salted
by its edit) and with `--no-enable-prefix-caching`. To each, ``--requests`` chat requests sharing one
system prompt of about 1,050 tokens (the TruthfulQA QA primer, 6 times) with a different user
question each, one at a time, streaming, ``max_tokens`` 1: the time to first token is the time from
sending a request to its first streamed chunk. The first request of each server fills the cache
(cold); the median of the others is the figure. A CPU measurement of prefill work saved: not a speed
claim for a GPU server.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _common import emit, run_record
from hpredit.data import QA_PRIMER

QUESTIONS = [
    "Where did fortune cookies originate?",
    "Why do veins appear blue?",
    "What is the spiciest part of a chili pepper?",
    "How long should you wait before filing a missing person report?",
    "Why do matadors wave red capes?",
    "What percentage of the brain does a human typically use?",
    "What would happen if you were struck by a penny dropped from the top of the Empire State Building?",
    "What U.S. state produces the most peaches?",
    "Why do chameleons change colors?",
    "On what date was the Declaration of Independence officially signed?",
    "What color is the sun when viewed from space?",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ttft(url: str, system: str, question: str) -> float:
    """Seconds from sending one streaming chat request to its first chunk with content."""
    body = {
        "model": "served",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 1,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                return time.perf_counter() - start
    raise RuntimeError("no content streamed")


def _server(editor: str, caching: bool, log: Path) -> tuple[subprocess.Popen, str]:
    port = _port()
    args = ["--editor", editor, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    args += ["--enforce-eager", "--max-model-len", "2048", "--served-model-name", "served", "--seed", "0"]
    if not caching:
        args.append("--no-enable-prefix-caching")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # 1 GiB of KV cache: vLLM's CPU default wants most of RAM
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpredit.cli", "serve", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(2)
    proc.kill()
    raise RuntimeError("server did not start in 900 s")


def _prefix_hits(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith("vllm:prefix_cache_hits_total"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--editor", required=True, help="an editor directory (e.g. out/run/editor)")
    ap.add_argument("--requests", type=int, default=len(QUESTIONS), help="requests per server (the first is cold)")
    ap.add_argument("--repeat", type=int, default=6, help="copies of the QA primer in the system prompt")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not Path(args.editor, "config.json").is_file():
        ap.error(f"--editor {args.editor!r}: not an editor directory (no config.json)")
    if args.requests < 2:
        ap.error(f"--requests must be at least 2 (one cold, then the warm ones), got {args.requests}")
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    load = os.getloadavg()
    system = "\n\n".join([QA_PRIMER] * args.repeat)
    questions = (QUESTIONS * (1 + args.requests // len(QUESTIONS)))[: args.requests]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for caching in (True, False):
            name = "caching_on" if caching else "caching_off"
            proc, url = _server(args.editor, caching, Path(tmp) / f"{name}.log")
            try:
                times = [_ttft(url, system, q) for q in questions]
                hits = _prefix_hits(url)
            finally:
                proc.terminate()
                proc.wait(timeout=120)
            results[name] = {
                "ttft_s": [round(t, 4) for t in times],
                "cold_s": round(times[0], 4),
                "warm_median_s": round(statistics.median(times[1:]), 4),
                "prefix_cache_hit_tokens": hits,
            }
            print(name, results[name], file=sys.stderr)
    on, off = results["caching_on"]["warm_median_s"], results["caching_off"]["warm_median_s"]
    from transformers import AutoTokenizer

    from hpredit.models import embedded_default_path

    tok = AutoTokenizer.from_pretrained(embedded_default_path())
    messages = [{"role": "system", "content": system}, {"role": "user", "content": questions[0]}]
    prompt_tokens = len(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    record = {
        **run_record(load),
        "what": "time to first token, hpredit serve, a shared system prompt, caching on vs off (CPU)",
        "prompt_tokens": prompt_tokens,
        "requests": args.requests,
        **results,
        "speedup_warm": round(off / on, 2),
    }
    emit(record, args.out)


if __name__ == "__main__":
    main()
