"""Reliability, round three (items 5-9): small target costs, cost options that do not apply to the
protocol, what result files say about a missed target, the strength → KL curve inside the
artifact's checksum, and what ``--kl`` converts to.

Command lines run in-process through ``hpredit.cli.main`` (the ``world`` of tests/test_bad_inputs.py:
tiny random models, loading blocked where the case must be refused first)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import hpredit.compare.strength as strength_mod
from hpredit.cli import main
from hpredit.compare import compare, markdown_table, match_targets
from hpredit.editors import load_editor
from hpredit.editors.kl_curve import KLCurve
from hpredit.errors import HpreditError
from hpredit.evaluation.side_effects import fluency_cost, neutral_text

from .conftest import random_editor
from .test_bad_inputs import (  # noqa: F401  (fixtures)
    Case,
    _fill,
    _snapshot,
    no_model_loads,
    one_error_line,
    world,
)


def _cli(argv: list[str], capsys) -> tuple[int | None, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture
def rounding(monkeypatch):
    """Fluency costs as a real model's float rounding gives them: a cost of (almost) nothing is
    measured slightly below 0."""

    def rounded(model, text):
        cost = fluency_cost(model, text)
        return {**cost, "kl": cost["kl"] - 1e-9}

    monkeypatch.setattr(strength_mod, "fluency_cost", rounded)


# --------------------------------------------------------------------------- 5. small target costs


def test_search_treats_a_cost_measured_below_zero_as_zero():
    cost = lambda s: 0.3 * s**2 - 1e-9  # noqa: E731  # rounding: the weakest strengths measure below 0
    hits, points = match_targets(cost, [1e-12, 0.1], start=[0.25, 0.5, 1.0], tol=0.05, steps=6)
    assert [h.status for h in hits][1] == "hit" and hits[0].status in ("hit", "closest")
    assert all(k >= 0 for _, k in points) and hits[0].kl >= 0
    KLCurve.from_points(points)  # the measured points make a curve


def test_a_curve_takes_a_cost_measured_below_zero_as_zero():
    curve = KLCurve.from_points([(0.001, -3e-10), (0.5, 0.02), (1.0, 0.09)])
    assert curve.kl == (0.0, 0.02, 0.09)
    assert curve.strength_for(0.02) == pytest.approx(0.5)
    with pytest.raises(HpreditError, match="KL values must be finite numbers ≥ 0"):
        KLCurve((0.5,), (-0.1,))  # a curve given (as in an artifact), not measured: refused as before
    with pytest.raises(HpreditError, match="KL values must be finite numbers ≥ 0"):
        KLCurve.from_points([(0.5, float("nan"))])


def test_compare_at_a_tiny_target_does_not_crash(model_tok, truthfulqa_csv, rounding):
    model, tok = model_tok
    result = compare(
        model,
        tok,
        methods=["none", "hpr"],
        seeds=[0],
        data=truthfulqa_csv,
        limit=2,
        targets=[1e-12],
        strengths={"hpr": (1e-5, 0.25)},  # the warm start measures a cost below 0 first
        steps=3,
        progress=False,
        log=lambda s: None,
    )
    (row,) = [r for r in result.runs if r["method"] == "hpr"]
    assert row["status"] in ("hit", "closest") and row["test"] is not None


@pytest.mark.parametrize("protocol", ["matched", "grid"])
def test_run_strength_at_a_tiny_cap_does_not_crash(model_tok, truthfulqa_csv, rounding, protocol):
    from hpredit.data import load_truthfulqa
    from hpredit.pipeline import choose_strength_on_val

    model, tok = model_tok
    ed = random_editor("hpr", model)
    val = load_truthfulqa(truthfulqa_csv)[:2]
    choice = choose_strength_on_val(model, tok, ed, val, [1e-5, 0.25], 1e-9, 1, False, protocol, 0.05)
    assert ed.kl_curve is not None and min(ed.kl_curve.kl) >= 0
    assert math.isfinite(choice.strength)


def test_a_search_that_cannot_shrink_its_bracket_stops():
    """A cost with a jump (no strength costs the target within the tolerance): the bracket narrows
    to float resolution and the search stops there, whatever the step budget."""
    import time

    cost = lambda s: 0.0 if s < 0.3 else 1.0  # noqa: E731
    t0 = time.perf_counter()
    (hit,), points = match_targets(cost, [0.5], start=[1.0], tol=0.05, steps=10**6)
    assert hit.status == "closest" and len(points) < 2000
    assert time.perf_counter() - t0 < 5


def test_grid_refinement_stops_when_the_bracket_cannot_shrink(model_tok, truthfulqa_csv, monkeypatch):
    from hpredit.compare import choose_strength
    from hpredit.data import load_truthfulqa

    model, tok = model_tok
    text = neutral_text(model, tok, max_new_tokens=4, prompts=("The river", "Hi"))
    ed = random_editor("caa", model)
    val = load_truthfulqa(truthfulqa_csv)[:1]
    calls = []

    def jump(model, neutral, editor, strengths):  # a cost with a jump at 0.3: the bisection closes in on it
        calls.extend(strengths)
        return [{"kl": 0.0 if s < 0.3 else 1.0} for s in strengths]

    monkeypatch.setattr(strength_mod, "fluency_at", jump)
    monkeypatch.setattr(strength_mod, "scores_at", lambda *a: [{"mc2": 0.5} for _ in a[-1]])
    pick = choose_strength(model, tok, [ed], [0.25, 1.0], val, text, kl_cap=0.5, refine=10**4)
    assert len(calls) < 200 and len(set(calls)) == len(calls)  # each strength measured once
    assert 0.25 <= pick.strength < 0.3


# --------------------------------------------------------------------------- 6. options that do not apply

CMP = "compare --model {model} --data {csv} --methods none,hpr --out {out}"
RUN = "run --model {model} --data {csv} --top-k 2 --out {out}"

NOT_APPLICABLE = [
    Case("compare-refine-matched", CMP + " --refine 2", "--refine applies only to --protocol grid"),
    Case(
        "compare-kl-cap-matched",
        CMP + " --protocol matched --kl-cap 0.3",
        "--kl-cap applies only to --protocol grid",
    ),
    Case("compare-kl-cap-matched-default", CMP + " --kl-cap 0.3", "give the costs to reach as --targets"),
    Case(
        "compare-targets-grid", CMP + " --protocol grid --targets 0.1", "--targets applies only to --protocol matched"
    ),
    Case("compare-kl-tol-grid", CMP + " --protocol grid --kl-tol 0.1", "--kl-tol applies only to --protocol matched"),
    Case("compare-steps-grid", CMP + " --protocol grid --steps 2", "--steps applies only to --protocol matched"),
    Case("run-kl-tol-grid", RUN + " --protocol grid --kl-tol 0.1", "--kl-tol applies only to --protocol matched"),
    Case("run-max-halvings-matched", RUN + " --max-halvings 2", "--max-halvings applies only to --protocol grid"),
    # hostile values of the cost options: one line each
    Case("compare-targets-empty", CMP + " --targets ∅", "--targets needs at least one value"),
    Case("compare-targets-inf", CMP + " --targets 0.1,inf", "each of --targets must be a number ≥ 0"),
    Case("compare-targets-nan", CMP + " --targets nan", "each of --targets must be a number ≥ 0"),
    Case("compare-targets-negative-zero", CMP + " --targets -0", "each of --targets must be above 0"),
    Case("compare-targets-twice", CMP + " --targets 0.1,0.25,0.1", "--targets lists a target twice"),
    Case("compare-kl-tol-1", CMP + " --kl-tol 1", "--kl-tol must be a number between 0 and 1"),
    Case("compare-kl-tol-nan", CMP + " --kl-tol nan", "--kl-tol must be a number between 0 and 1"),
    Case("compare-steps-negative", CMP + " --steps -1", "--steps must be at least 0"),
    Case("compare-grid-kl-cap-inf", CMP + " --protocol grid --kl-cap inf", "--kl-cap must be a positive number"),
    Case("run-kl-cap-negative", RUN + " --kl-cap -0.5", "--kl-cap must be a positive number"),
    Case("run-kl-tol-0", RUN + " --kl-tol 0", "--kl-tol must be a number between 0 and 1"),
]


@pytest.mark.parametrize("case", NOT_APPLICABLE, ids=[c.id for c in NOT_APPLICABLE])
def test_cost_options_are_honoured_or_refused(case, world, tmp_path, capsys, no_model_loads):  # noqa: F811
    before = _snapshot(Path(world["root"]))
    code, _, err = _cli(_fill(case.argv, world, tmp_path / "out"), capsys)
    one_error_line(code, err, case.fragment)
    assert list(tmp_path.iterdir()) == [] and _snapshot(Path(world["root"])) == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"refine": 2}, r"refine applies only to protocol='grid' \(this comparison is 'matched'\)"),
        ({"refine": 0}, "refine applies only to protocol='grid'"),  # given is given, even the default value
        ({"max_doublings": 1}, "max_doublings applies only to protocol='grid'"),
        ({"kl_cap": 0.3}, "kl_cap applies only to protocol='grid'.*give the costs to reach as targets"),
        ({"protocol": "grid", "targets": [0.1]}, "targets applies only to protocol='matched'"),
        ({"protocol": "grid", "kl_tol": 0.05}, "kl_tol applies only to protocol='matched'"),
        ({"protocol": "grid", "steps": 4}, "steps applies only to protocol='matched'"),
    ],
)
def test_the_library_refuses_what_does_not_apply_as_the_cli_does(model_tok, truthfulqa_csv, kwargs, match):
    model, tok = model_tok
    with pytest.raises(HpreditError, match=match):
        compare(model, tok, methods=["none"], data=truthfulqa_csv, progress=False, log=lambda s: None, **kwargs)


def test_run_config_resolves_its_defaults_by_protocol():
    from hpredit.pipeline import RunConfig

    matched, grid = RunConfig(), RunConfig(protocol="grid")
    assert (matched.kl_tol, matched.max_halvings) == (0.05, None)
    assert (grid.kl_tol, grid.max_halvings) == (None, 3)
    with pytest.raises(HpreditError, match="kl_tol applies only to protocol='matched'"):
        RunConfig(protocol="grid", kl_tol=0.05)
    with pytest.raises(HpreditError, match="max_halvings applies only to protocol='grid'"):
        RunConfig(max_halvings=3)


# --------------------------------------------------------------------------- 7. what a missed target is called


def test_a_missed_target_is_marked_in_every_result_file(model_tok, truthfulqa_csv, tmp_path):
    model, tok = model_tok
    result = compare(
        model,
        tok,
        methods=["none", "hpr", "caa"],
        seeds=[0],
        data=truthfulqa_csv,
        limit=2,
        targets=[1e-3, 1e6],
        kl_tol=1e-9,  # nothing lands within 1e-9 of the target: the budget runs out
        steps=0,
        out=tmp_path / "cmp",
        progress=False,
        log=lambda s: None,
    )
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    table = (tmp_path / "cmp" / "table.md").read_text()
    for m in ("hpr", "caa"):
        low = next(r for r in saved["runs"] if r["method"] == m and r["target"] == 1e-3)
        assert low["status"] == "closest" and low["kl_miss"] == pytest.approx((low["kl"] - 1e-3) / 1e-3)
        entry = saved["summary"]["targets"]["0.001"][m]
        assert entry["hit"] == 0 and entry["closest"] == [{"seed": 0, "kl": low["kl"], "miss": low["kl_miss"]}]
        assert f"| {m} |" not in table.split("**KL target 1e+06")[0]  # never shown as a plain row
        assert f"| {m} (closest: KL {low['kl']:.4g}, {100 * low['kl_miss']:+.0f} % off the target) |" in table
        far = next(r for r in saved["runs"] if r["method"] == m and r["target"] == 1e6)
        assert far["status"] == "unreachable"
    assert "closest: no strength measured came within ± 1e-07 % of the target" in table
    assert table == markdown_table(result) + "\n"


@pytest.mark.parametrize("cap, tol, status", [(1e6, 0.05, "unreachable"), (0.01, 1e-9, "closest")])
def test_run_summary_says_whether_the_cap_was_hit(model_tok, cap, tol, status):
    from hpredit.pipeline import choose_strength_on_val
    from hpredit.results import RunEvaluation

    model, tok = model_tok
    ed = random_editor("caa", model)
    choice = choose_strength_on_val(model, tok, ed, [], [0.25, 1.0], cap, None, False, "matched", tol)
    saved = json.loads(json.dumps(RunEvaluation(choice, {}).to_json()))
    assert saved["status"] == status and saved["kl_tol"] == tol
    assert saved["kl"] == pytest.approx(
        next(t["kl"] for t in saved["validation_sweep"] if t["strength"] == saved["strength"])
    )
    assert saved["kl_miss"] == pytest.approx((saved["kl"] - cap) / cap)
    assert saved["over_kl_cap"] is (saved["kl"] > cap * (1 + tol))
    back = RunEvaluation.from_json(saved)
    assert back.choice.status == status and back.to_json() == saved
    from hpredit.cli.show import strength_line

    assert status in strength_line(choice) and f"{choice.kl:.4f}" in strength_line(choice)


# --------------------------------------------------------------------------- 8. the curve inside the checksum

CURVE = {"strengths": [0.5, 1.0], "kl": [0.02, 0.09], "text": "neutral"}


def _edit(path: Path, change) -> Path:
    cfg = json.loads((path / "config.json").read_text())
    change(cfg)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return path


@pytest.mark.parametrize(
    "kind, change",
    [
        ("caa", lambda c: c["kl_curve"].update(kl=[0.2, 0.9])),  # invented numbers
        ("caa", lambda c: c["kl_curve"].update(strengths=[0.25, 1.0])),
        ("caa", lambda c: c.pop("kl_curve")),
        ("caa", lambda c: c.update(layers=c["layers"][:1])),  # what the edit does, besides the weights
        ("hpr", lambda c: c["config"].update(gate=False)),
        ("iti", lambda c: c["config"].update(alpha=3.0)),
        ("iti", lambda c: c.update(heads=c["heads"][::-1])),
    ],
    ids=["curve-numbers", "curve-strengths", "curve-removed", "layers", "hpr-gate", "iti-alpha", "iti-heads"],
)
def test_an_edited_config_is_refused_at_load(model_tok, tmp_path, kind, change):
    model, _ = model_tok
    ed = random_editor(kind, model)
    ed.kl_curve = KLCurve.from_json(CURVE, "test")
    path = ed.save_pretrained(tmp_path / "ed")
    assert load_editor(path).kl_curve == ed.kl_curve
    _edit(path, change)
    with pytest.raises(HpreditError, match="config.json does not match its checksum"):
        load_editor(path)


def test_a_curve_typed_into_an_editor_without_one_is_refused(model_tok, tmp_path, capsys, tokenizer):
    from .conftest import saved_tiny_model

    model_dir = tmp_path / "tiny-llama"
    ed = random_editor("caa", saved_tiny_model(model_dir, tokenizer))
    path = _edit(ed.save_pretrained(tmp_path / "ed"), lambda c: c.update(kl_curve=CURVE))
    code, _, err = _cli(["generate", "Hi", "--model", str(model_dir), "--editor", str(path), "--kl", "0.05"], capsys)
    one_error_line(code, err, "config.json does not match its checksum")


def test_what_is_outside_the_checksum_can_change(model_tok, tmp_path):
    """The validation metrics (reported, never used to edit) and the date are outside it."""
    model, _ = model_tok
    path = random_editor("hpr", model).save_pretrained(tmp_path / "ed")
    _edit(path, lambda c: c.update(metrics={}, created="2020-01-01T00:00:00+00:00"))
    assert load_editor(path).metrics == {}


def _as_before(path: Path) -> Path:
    """The artifact as the previous version wrote it: format 1, no config checksum."""
    return _edit(path, lambda c: (c.pop("config_sha256"), c.update(format_version=1)))


def test_an_artifact_of_the_previous_version_loads_but_its_curve_is_not_used(model_tok, tmp_path):
    model, _ = model_tok
    ed = random_editor("caa", model)
    plain = load_editor(_as_before(ed.save_pretrained(tmp_path / "plain")))
    assert plain.kl_curve is None and plain.layers == ed.layers
    ed.kl_curve = KLCurve.from_json(CURVE, "test")
    old = load_editor(_as_before(ed.save_pretrained(tmp_path / "old")))
    assert old.kl_curve is None and old.layers == ed.layers
    with pytest.raises(HpreditError, match="saved without a checksum covering it.*pass a strength"):
        old.attach(model, kl=0.05)
    with old.attach(model, strength=0.5):  # everything else works as before
        pass
    back = load_editor(old.save_pretrained(tmp_path / "resaved"))  # saved again: no unverified curve
    assert back.kl_curve is None


def test_a_new_artifact_without_its_config_checksum_is_refused(model_tok, tmp_path):
    model, _ = model_tok
    path = _edit(random_editor("caa", model).save_pretrained(tmp_path / "ed"), lambda c: c.pop("config_sha256"))
    with pytest.raises(HpreditError, match="config.json has no 'config_sha256' entry"):
        load_editor(path)


def test_a_curve_beyond_the_strength_bound_is_refused():
    with pytest.raises(HpreditError, match="strengths must be positive finite numbers up to 100"):
        KLCurve((50.0, 500.0), (0.1, 1.0))
    with pytest.raises(HpreditError, match="strengths must be positive finite numbers up to 100"):
        KLCurve.from_json({"strengths": [50.0, 500.0], "kl": [0.1, 1.0]}, "test")
    curve = KLCurve((50.0, 100.0), (0.1, 1.0))
    object.__setattr__(curve, "strengths", (50.0, 500.0))  # past every check: the conversion says so itself
    with pytest.raises(HpreditError, match=r"^kl 0.5 converts to strength \d+.* beyond the largest strength"):
        curve.strength_for(0.5)


# --------------------------------------------------------------------------- 9. what --kl converted to, and where


@pytest.fixture
def curved(tmp_path, tokenizer):
    from .conftest import saved_tiny_model

    model_dir = tmp_path / "tiny-llama"
    ed = random_editor("caa", saved_tiny_model(model_dir, tokenizer))
    ed.kl_curve = KLCurve.from_json(CURVE, "test")
    return model_dir, ed.save_pretrained(tmp_path / "curved"), ed.kl_curve.strength_for(0.05)


def test_generate_says_the_curve_was_measured_with_another_scope(curved, capsys):
    from hpredit.pipeline import generate

    model_dir, path, s = curved
    gen = ["generate", "Hi", "--model", str(model_dir), "--max-new-tokens", "2", "--editor", str(path), "--kl", "0.05"]
    code, out, err = _cli(gen, capsys)
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert code in (0, None) and len(notes) == 1, err
    assert "--kl 0.05 converts to strength" in notes[0] and "scope all" in notes[0]
    assert "--scope last-prompt-and-generated" in notes[0]
    code, out, err = _cli([*gen, "--scope", "all"], capsys)
    assert code in (0, None) and "note:" not in err
    result = generate(["Hi"], path, model_dir, kl=0.05, max_new_tokens=2)
    assert (result.kl, result.strength) == (0.05, pytest.approx(s)) and "scope all" in result.note
    assert generate(["Hi"], path, model_dir, kl=0.05, max_new_tokens=2, scope="all").note is None
    assert generate(["Hi"], path, model_dir, strength=0.5, max_new_tokens=2).kl is None


def test_eval_records_the_cost_asked_for_and_its_strength(curved, truthfulqa_csv, tmp_path):
    from hpredit.evaluation import evaluate
    from hpredit.results import load_result

    model_dir, path, s = curved
    result = evaluate(model_dir, editor=path, kl=0.05, data=truthfulqa_csv, limit=1, out=tmp_path / "ev", show=False)
    saved = load_result(tmp_path / "ev").summary["editor"]
    assert saved["kl"] == 0.05 and saved["strength"] == pytest.approx(s) and result.summary["editor"] == saved
    plain = evaluate(model_dir, editor=path, strength=0.5, data=truthfulqa_csv, limit=1, show=False)
    assert plain.summary["editor"]["kl"] is None and plain.summary["editor"]["strength"] == 0.5


@pytest.mark.parametrize("targets", [0.1, "0.1", object()])
def test_targets_that_are_not_a_list_are_one_error(targets):
    from hpredit.checks import check_kl_targets

    with pytest.raises(HpreditError, match="targets must be a list of KL targets"):
        check_kl_targets(targets)
