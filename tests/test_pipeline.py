"""The main job as a library function (hpredit.run): the same defaults as ``hpredit run``, a typed
result that is what summary.json holds, and the CLI as a call to it."""

from __future__ import annotations

import inspect
import json

import pytest

import hpredit
from hpredit import pipeline
from hpredit.cli import commands
from hpredit.cli.options import parse_list
from hpredit.results import RunResult, load_result

from .conftest import saved_tiny_model


def _cli_defaults(command) -> dict:
    return {name: p.default for name, p in inspect.signature(command).parameters.items()}


@pytest.mark.parametrize("command, job", [(commands.run, pipeline.run), (commands.fit, pipeline.fit)])
def test_python_has_the_command_lines_defaults(command, job):
    cli, api = _cli_defaults(command), _cli_defaults(job)
    shared = set(cli) & set(api)
    assert len(shared) >= 15
    for name in shared - {"out", "layers"}:
        value = cli[name]
        if name == "strengths":
            value = tuple(parse_list(value, "--strengths", float, "numbers"))
        assert api[name] == value, name
    assert str(api.get("out", "")) == str(cli["out"]) or command is commands.fit


def test_strength_rules_of_run_and_compare_are_one_function_with_two_settings():
    from hpredit.compare import PROTOCOLS, compare

    assert PROTOCOLS.get("grid").run_max_doublings == 0
    assert inspect.signature(compare).parameters["max_doublings"].default is None  # grid's default, 3, inside
    assert PROTOCOLS.get("grid").options["max_doublings"] == 3


@pytest.fixture(scope="module")
def tiny_run(tokenizer, truthfulqa_csv, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    saved_tiny_model(root / "tiny", tokenizer)
    result = hpredit.run(
        out=root / "run",
        model=root / "tiny",
        data=truthfulqa_csv,
        limit=3,
        epochs=1,
        top_k=2,
        strengths=(0.5, 1.0),
        save_activations=False,
        progress=False,
        show=False,
        command="test",
    )
    return root, result


def test_run_returns_what_it_writes(tiny_run):
    root, result = tiny_run
    assert isinstance(result, RunResult) and result.editor is not None
    written = json.loads((root / "run" / "summary.json").read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(result.to_json()))
    assert sorted(p.name for p in (root / "run").iterdir()) == ["editor", "eval", "split.json", "summary.json"]
    assert written["command"] == "test" and {"hpredit", "torch"} <= set(written["versions"])
    ev = result.evaluation
    assert ev is not None and ev.choice.strength in [t["strength"] for t in ev.choice.tried]
    assert [t["strength"] for t in ev.choice.tried][:2] == [0.5, 1.0]  # the KL search starts from the grid
    assert ev.choice.protocol == "matched" and written["evaluation"]["strength_rule"] == "matched"
    curve = hpredit.load_editor(root / "run" / "editor").kl_curve  # the measured points, saved with the editor
    assert curve is not None and curve.strengths == tuple(sorted({t["strength"] for t in ev.choice.tried}))
    assert {"unedited", "edited", "difference"} <= set(ev.test)
    assert result.layers_edited == hpredit.load_editor(root / "run" / "editor").layers


def test_run_result_reads_back_equal(tiny_run):
    root, result = tiny_run
    back = load_result(root / "run")
    assert isinstance(back, RunResult)
    assert json.loads(json.dumps(back.to_json())) == json.loads(json.dumps(result.to_json()))
    assert back.val_probe_accuracy == result.val_probe_accuracy  # layer keys are ints again
    assert load_result(root / "run" / "eval").metrics == result.evaluation.test


def test_cli_run_is_the_library_call(tiny_run, truthfulqa_csv, tmp_path, capsys):
    """The command prints from the result; the same arguments give the same summary (bar provenance and timing)."""
    from hpredit.cli import main

    root, result = tiny_run
    argv = ["run", "--model", str(root / "tiny"), "--data", str(truthfulqa_csv), "--limit", "3", "--epochs", "1"]
    argv += ["--top-k", "2", "--strengths", "0.5,1.0", "--no-save-activations", "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code in (0, None)
    assert "edited layers" in capsys.readouterr().out
    cli = json.loads((tmp_path / "r" / "summary.json").read_text(encoding="utf-8"))
    api = json.loads(json.dumps(result.to_json()))
    skip = {"command", "created", "versions", "machine", "timing_s"}
    assert {k: v for k, v in cli.items() if k not in skip} == {k: v for k, v in api.items() if k not in skip}
    assert cli["command"].startswith("hpredit run ")
