"""The comparison harness and the side-effect measures, on a tiny model and a few questions."""

import json

import pytest
import torch

from hpredit.compare import compare, markdown_table
from hpredit.errors import HpreditError
from hpredit.evaluation.side_effects import fluency_cost, neutral_text, norm_drift

from .conftest import random_editor


def test_fluency_cost_is_zero_unedited_and_positive_edited(model_tok):
    model, tok = model_tok
    text = neutral_text(model, tok, max_new_tokens=6, prompts=("The river", "A good way to"))
    base = fluency_cost(model, text)
    assert abs(base["kl"]) < 1e-6 and base["ppl"] == pytest.approx(base["ppl_unedited"])
    assert base["tokens"] == 12
    editor = random_editor("caa", model)
    with editor.attach(model, strength=1.0):
        assert fluency_cost(model, text)["kl"] > 1e-4


def test_norm_drift_is_one_at_hpr_layers_and_not_for_addition(model_tok):
    model, tok = model_tok
    text = neutral_text(model, tok, max_new_tokens=4, prompts=("The river", "Hi"))
    hpr = random_editor("hpr", model, layers=[1])
    drift = norm_drift(model, text, lambda: hpr.attach(model))
    assert drift["drift"][0] == pytest.approx(1.0, abs=1e-6)  # before the edit: untouched
    assert drift["drift"][1] == pytest.approx(1.0, abs=1e-5)  # HPR keeps norms at its own layer
    assert drift["at_edit"][1] == pytest.approx(1.0, abs=1e-5)
    assert abs(drift["drift"][2] - 1.0) > 1e-4  # ... and changes what comes after
    two = random_editor("hpr", model, layers=[0, 1])
    assert all(
        v == pytest.approx(1.0, abs=1e-5)
        for v in norm_drift(model, text, lambda: two.attach(model))["at_edit"].values()
    )
    caa = random_editor("caa", model, layers=[1])
    caa_drift = norm_drift(model, text, lambda: caa.attach(model))
    assert abs(caa_drift["drift"][1] - 1.0) > 1e-3 and abs(caa_drift["at_edit"][1] - 1.0) > 1e-3


def test_compare_end_to_end_on_a_tiny_model(model_tok, truthfulqa_csv, tmp_path):
    model, tok = model_tok
    methods = ["none", "hpr", "hpr-no-gate", "caa", "caa-norm", "iti"]
    result = compare(
        model,
        tok,
        methods=methods,
        seeds=[0, 1],
        data=truthfulqa_csv,
        limit=2,
        kl_cap=50.0,
        strengths={m: (1.0,) for m in methods},
        out=tmp_path / "cmp",
        protocol="grid",
        progress=False,
        log=lambda s: None,
    )
    files = sorted(p.name for p in (tmp_path / "cmp").iterdir())
    assert {"results.json", "table.md", "mc2_vs_kl.png"} <= set(files)
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert saved["summary"].keys() == result["summary"].keys()
    rows = result.runs  # one row per (seed, method); each seed's split is in result.splits
    assert len(rows) == 12 and all("method" in r for r in rows) and saved["runs"] == json.loads(json.dumps(rows))
    none = [r for r in rows if r["method"] == "none"]
    assert all(r["kl"] < 1e-6 for r in none)
    for r in rows:
        assert set(r["test"]) == {"mc1", "mc2", "mc3"} and 0 <= r["test"]["mc2"] <= 1
        if r["method"] == "hpr":
            assert all(abs(r["norm_drift"]["at_edit"][layer] - 1) < 1e-5 for layer in r["layers"])
        if r["method"] == "none":
            assert r["profile"] is None
        else:  # the edit profile on the test texts: every edited layer (ITI: its heads' layers), every token seen
            assert sorted(int(i) for i in r["profile"]["layers"]) == r["layers"]
            assert {p["tokens"] for p in r["profile"]["layers"].values()} == {
                r["profile"]["all"]["tokens"] // len(r["layers"])
            }
            assert 0 < r["profile"]["all"]["edited"] <= 1
    splits = [r["split"] for r in result.splits]
    assert [s["seed"] for s in splits] == [0, 1] and splits[0]["groups"]["test"] != splits[1]["groups"]["test"]
    assert "| hpr |" in markdown_table(result)


def test_compare_bad_inputs(model_tok, truthfulqa_csv, tmp_path):
    model, tok = model_tok
    with pytest.raises(HpreditError, match="unknown method"):
        compare(model, tok, methods=["magic"], data=truthfulqa_csv)
    with pytest.raises(HpreditError, match="must be positive"):
        compare(model, tok, methods=["none"], limit=0, data=truthfulqa_csv)
    with pytest.raises(HpreditError, match="unknown task"):
        compare(model, tok, methods=["none"], task="truthfulqa-xyz", data=truthfulqa_csv)
    assert not (tmp_path / "cmp").exists()


def test_neutral_text_masks_padding(model_tok):
    model, tok = model_tok
    text = neutral_text(model, tok, max_new_tokens=3, prompts=("One two three four five", "Hi"))
    assert text.ids.shape[0] == 2 and text.mask[1, 0] == 0  # left padded
    assert int(text.scored.sum()) == 6
    assert torch.isfinite(text.logprobs).all()


