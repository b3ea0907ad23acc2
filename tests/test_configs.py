"""The jobs' configs (hpredit.config) and the commands built from them (hpredit.cli.configs): a setting's
default and help written once, checked when the config is made, read from the command line as the
library would take it."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpredit import EvalConfig, FitConfig, GenerateConfig, RunConfig
from hpredit.checks import DEFAULT_STRENGTH, strength_given
from hpredit.cli import main
from hpredit.cli.configs import _config_from, config_parameters
from hpredit.compare import CompareConfig
from hpredit.config import JobConfig, comma_list, option
from hpredit.errors import HpreditError


@dataclass(frozen=True, kw_only=True)
class _Toy(JobConfig):
    name: str = option(help="A required name.", flags=("--name", "-n"))
    sizes: tuple[int, ...] = option((1, 2), "Sizes.", parse=comma_list(int, "integers"))
    ratio: float | None = option(None, "A ratio.")
    loud: bool = option(False, "Shout.")
    hook: object = option(None, cli=False)

    def check(self) -> None:
        if self.ratio is not None and self.ratio <= 0:
            raise HpreditError("ratio must be > 0")


def test_a_new_config_is_a_command_whose_options_are_its_fields():
    params = {p.name: p for p in config_parameters(_Toy)}
    assert list(params) == ["name", "sizes", "ratio", "loud"]  # cli=False: the library's only
    assert params["name"].default is inspect.Parameter.empty  # no default: a required option
    assert params["sizes"].default == "1,2" and params["ratio"].default is None and params["loud"].default is False
    info = typing.get_args(params["name"].annotation)[1]
    assert (info.default, *info.param_decls) == ("--name", "-n")  # in Annotated, Typer reads the first as a flag
    assert info.help == "A required name."
    assert typing.get_args(params["ratio"].annotation)[0] == float | None
    toy = _config_from(_Toy, {"name": "x", "sizes": "3, 4", "ratio": None, "loud": True})
    assert toy == _Toy(name="x", sizes=(3, 4), loud=True)


def test_a_config_checks_its_values_when_made_and_is_frozen():
    with pytest.raises(HpreditError, match="ratio must be > 0"):
        _Toy(name="x", ratio=-1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        _Toy(name="x").name = "y"  # type: ignore[misc]
    with pytest.raises(TypeError, match="mutable default"):
        option([1, 2], "a list")


def test_of_replaces_fields_and_names_a_misspelt_one():
    base = _Toy(name="x")
    assert _Toy.of(base, {"loud": True}) == _Toy(name="x", loud=True) and _Toy.of(base) is base
    with pytest.raises(TypeError, match="no field.*lowd"):
        _Toy.of(base, {"lowd": True})
    with pytest.raises(TypeError, match="must be a _Toy"):
        _Toy.of(RunConfig(), {})  # type: ignore[arg-type]


def test_a_field_the_command_line_cannot_read_needs_a_parser():
    @dataclass(frozen=True, kw_only=True)
    class Bad(JobConfig):
        pairs: tuple[int, ...] = option((1,), "no parser")

    with pytest.raises(TypeError, match="pairs: give it a parse="):
        config_parameters(Bad)


@pytest.mark.parametrize(
    "text, message",
    [("", "--sizes needs at least one value"), ("1,x", "--sizes must be comma-separated integers, got '1,x'")],
)
def test_comma_lists_refuse_empty_and_wrong_values(text, message):
    with pytest.raises(HpreditError) as e:
        comma_list(int, "integers")(text, "--sizes")
    assert str(e.value) == message


def test_every_job_config_refuses_a_bad_value_before_anything_loads():
    cases = [
        (lambda: RunConfig(top_k=0), "top_k"),
        (lambda: RunConfig(strengths=()), "strength"),
        (lambda: FitConfig(out=Path("o"), epochs=0), "epochs"),
        (lambda: FitConfig(out=Path("o"), train_seed=-1), "train_seed"),
        (lambda: GenerateConfig(prompts=["ok", " "], editor="e"), "prompt 2 is empty"),
        (lambda: GenerateConfig(prompts=["ok"], editor="e", scope="some"), "scope"),
        (lambda: EvalConfig(scope="nowhere"), "scope"),
        (lambda: EvalConfig(task="bbq", editor="e", scope="generated"), "only --scope all"),
        (lambda: EvalConfig(judges=lambda q, a: 1.0, truth_judge="j"), "not both"),
        (lambda: CompareConfig(seeds=()), "at least one split seed"),
        (lambda: CompareConfig(methods=("hpr", "hpr")), "methods"),
    ]
    for make, fragment in cases:
        with pytest.raises(HpreditError, match=fragment):
            make()


def test_the_strength_left_out_on_the_command_line_is_the_default_not_a_given_one():
    """``--kl`` alone converts through the curve; a strength typed as 1 counts as given (then "not both")."""
    assert strength_given(_config_from(EvalConfig, {"strength": None}).strength) is False
    assert _config_from(EvalConfig, {"strength": None}).strength is DEFAULT_STRENGTH
    assert strength_given(_config_from(EvalConfig, {"strength": 1.0}).strength) is True


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["run", "--strengths", ""], "--strengths needs at least one value"),
        (["compare", "--seeds", "0,x"], "--seeds must be comma-separated integers"),
        (["run", "--top-k", "0"], "--top-k"),
        (["fit", "--out", "o", "--layers", "3,x"], "--layers must be comma-separated integers"),
        (["fit", "--out", "o", "--layers", ","], "--layers needs at least one value"),
        (["run", "--strengths", "nan"], "each of --strengths must be a number between -100 and 100, got nan"),
        (["run", "--kl-cap", "nan"], "--kl-cap must be a positive number"),
        (["run", "--protocol", "grid", "--kl-tol", "0.1"], "--kl-tol applies only to --protocol matched"),
        (["compare", "--seeds", "1,1"], "--seeds lists 1 more than once"),
        (["compare", "--targets", ""], "--targets needs at least one value"),
        (["compare", "--methods", ","], "unknown method(s) []"),
        # an empty path: not the current directory, and not the default source in silence
        (["run", "--data", ""], "--data: no file given"),
        (["compare", "--data", " "], "--data: no file given"),
        (["eval", "--data", ""], "--data: no file given"),
        (["fit", "--out", "o", "--pairs", ""], "--pairs: no file given"),
        (["eval", "--task", "truthfulqa-gen", "--truth-judge", ""], "--truth-judge: no model given"),
        (["eval", "--task", "truthfulqa-gen", "--info-judge", " "], "--info-judge: no model given"),
        (["eval", "--editor", " "], "--editor: no directory given"),
        (["eval", "--strength", "nan"], "--strength must be a number between -100 and 100, got nan"),
        (["generate", "hi", "-e", ""], "--editor: no directory given"),
        (["generate", " ", "-e", "x"], "prompt 1 is empty"),
    ],
)
def test_the_command_line_refuses_bad_option_text_in_one_line(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and fragment in err and err.count("error:") == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing written
