"""Run one vLLM engine over a list of jobs and write the results as JSON (a helper of test_vllm.py).

vLLM starts processes, so the engine is created under ``if __name__ == "__main__":`` in this script,
one process per engine, never inside pytest. A job is ``{"prompts": [...], "strengths": [...] or
null, "max_tokens": n}``; each job is one ``generate`` call (one batch). The result per prompt:
greedy token ids and the first generated token's top-5 log-probabilities.
``--record-norms``: the norm of every edited token's block output before and after the edit.
"""

from __future__ import annotations

import argparse
import json
import time


def _record(model):
    """Wrap each edited layer's edit to record (norm before, norm after) of edited tokens (eager only)."""
    import torch

    records = []
    for layer in model.model.layers:
        fn = getattr(layer, "hpr_edit", None)
        if fn is None:
            continue

        def wrapped(hidden, mask, strength, fn=fn):
            out = fn(hidden, mask, strength)
            on = mask & (out != hidden).any(-1)
            records.append(torch.stack([hidden[on].double().norm(dim=-1), out[on].double().norm(dim=-1)]))
            return out

        layer.hpr_edit = wrapped
    model._hpr_records = records
    return len(records)


def _collect(model):
    import torch

    recs = getattr(model, "_hpr_records", [])
    return torch.cat(recs, dim=1).tolist() if recs else [[], []]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--editor")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--jobs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--record-norms", action="store_true")
    args = p.parse_args()

    from vllm import LLM, SamplingParams

    from hpredit.models import embedded_default_path

    kwargs = dict(
        dtype="float32",
        enforce_eager=not args.compile,
        max_model_len=512,
        max_num_seqs=32,
        max_num_batched_tokens=2048,
        seed=0,
        enable_prefix_caching=False,
    )
    t0 = time.time()
    if args.editor:
        from hpredit.serving import llm

        engine = llm(args.editor, **kwargs)
    else:
        engine = LLM(model=str(embedded_default_path()), **kwargs)
    start = time.time() - t0
    if args.record_norms:  # by reference to this file as a module, which the workers can import
        import vllm_engine

        engine.apply_model(vllm_engine._record)
    jobs = json.load(open(args.jobs))
    results = []
    for job in jobs:
        strengths = job.get("strengths") or [None] * len(job["prompts"])
        params = [
            SamplingParams(
                max_tokens=job["max_tokens"],
                temperature=0,
                logprobs=5,
                extra_args=None if s is None else {"strength": s},
            )
            for s in strengths
        ]
        t = time.time()
        outs = engine.generate(job["prompts"], params, use_tqdm=False)
        dt = time.time() - t
        results.append(
            {
                "seconds": dt,
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "first_logprobs": [{str(k): v.logprob for k, v in o.outputs[0].logprobs[0].items()} for o in outs],
            }
        )
    out = {"start_seconds": start, "results": results}
    if args.record_norms:
        out["norms"] = engine.apply_model(vllm_engine._collect)[0]
    json.dump(out, open(args.out, "w"))


if __name__ == "__main__":
    main()