def test_merge_seeds_and_method_subsets():
    from hpredit.compare import merge

    def result(seed, mc2):
        runs = [
            {
                "seed": seed,
                "method": m,
                "test": {"mc1": 0.1, "mc2": mc2 + i, "mc3": 0.2},
                "kl": 0.0,
                "ppl": 2.0,
                "strength": 1.0,
            }
            for i, m in enumerate(["none", "hpr", "caa"])
        ]
        runs.append({"seed": seed, "split": {}})
        return {
            "methods": {"none": "", "hpr": "", "caa": ""},
            "model": {"name": "m"},
            "runs": runs,
            "seeds": [seed],
            "seconds": 1.0,
        }

    merged = merge([result(0, 0.2), result(1, 0.4)], methods=["none", "hpr"])
    assert list(merged["summary"]) == ["none", "hpr"] and merged["seeds"] == [0, 1]
    assert merged["summary"]["hpr"]["mc2"]["mean"] == pytest.approx(1.3)
    assert merged["summary"]["hpr"]["mc2"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert len(merged.splits) == 2 and all("method" in r for r in merged.runs)  # old files: split rows among runs
    with pytest.raises(HpreditError, match="cannot merge: no run for iti seed 0"):
        merge([result(0, 0.2)], methods=["iti"])
    # other methods from another process, for the same seeds: the union, in order of appearance
    extra = result(0, 0.5)
    extra["methods"] = {"iti": ""}
    extra["runs"] = [{**extra["runs"][0], "method": "iti"}, extra["runs"][-1]]
    both = merge([result(0, 0.2), extra])
    assert list(both["summary"]) == ["none", "hpr", "caa", "iti"] and both["summary"]["iti"]["mc2"]["mean"] == 0.5
    with pytest.raises(HpreditError, match="no run for iti seed 1"):
        merge([result(0, 0.2), result(1, 0.2), extra])


def test_strength_grid_doubles_until_the_cap(model_tok, truthfulqa_csv):
    model, tok = model_tok
    result = compare(
        model,
        tok,
        methods=["caa"],
        seeds=[0],
        data=truthfulqa_csv,
        limit=1,
        kl_cap=1e9,
        progress=False,
        log=lambda s: None,
        protocol="grid",
    )
    row = next(r for r in result["runs"] if r.get("method") == "caa")
    assert [t["strength"] for t in row["validation"]] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


@pytest.mark.parametrize("task_name", ["truthfulqa-mc", "toxigen"])
def test_every_chosen_point_measured_together_equals_each_alone(model_tok, truthfulqa_csv, task_name):
    """compare measures every method's chosen points of a seed in one widened pass: each point's
    test metrics, per-item values, fluency cost, norm drift and edit profile equal its own pass."""
    from hpredit.compare.harness import _measure_all, _Run
    from hpredit.compare.protocols import SearchContext, resolve_search
    from hpredit.compare.strength import Choice
    from hpredit.evaluation.tasks import get_task

    model, tok = model_tok
    task = get_task(task_name)
    items = task.load(truthfulqa_csv if task_name == "truthfulqa-mc" else None)[:3]
    neutral = neutral_text(model, tok, max_new_tokens=4, prompts=("The river", "Hi"))
    run = _Run(SearchContext(model, tok, task, neutral), resolve_search(), lambda s: None, False)
    hpr, caa = random_editor("hpr", model, layers=[1, 2]), random_editor("caa", model, layers=[2])
    choices = [Choice(None, 0.0, status="unedited"), Choice(hpr, 0.7), Choice(caa, 0.4), Choice(hpr, -1.5)]
    together = _measure_all(run, items, choices)
    # the scores agree to float32 rounding (relative 1e-5 of summed log-probabilities of tens of nats
    # on this random model: tests/test_variants.py), which moves MC2, a ratio of their exponentials,
    # by up to about 1e-4
    tol = 1e-4
    for c, got in zip(choices, together):
        (alone,) = _measure_all(run, items, [c])
        for name, value in alone.test.items():
            assert got.test[name] == pytest.approx(value, abs=tol)
        assert got.items == pytest.approx(alone.items, abs=tol)
        assert got.cost["kl"] == pytest.approx(alone.cost["kl"], rel=1e-4, abs=1e-6)
        assert got.cost["ppl"] == pytest.approx(alone.cost["ppl"], rel=1e-5)
        assert got.drift == alone.drift
        if c.editor is None:
            assert got.profile is None
        else:
            for layer, prof in alone.profile["layers"].items():
                assert got.profile["layers"][layer]["tokens"] == prof["tokens"]
                assert got.profile["layers"][layer]["edited"] == pytest.approx(prof["edited"], abs=1e-6)
                mean = prof["angle_deg"]["mean"]
                assert got.profile["layers"][layer]["angle_deg"]["mean"] == pytest.approx(mean, rel=1e-4, abs=1e-4)
