"""Matched fluency cost: the KL search, the strength → KL curve in editor artifacts, attach(kl=), and
the matched-cost comparison on a tiny model."""

import json
import math

import pytest

from hpredit.compare import compare, markdown_table, match_targets, merge
from hpredit.compare.report import summarise_matched
from hpredit.editors import load_editor
from hpredit.editors.kl_curve import KLCurve
from hpredit.errors import HpreditError
from hpredit.evaluation.side_effects import fluency_cost, neutral_text
from hpredit.pipeline import RunConfig

from .conftest import random_editor

# --------------------------------------------------------------------------- the search, on known functions


@pytest.mark.parametrize("c", [0.01, 0.3, 7.0])
def test_search_hits_each_target_of_a_monotone_cost(c):
    cost = lambda s: c * s**2 + 0.05 * s  # noqa: E731  # monotone on s > 0, root known in closed form
    targets, tol = [0.1, 0.25, 0.5], 0.05
    hits, points = match_targets(cost, targets, start=[0.25, 0.5, 1.0], tol=tol, steps=8, max_doublings=12)
    for hit, t in zip(hits, targets):
        root = (-0.05 + math.sqrt(0.05**2 + 4 * c * t)) / (2 * c)
        assert hit.status == "hit" and abs(hit.kl - t) <= tol * t
        assert hit.kl == cost(hit.strength)
        # |cost(s) - t| ≤ tol·t and cost' ≥ 0.05 + 2·c·s_min bound how far s can be from the root
        s_lo = (-0.05 + math.sqrt(0.05**2 + 4 * c * t * (1 - tol))) / (2 * c)
        assert abs(hit.strength - root) <= tol * t / (0.05 + 2 * c * s_lo)
    assert (0.25, cost(0.25)) == points[0] and len(points) == len({s for s, _ in points})


def test_search_takes_the_first_crossing_of_a_cost_that_is_not_monotone():
    cost = lambda s: s**2 if s <= 1 else max(0.0, 2 - s**2)  # noqa: E731  # rises to 1 at s = 1, then falls
    (hit,), _ = match_targets(cost, [0.5], start=[0.6, 1.2], tol=0.01, steps=10)
    assert hit.status == "hit" and abs(hit.strength - math.sqrt(0.5)) < 0.01 and abs(hit.kl - 0.5) <= 0.005


def test_search_reports_an_unreachable_target_with_the_largest_cost_reached():
    cost = lambda s: 0.2 * (1 - math.exp(-s))  # noqa: E731  # saturates below 0.2
    hits, points = match_targets(cost, [0.1, 0.5], start=[0.5, 1.0], tol=0.05, max_doublings=3)
    assert hits[0].status == "hit"
    far = hits[1]
    assert far.status == "unreachable" and not far.reached
    assert far.strength == 8.0 and far.kl == max(k for _, k in points) == cost(8.0)  # 1 → 2 → 4 → 8


def test_search_budget_runs_out_gives_the_closest_point():
    cost = lambda s: s**4  # noqa: E731  # the sqrt interpolation is off for a quartic: it needs steps
    (hit,), points = match_targets(cost, [0.3], start=[1.0], tol=1e-6, steps=1)
    assert hit.status == "closest" and len(points) == 2
    assert abs(hit.kl - 0.3) == min(abs(k - 0.3) for _, k in points)


@pytest.mark.parametrize(
    "targets, tol, match",
    [
        ([-0.1], 0.05, "must be a number ≥ 0"),
        ([0.0], 0.05, "must be above 0"),
        ([], 0.05, "needs at least one KL target"),
        ([0.1, 0.1], 0.05, "lists a target twice"),
        ([float("nan")], 0.05, "must be a number ≥ 0"),
        ([0.1], 0.0, "kl_tol must be a number between 0 and 1"),
        ([0.1], 1.5, "kl_tol must be a number between 0 and 1"),
    ],
)
def test_search_refuses_bad_targets(targets, tol, match):
    with pytest.raises(HpreditError, match=match):
        match_targets(lambda s: s, targets, [1.0], tol)


