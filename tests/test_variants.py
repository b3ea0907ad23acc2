"""Several edit configurations in one pass (hpredit.variants): equal to each one attached alone."""

from __future__ import annotations

import json

import pytest
import torch

from hpredit.errors import HpreditError
from hpredit.evaluation.scoring import score_continuations, score_variants
from hpredit.results import EvalResult
from hpredit.variants import Variant, attach_variants

from .conftest import ARCHS, random_editor, random_hpr, tiny_model

# The widened pass runs the same edit functions on the same rows; what can differ is the float32
# rounding of matrix products over K·n rows instead of n (another blocking of the same sums). On
# these tiny models (logits of order 10) that is a few 1e-6; the bound leaves a 50× margin on
# logits and a relative 1e-5 on summed log-probabilities.
LOGIT_TOL = 2e-4
SCORE_RTOL = 1e-5


def _variants(model):
    hpr = random_editor("hpr", model, layers=[1, 2])
    iti = random_editor("iti", model)  # heads at layer 0: the widening starts at the first block's input
    caa = random_editor("caa", model, layers=[2])
    return [Variant(), Variant(hpr, 0.5), Variant(iti, 1.0), Variant(caa, 0.3), Variant(hpr, -2.0)]


def _alone(model, variant, **inputs):
    with variant.attach(model):
        return model(**inputs).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_widened_logits_equal_each_variant_alone(arch, side):
    model = tiny_model(arch)
    variants = _variants(model)
    ids = torch.randint(2, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0 if side == "left" else 1
    if side == "right":
        mask[0, -3:] = 0
    with torch.no_grad():
        with attach_variants(model, variants) as handle:
            widened = model(input_ids=ids, attention_mask=mask).logits
            assert widened.shape[0] == len(variants) * 3
            per_variant = handle.split(widened)
        for v, got in zip(variants, per_variant):
            ref = _alone(model, v, input_ids=ids, attention_mask=mask)
            assert ((got - ref).abs() * mask[..., None]).max() <= LOGIT_TOL
        plain = model(input_ids=ids, attention_mask=mask).logits  # detached: the model as before
        assert torch.equal(plain, _alone(model, Variant(), input_ids=ids, attention_mask=mask))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_widened_kv_cache_continues_each_variant(arch):
    model = tiny_model(arch)
    variants = _variants(model)
    ids = torch.randint(2, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with attach_variants(model, variants) as handle:
            first = model(input_ids=ids[:, :6], use_cache=True)
            second = model(input_ids=ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
            per_variant = handle.split(second.logits)
        for v, got in zip(variants, per_variant):
            assert (got - _alone(model, v, input_ids=ids)[:, 6:]).abs().max() <= LOGIT_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_widened_low_precision_is_finite_and_matches(dtype):
    model = tiny_model("llama", dtype=dtype)
    variants = _variants(model)
    ids = torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), attach_variants(model, variants) as handle:
        per_variant = handle.split(model(input_ids=ids).logits)
    for v, got in zip(variants, per_variant):
        ref = _alone(model, v, input_ids=ids)
        assert torch.isfinite(got).all()
        # half precision: the same rounding bound relative to its own epsilon
        assert (got.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()


def test_score_variants_equal_each_variant_alone_and_the_reference(model_tok):
    model, tok = model_tok
    variants = _variants(model)
    items = [
        ("Q: What is the capital of France?\nA:", [" Paris", " Lyon is big", " I have no comment."]),
        ("Q: Who wrote Hamlet and many other plays?\nA:", [" Shakespeare", " Marlowe did"]),
        ("Q: Why?\nA:", [" Because.", " No reason at all, really"]),
    ]
    # small groups and token budgets: padding between contexts and continuations, several chunks
    many = score_variants(model, tok, items, variants, group_size=2, batch_tokens=8)
    two_passes = score_variants(model, tok, items, variants, group_size=2, batch_tokens=8, max_variants=2)
    for v, got, split in zip(variants, many, two_passes):
        with v.attach(model):
            ref = score_continuations(model, tok, items, group_size=2, batch_tokens=8)
            plain = score_continuations(model, tok, items, cached=False)
        for g, s, r, p in zip(got.scores, split.scores, ref.scores, plain.scores):
            for x, y, z, w in zip(g, s, r, p):
                assert abs(x - z) <= SCORE_RTOL * (1 + abs(z))
                assert abs(y - z) <= SCORE_RTOL * (1 + abs(z))
                assert abs(x - w) <= SCORE_RTOL * (1 + abs(w))
    assert many[1].scores != many[0].scores  # the edit changes something


def test_nothing_edited_does_not_widen(model_tok):
    model, _ = model_tok
    ed = random_editor("hpr", model)
    ids = torch.randint(2, 100, (2, 5))
    with torch.no_grad(), attach_variants(model, [Variant(), Variant(ed, 0.0)]) as handle:
        assert not handle.widens
        out = model(input_ids=ids).logits
    assert out.shape[0] == 2 and len(handle.split(out)) == 2


def test_bad_variants_are_refused(model_tok):
    model, _ = model_tok
    ed = random_editor("hpr", model)
    with pytest.raises(HpreditError, match="scope must be 'all'"):
        attach_variants(model, [Variant(), Variant(ed, 1.0, scope="generated")])
    with pytest.raises(HpreditError, match="strength must be a number"):
        Variant(ed, float("nan"))
    with pytest.raises(HpreditError, match="unknown scope"):
        Variant(ed, 1.0, scope="nope")
    with pytest.raises(HpreditError, match="must be an Editor"):
        Variant("editor-dir", 1.0)  # type: ignore[arg-type]
    with pytest.raises(HpreditError, match="variants"):
        attach_variants(model, [])
    with pytest.raises(HpreditError, match="one per variant"):
        attach_variants(model, [Variant(), Variant(ed)], observers=[None])
    with pytest.raises(HpreditError, match="expected Variant"):
        attach_variants(model, [ed])  # type: ignore[list-item]


def test_generate_is_refused_while_widened_and_restored_after(model_tok):
    model, _ = model_tok
    ed = random_editor("hpr", model)
    ids = torch.randint(2, 100, (1, 4))
    with attach_variants(model, [Variant(), Variant(ed, 1.0)]):
        with pytest.raises(HpreditError, match="generate"):
            model.generate(ids, max_new_tokens=2)
    assert "generate" not in vars(model)
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 6)


def test_observers_see_each_variant_rows(model_tok):
    model, _ = model_tok
    ed = random_editor("hpr", model, layers=[1])
    seen: dict[int, list] = {0: [], 1: []}

    def observer(k):
        return lambda layer, before, after, attention: seen[k].append((layer, before.shape[0]))

    ids = torch.randint(2, 100, (2, 5))
    with (
        torch.no_grad(),
        attach_variants(model, [Variant(ed, 0.5), Variant(ed, 1.0)], observers=[observer(0), observer(1)]),
    ):
        model(input_ids=ids)
    assert seen == {0: [(1, 2)], 1: [(1, 2)]}


# --------------------------------------------------------------------------- the sweep in evaluate


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_model("llama", vocab=len(tokenizer))


def test_evaluate_sweep_equals_one_strength_at_a_time(tiny, tokenizer, truthfulqa_csv, tmp_path):
    from hpredit.evaluation import evaluate
    from hpredit.evaluation.side_effects import fluency_cost, neutral_text

    editor = random_hpr(tiny)
    common = dict(model=tiny, tokenizer=tokenizer, task="truthfulqa-mc", split="all", limit=3, data=truthfulqa_csv)
    strengths = [0.5, 2.0, -1.0]
    out = tmp_path / "sweep"
    sweep = evaluate(**common, editor=editor, strengths=strengths, out=out, show=False, bootstrap_resamples=100)
    rows = {r["strength"]: r for r in sweep["sweep"]}
    assert list(rows) == strengths and sweep["editor"]["strength"] is None
    assert sorted(p.name for p in out.iterdir()) == ["per_question.jsonl", "split.json", "summary.json", "sweep.png"]
    per_q = [json.loads(line) for line in (out / "per_question.jsonl").read_text().splitlines()]
    neutral = neutral_text(tiny, tokenizer)
    for s in strengths:
        alone = evaluate(**common, editor=editor, strength=s, show=False, bootstrap_resamples=100)
        for name, value in alone.metrics["edited"].items():
            assert rows[s]["metrics"][name] == pytest.approx(value, abs=1e-6)
            assert rows[s]["difference"][name]["mean"] == pytest.approx(
                alone.metrics["difference"][name]["mean"], abs=2e-6
            )
        for mine, theirs in zip(per_q, alone.per_question):
            for a, b in zip(mine["answers"], theirs["answers"]):
                assert a["score"][f"strength {s:g}"] == pytest.approx(b["score"]["edited"], rel=SCORE_RTOL)
                assert a["score"]["unedited"] == pytest.approx(b["score"]["unedited"], rel=SCORE_RTOL)
        with editor.attach(tiny, strength=s):
            assert rows[s]["kl"] == pytest.approx(fluency_cost(tiny, neutral)["kl"], rel=1e-4, abs=1e-7)
    assert sweep.metrics["unedited"] == pytest.approx(alone.metrics["unedited"], abs=1e-6)
    table = sweep.table()
    assert [c.header for c in table.columns][:2] == ["strength", "mc1"] and table.row_count == 4
    assert EvalResult.load(out).summary["sweep"] == sweep["sweep"]


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"strengths": []}, "needs at least one value"),
        ({"strengths": 0.5}, "must be a list of numbers"),
        ({"strengths": [0.5, "x"]}, "each of strengths must be a number"),
        ({"strengths": [0.5, 0.5]}, "lists a strength twice"),
        ({"strengths": [0.5, 1e9]}, "each of strengths must be a number between"),
        ({"strengths": [0.5], "editor": None}, "needs an editor"),
        ({"strengths": [0.5], "kl": 0.1}, "not both"),
        ({"strengths": [0.5], "strength": 0.5}, "give strengths or strength, not both"),
        ({"strengths": [0.5], "max_variants": 0}, "max_variants"),
    ],
)
def test_evaluate_sweep_bad_input(fields, pattern):
    from hpredit.evaluation.job import EvalConfig

    with pytest.raises(HpreditError, match=pattern):
        EvalConfig(**{"editor": "some/dir", **fields})


