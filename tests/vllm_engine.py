"""Run vLLM engines over lists of jobs and write the results as JSON (a helper of test_vllm.py).

vLLM starts processes, so engines are created under ``if __name__ == "__main__":`` in this script,
never inside pytest. ``--plan`` is a JSON list of engines, run one after the other in this process:
``{"name", "model" (null: the embedded SmolLM2), "editors" ({name: dir} or null: plain vLLM),
"compile", "record_norms", "token_ids" (prompts are token ids: no tokenizer), "jobs"}``; a job is
``{"prompts": [...], "args": [extra_args or null per prompt], "max_tokens": n}``, one ``generate``
call (one batch). The result per prompt: greedy token ids and the first generated token's top-5
log-probabilities. ``record_norms``: the norm of every edited token's block output before and after
the edit (eager only).
"""

from __future__ import annotations

import argparse
import gc
import json
import time


def _record(model):
    """Wrap each edited layer's edits to record (norm before, norm after) of edited tokens (eager only)."""
    import torch

    records = []
    for layer in model.modules():
        edits = getattr(layer, "hpr_edits", ())
        if not edits:
            continue

        def wrapped(hidden, mask, strength, fn):
            out = fn(hidden, mask, strength)
            on = mask & (out != hidden).any(-1)
            records.append(torch.stack([hidden[on].double().norm(dim=-1), out[on].double().norm(dim=-1)]))
            return out

        layer.hpr_edits = tuple((k, lambda h, m, s, fn=fn: wrapped(h, m, s, fn)) for k, fn in edits)
    model._hpr_records = records
    return len(records)


def _collect(model):
    import torch

    recs = getattr(model, "_hpr_records", [])
    return torch.cat(recs, dim=1).tolist() if recs else [[], []]


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from hpredit.models import embedded_default_path

    kwargs = dict(
        dtype="float32",
        enforce_eager=not spec.get("compile"),
        max_model_len=spec.get("max_model_len", 512),
        max_num_seqs=32,
        max_num_batched_tokens=2048,
        seed=0,
        enable_prefix_caching=False,
        skip_tokenizer_init=bool(spec.get("token_ids")),
    )
    model = spec.get("model") or str(embedded_default_path())
    t0 = time.time()
    if spec.get("editors"):
        from hpredit.serving import llm

        more = {"max_editors": spec["max_editors"]} if spec.get("max_editors") else {}
        engine = llm(spec["editors"], model=spec.get("model"), **more, **kwargs)
    else:
        engine = LLM(model=model, **kwargs)
    start = time.time() - t0
    if spec.get("record_norms"):  # by reference to this file as a module, which the workers can import
        import vllm_engine

        engine.apply_model(vllm_engine._record)
    results = []
    for job in spec["jobs"]:
        if "load" in job or "unload" in job or "list" in job:  # runtime editors (llm(max_editors=...))
            results.append(_admin(engine, job))
            continue
        args = job.get("args") or [None] * len(job["prompts"])
        params = [
            SamplingParams(
                max_tokens=job["max_tokens"],
                temperature=0,
                logprobs=5,
                extra_args=a,
                detokenize=not spec.get("token_ids"),
            )
            for a in args
        ]
        prompts = (
            [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]] if spec.get("token_ids") else job["prompts"]
        )
        t = time.time()
        if job.get("expect_error"):  # a request the engine must refuse (one error line)
            try:
                engine.generate(prompts, params, use_tqdm=False)
            except Exception as e:  # noqa: BLE001  vLLM's VLLMValidationError (not a ValueError)
                results.append({"error": str(e)})
                continue
            results.append({"error": None})
            continue
        outs = engine.generate(prompts, params, use_tqdm=False)
        results.append(
            {
                "seconds": time.time() - t,
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "first_logprobs": [{str(k): v.logprob for k, v in o.outputs[0].logprobs[0].items()} for o in outs],
            }
        )
        if spec.get("editors"):  # the per-editor counters after this job (cumulative)
            from hpredit.serving import editor_stats

            results[-1]["stats"] = editor_stats(engine)
    out = {"start_seconds": start, "results": results}
    if spec.get("record_norms"):
        out["norms"] = engine.apply_model(vllm_engine._collect)[0]
    del engine
    gc.collect()
    return out


def _admin(engine, job: dict) -> dict:
    """Load, unload or list editors of a running engine: ``{"ok": ...}`` or ``{"error": message}``."""
    from hpredit.errors import HpreditError
    from hpredit.serving import list_editors, load_editor_into, unload_editor_from

    try:
        if "load" in job:
            return {"ok": load_editor_into(engine, job["load"]["name"], job["load"]["path"])}
        if "unload" in job:
            unload_editor_from(engine, job["unload"])
            return {"ok": job["unload"]}
        return {"ok": list_editors(engine)}
    except HpreditError as e:
        return {"error": str(e)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--plan", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    # vLLM inspects each of its model classes in a new Python process (10-60 s each on a cold cache,
    # as in CI): inspect them in this process instead, the same information at a fraction of the cost
    from vllm.model_executor.models import registry

    registry._run_in_subprocess = lambda fn: fn()
    out = {spec["name"]: run(spec) for spec in json.load(open(args.plan))}
    json.dump(out, open(args.out, "w"))


if __name__ == "__main__":
    main()