# --------------------------------------------------------------------------- the curve


def test_curve_converts_exactly_for_a_quadratic_cost_and_refuses_outside_it():
    c = 0.4
    curve = KLCurve.from_points([(s, c * s**2) for s in (2.0, 0.5, 1.0)], "test")
    assert curve.strengths == (0.5, 1.0, 2.0) and curve.max_kl == pytest.approx(1.6)
    for s in (0.1, 0.5, 0.75, 1.9):
        assert curve.strength_for(c * s**2) == pytest.approx(s, rel=1e-12)
    assert curve.strength_for(0) == 0.0
    with pytest.raises(HpreditError, match=r"kl 2 is beyond this editor's measured strength → KL curve \(0 to 1.6"):
        curve.strength_for(2.0)
    with pytest.raises(HpreditError, match="kl must be a number ≥ 0"):
        curve.strength_for(-0.1)


@pytest.mark.parametrize(
    "entry, match",
    [
        ([1, 2], "'kl_curve' must be an object"),
        ({"strengths": [1.0], "kl": [0.1, 0.2]}, "as many KL values as strengths"),
        ({"strengths": [1.0, 0.5], "kl": [0.1, 0.2]}, "strengths must be increasing"),
        ({"strengths": [0.0, 1.0], "kl": [0.0, 0.2]}, "strengths must be positive"),
        ({"strengths": [1.0], "kl": [-0.2]}, "KL values must be finite numbers ≥ 0"),
        ({"strengths": [1.0], "kl": ["0.2"]}, "KL values must be finite numbers ≥ 0"),
    ],
)
def test_artifact_with_a_bad_curve_is_refused(model_tok, tmp_path, entry, match):
    model, _ = model_tok
    path = random_editor("caa", model).save_pretrained(tmp_path / "ed")
    cfg = json.loads((path / "config.json").read_text())
    cfg["kl_curve"] = entry
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HpreditError, match=match):
        load_editor(path)


@pytest.mark.parametrize("kind", ["hpr", "caa", "iti"])
def test_artifacts_with_and_without_a_curve_load(model_tok, tmp_path, kind):
    model, _ = model_tok
    ed = random_editor(kind, model)
    old = load_editor(ed.save_pretrained(tmp_path / "old"))  # no curve: as every artifact saved before
    assert old.kl_curve is None and "kl_curve" not in json.loads((tmp_path / "old" / "config.json").read_text())
    ed.kl_curve = KLCurve.from_points([(0.5, 0.02), (1.0, 0.09)], "neutral")
    back = load_editor(ed.save_pretrained(tmp_path / "new"))
    assert back.kl_curve == ed.kl_curve


def test_attach_by_kl_uses_the_curve_and_refuses_what_it_cannot_convert(model_tok):
    model, tok = model_tok
    ed = random_editor("caa", model)
    with pytest.raises(HpreditError, match="has no measured strength → KL curve, so kl cannot be converted"):
        ed.attach(model, kl=0.1)
    text = neutral_text(model, tok, max_new_tokens=6, prompts=("The river", "A good way to"))
    points = []
    for s in (0.25, 0.5, 1.0):
        with ed.attach(model, strength=s):
            points.append((s, fluency_cost(model, text)["kl"]))
    ed.kl_curve = KLCurve.from_points(points)
    kl = points[1][1]
    with ed.attach(model, kl=kl) as handle:
        assert handle.strength == pytest.approx(0.5, rel=1e-12)  # a measured point converts to its own strength
    with pytest.raises(HpreditError, match="give strength or kl, not both"):
        ed.attach(model, strength=0.5, kl=kl)
    with pytest.raises(HpreditError, match="beyond this editor's measured"):
        ed.attach(model, kl=10 * points[-1][1])
    with pytest.raises(HpreditError, match="kl must be a number ≥ 0"):
        ed.attach(model, kl=-1.0)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_run_config_refuses_an_unknown_protocol_or_tolerance():
    with pytest.raises(HpreditError, match="unknown protocol 'magic': use matched or grid"):
        RunConfig(protocol="magic")
    with pytest.raises(HpreditError, match="kl_tol must be a number between 0 and 1"):
        RunConfig(kl_tol=2.0)


