"""The main job as a library function (hpredit.run): the same defaults as ``hpredit run``, a typed
result that is what summary.json holds, and the CLI as a call to it."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path

import pytest

import hpredit
from hpredit import pipeline
from hpredit.cli import commands
from hpredit.cli.configs import _config_from
from hpredit.compare import CompareConfig
from hpredit.evaluation.job import EvalConfig
from hpredit.results import RunResult, load_result

from .conftest import saved_tiny_model


@pytest.mark.parametrize(
    "command, config",
    [
        (commands.run, pipeline.RunConfig),
        (commands.fit, pipeline.FitConfig),
        (commands.generate, pipeline.GenerateConfig),
        (commands.eval_, EvalConfig),
        (commands.compare, CompareConfig),
    ],
)
def test_each_commands_options_are_its_configs_fields_with_their_defaults_and_help(command, config):
    """One default and one help per setting: on the config's field; the command is built from it."""
    cli = inspect.signature(command).parameters
    fields = {f.name: f for f in dataclasses.fields(config)}
    assert set(cli) == {n for n, f in fields.items() if f.metadata.get("cli", True)}
    for name, param in cli.items():
        f = fields[name]
        default = f.metadata.get("cli_default", f.default)
        if default is dataclasses.MISSING:
            assert param.default is inspect.Parameter.empty, name
            continue
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        assert param.default == shown, name
        info = typing.get_args(param.annotation)[1]
        help_ = f.metadata["help"]
        assert info.help == (help_() if callable(help_) else help_) and info.help, name


def test_a_tuple_option_read_from_the_command_line_is_the_configs_value():
    cfg = _config_from(pipeline.RunConfig, {"strengths": "0.25,0.5,1.0", "limit": None})
    assert cfg.strengths == pipeline.RunConfig().strengths == (0.25, 0.5, 1.0)
    assert _config_from(pipeline.FitConfig, {"out": Path("o"), "layers": ""}).layers is None
    assert _config_from(pipeline.FitConfig, {"out": Path("o"), "layers": "3,4"}).layers == (3, 4)


def test_the_library_takes_a_config_whole_or_its_fields():
    """``run(cfg)``, ``run(**fields)`` and ``run(cfg, **fields)`` make the same config; a misspelt field is a
    TypeError naming it, as a Python call's would be."""
    cfg = pipeline.RunConfig(limit=3)
    assert pipeline.RunConfig.of(cfg, {"top_k": 2}) == pipeline.RunConfig(limit=3, top_k=2)
    assert pipeline.RunConfig.of(None, {"limit": 3}) == cfg
    with pytest.raises(TypeError, match="top_kk"):
        hpredit.run(cfg, top_kk=2)
    with pytest.raises(TypeError, match="must be a RunConfig"):
        hpredit.run(pipeline.FitConfig(out=Path("o")))


def test_strength_rules_of_run_and_compare_are_one_function_with_two_settings():
    from hpredit.compare import PROTOCOLS

    assert PROTOCOLS.get("grid").run_max_doublings == 0
    assert CompareConfig().max_doublings is None  # grid's default, 3, inside
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