def test_cli_eval_strengths(tiny, tokenizer, truthfulqa_csv, tmp_path, capsys):
    from hpredit.cli import main

    tiny.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    random_hpr(tiny).save_pretrained(tmp_path / "editor")
    base = ["eval", "--model", str(tmp_path / "model"), "--editor", str(tmp_path / "editor")]
    base += ["--data", str(truthfulqa_csv), "--limit", "1", "--no-strict"]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--strengths", "0.5,2", "--out", str(tmp_path / "out")])
    assert exc.value.code == 0
    shown = capsys.readouterr().out
    assert "strength" in shown and "KL" in shown and "unedited" in shown
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["strength"] for r in summary["sweep"]] == [0.5, 2.0] and "--strengths 0.5,2" in summary["command"]
    for bad, message in (
        (["--strengths", "0.5,abc"], "--strengths must be comma-separated numbers"),
        (["--strengths", "0.5", "--kl", "0.1"], "give --strengths or --kl, not both"),
        (["--strengths", "1,1"], "--strengths lists a strength twice"),
        (["--strengths", "1,2", "--strength", "0.5"], "give --strengths or --strength, not both"),
        (["--strengths", ""], "--strengths needs at least one value"),
    ):
        with pytest.raises(SystemExit) as exc:
            main([*base, *bad])
        assert exc.value.code != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_grouped_kv_heads_without_copies_is_bitwise_the_same(arch):
    import transformers.integrations.sdpa_attention as sdpa

    from hpredit.prefix import grouped_kv_on_cpu

    model = tiny_model(arch)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped KV heads
    ids = torch.randint(2, 100, (3, 11), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a mask: transformers would copy each KV head per query head
    original = sdpa.use_gqa_in_sdpa
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with grouped_kv_on_cpu():
            assert sdpa.use_gqa_in_sdpa is not original
            fast = model(input_ids=ids, attention_mask=mask).logits
    assert sdpa.use_gqa_in_sdpa is original and torch.equal(plain, fast)


def test_passes_are_planned_by_the_blocks_each_variant_shares():
    from hpredit.variants import plan_passes

    model = tiny_model("llama")
    hpr = random_editor("hpr", model, layers=[1, 2])  # shares block 0 and 1
    iti = random_editor("iti", model)  # heads at layer 0: shares nothing
    caa = random_editor("caa", model, layers=[2])  # shares blocks 0–2
    variants = [Variant(), Variant(hpr, 0.5), Variant(iti, 1.0), Variant(caa, 0.3), Variant(hpr, -2.0)]
    assert [v.shared_blocks for v in variants] == [None, 2, 0, 3, 2]
    # ITI alone; HPR's two (2·(2 − 0) > 2: their own pass); CAA joins HPR's (1·(3 − 2) ≤ 3), the
    # unedited model with the highest split
    assert plan_passes(variants) == [[2], [0, 1, 3, 4]]
    assert plan_passes(variants, max_variants=2) == [[2], [1, 4], [0, 3]]
    assert plan_passes([Variant(), Variant(hpr, 0.0)], 1) == [[0], [1]]
    with pytest.raises(HpreditError, match="max_variants"):
        plan_passes(variants, 0)


def test_a_damaged_sweep_in_summary_json_is_one_error(tiny, tokenizer, truthfulqa_csv, tmp_path):
    from hpredit.evaluation import evaluate

    out = tmp_path / "sweep"
    evaluate(
        model=tiny,
        tokenizer=tokenizer,
        editor=random_hpr(tiny),
        strengths=[0.5],
        split="all",
        limit=1,
        data=truthfulqa_csv,
        out=out,
        show=False,
        bootstrap_resamples=50,
    )
    summary = json.loads((out / "summary.json").read_text())
    for key, value, kind in (("ppl", "high", "a number"), ("metrics", [], "an object")):
        broken = json.loads(json.dumps(summary))
        broken["sweep"][0][key] = value
        (out / "summary.json").write_text(json.dumps(broken))
        with pytest.raises(HpreditError, match=rf"'sweep\[0\]\.{key}' must be {kind}"):
            EvalResult.load(out)