# --------------------------------------------------------------------------- the comparison


def _matched(model, tok, csv, seeds, targets, out=None, methods=("none", "hpr", "caa")):
    return compare(
        model,
        tok,
        methods=list(methods),
        seeds=seeds,
        data=csv,
        limit=2,
        targets=targets,
        out=out,
        progress=False,
        log=lambda s: None,
    )


def test_matched_compare_reports_each_method_at_each_target(model_tok, truthfulqa_csv, tmp_path):
    model, tok = model_tok
    targets = [1e-3, 1e6]  # the second is beyond any strength ≤ 100 of these edits on a tiny model
    result = _matched(model, tok, truthfulqa_csv, [0], targets, tmp_path / "cmp")
    assert result.setting["protocol"] == "matched" and result.setting["targets"] == targets
    rows = result.runs
    none = [r for r in rows if r["method"] == "none"]
    assert len(none) == 1 and none[0]["target"] is None and none[0]["kl"] < 1e-6
    for m in ("hpr", "caa"):
        mine = {r["target"]: r for r in rows if r["method"] == m}
        assert sorted(mine) == targets
        low, high = mine[1e-3], mine[1e6]
        assert low["status"] == "hit" and abs(low["kl"] - 1e-3) <= 0.05 * 1e-3  # measured again on test: same KL
        assert len(low["test_items"]) == len(result.splits[0]["split"]["groups"]["test"][:2])
        assert high["status"] == "unreachable" and high["test"] is None
        assert high["kl"] == max(t["kl"] for t in high["validation"])  # the largest cost reached
    summary = result.summary
    assert set(summary["targets"]) == {"0.001", "1e+06"} and "none" in summary["baseline"]
    assert summary["targets"]["1e+06"]["caa"]["reached"] == 0
    paired = summary["paired"]["0.001"]
    assert paired["other"] == "caa" and paired["ci"][0] <= paired["mean"] <= paired["ci"][1]
    assert summary["paired"]["1e+06"]["other"] is None
    table = markdown_table(result)
    assert "**KL target 0.001 nats/token**" in table and "hpr − caa" in table and "unreachable" in table
    assert "± 0.0000" not in table  # one seed: the per-item bootstrap CI, no spread over seeds
    files = {p.name for p in (tmp_path / "cmp").iterdir()}
    assert {"results.json", "table.md", "mc2_vs_kl.png"} <= files
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(summary))


def test_no_paired_difference_where_the_primary_metric_has_no_per_item_values():
    """Refusal's net is a difference of two rates over different items: nothing to pair, and the
    summary says so (not that HPR missed a cost it reached)."""
    rows = [
        {
            "seed": s,
            "method": m,
            "target": 0.1,
            "kl": 0.1,
            "ppl": 3.0,
            "strength": 1.0,
            "test": {"net": v},
            "test_items": None,
        }
        for s in (0, 1)
        for m, v in (("hpr", 0.03), ("caa", 0.0))
    ]
    summary = summarise_matched(rows, ["hpr", "caa"], ["net"], "net", [0.1])
    assert summary["targets"]["0.1"]["hpr"]["reached"] == 2
    assert summary["paired"]["0.1"]["other"] is None
    assert summary["paired"]["0.1"]["why"] == "net is not a mean over test items (no per-item values to pair)"
    for r in rows:
        r["test_items"] = [r["test"]["net"]]
    rows[0]["test"], rows[0]["test_items"], rows[0]["kl"] = None, None, 0.05  # HPR unreachable on seed 0
    summary = summarise_matched(rows, ["hpr", "caa"], ["net"], "net", [0.1])
    assert summary["paired"]["0.1"]["why"] == "hpr did not reach this cost on every seed"


def test_matched_results_merge_over_seeds_and_refuse_mixing_protocols(model_tok, truthfulqa_csv):
    model, tok = model_tok
    a = _matched(model, tok, truthfulqa_csv, [0], [1e-3], methods=("none", "hpr"))
    b = _matched(model, tok, truthfulqa_csv, [1], [1e-3], methods=("none", "hpr"))
    both = merge([a, b])
    entry = both.summary["targets"]["0.001"]["hpr"]
    assert entry["reached"] == 2 and "t over 2 seeds" in entry["mc2"]["ci"]["kind"]
    assert len([r for r in both.runs if r["method"] == "hpr"]) == 2
    grid = compare(
        model,
        tok,
        methods=["none", "hpr"],
        seeds=[0],
        data=truthfulqa_csv,
        limit=2,
        protocol="grid",
        progress=False,
        log=lambda s: None,
    )
    table = markdown_table(grid)  # grid, one seed: the per-item bootstrap CI of MC2, no "± 0.0000"
    assert "± 0.0000" not in table and grid.summary["hpr"]["mc2"]["ci"]["kind"].startswith("bootstrap over")
    lo, hi = grid.summary["hpr"]["mc2"]["ci"]["low"], grid.summary["hpr"]["mc2"]["ci"]["high"]
    assert lo <= grid.summary["hpr"]["mc2"]["mean"] <= hi and f"[{lo:.4f}, {hi:.4f}]" in table
    with pytest.raises(HpreditError, match="different protocols"):
        merge([a, grid])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"protocol": "best"}, "unknown protocol 'best'"),
        ({"targets": [-0.5]}, "each of targets must be a number ≥ 0"),
        ({"targets": [0]}, "must be above 0"),
        ({"kl_tol": 0}, "kl_tol must be a number between 0 and 1"),
        ({"steps": -1}, "steps must be at least 0"),
    ],
)
def test_compare_refuses_bad_matched_settings(model_tok, truthfulqa_csv, kwargs, match):
    model, tok = model_tok
    with pytest.raises(HpreditError, match=match):
        compare(model, tok, methods=["none"], data=truthfulqa_csv, progress=False, log=lambda s: None, **kwargs)


def test_cli_kl_converts_through_the_curve_or_is_one_error_line(tokenizer, truthfulqa_csv, tmp_path, capsys):
    from hpredit.cli import main

    from .conftest import saved_tiny_model

    model_dir = tmp_path / "tiny-llama"  # the editor's fingerprint names the model tiny-llama
    ed = random_editor("caa", saved_tiny_model(model_dir, tokenizer))
    plain = ed.save_pretrained(tmp_path / "plain")
    ed.kl_curve = KLCurve.from_points([(0.5, 0.02), (1.0, 0.09)])
    curved = ed.save_pretrained(tmp_path / "curved")
    gen = ["generate", "Hi", "--model", str(model_dir), "--max-new-tokens", "2", "--editor"]
    cases = [
        ([*gen, str(plain), "--kl", "0.05"], "no measured strength → KL curve, so --kl cannot be converted"),
        ([*gen, str(curved), "--kl", "0.05", "--strength", "0.5"], "give --strength or --kl, not both"),
        ([*gen, str(curved), "--kl", "0.5"], "--kl 0.5 is beyond this editor's measured strength → KL curve"),
        ([*gen, str(curved), "--kl", "-0.1"], "--kl must be a number ≥ 0"),
        (
            ["eval", "--model", str(model_dir), "--data", str(truthfulqa_csv), "--limit", "1"]
            + ["--editor", str(plain), "--kl", "0.05"],
            "--kl cannot be converted",
        ),
    ]
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and fragment in err and err.count("error:") == 1, (argv, err)
    with pytest.raises(SystemExit) as exc:
        main([*gen, str(curved), "--kl", "0.05"])
    assert exc.value.code in (0, None)
