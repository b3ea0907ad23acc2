"""One contract per value (hpredit.checks): each refusal, and the same rule and message from the
library (named as in Python) and the command line (named as its option)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import hpredit
from hpredit import checks
from hpredit.checks import (
    check_count,
    check_editor_matches,
    check_kl_cap,
    check_layers,
    check_limit,
    check_scope,
    check_seed,
    check_store_dtype,
    check_strengths,
    check_top_k,
    is_int,
    layer_list_problem,
    named,
    option_names,
)
from hpredit.cli import main
from hpredit.errors import HpreditError

from .conftest import random_hpr, tiny_model


def test_names_follow_the_caller():
    assert named("top_k") == "top_k" and named("'strength'") == "'strength'"
    with option_names():
        assert named("top_k") == "--top-k" and named("--kl-cap") == "--kl-cap" and named("each of x") == "each of x"
    assert named("top_k") == "top_k"  # restored after the block


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: check_count(0, "epochs"), "epochs must be at least 1"),
        (lambda: check_count(2.5, "epochs"), "epochs must be at least 1 (a whole number), got 2.5"),
        (lambda: check_count(True, "epochs"), "epochs must be at least 1"),
        (lambda: check_count(-1, "refine", 0), "refine must be at least 0"),
        (lambda: check_limit(0), "limit must be positive, got 0"),
        (lambda: check_limit(1.5), "limit must be positive, got 1.5"),
        (lambda: check_seed(-1), "seed must be a whole number ≥ 0, got -1"),
        (lambda: check_seed("0"), "seed must be a whole number ≥ 0"),
        (lambda: check_layers([1, 1]), "layers lists layer(s) [1] more than once"),
        (lambda: check_layers([1.5]), "layers must be integers"),
        (lambda: check_layers([]), "layers is empty"),
        (lambda: check_layers([0, 3], 3), "layers [3] out of range: the model has 3 layers (0..2)"),
        (lambda: check_layers([-1], 3), "layers [-1] out of range"),
        (lambda: check_layers([-1]), "layers [-1] out of range: layers are numbered from 0"),
        (lambda: check_top_k(0), "top_k must be at least 1"),
        (lambda: check_top_k(4, 3), "top_k 4 is more than the model's 3 layers"),
        (lambda: check_kl_cap(0.0), "kl_cap must be a positive number"),
        (lambda: check_kl_cap(float("inf")), "kl_cap must be a positive number"),
        (lambda: check_kl_cap(float("nan")), "kl_cap must be a positive number"),
        (lambda: check_strengths([]), "strengths needs at least one value"),
        (lambda: check_strengths([0.5, 1e3]), "each of strengths must be a number between -100 and 100"),
        (lambda: check_scope("everywhere"), "unknown scope 'everywhere'"),
        (lambda: check_store_dtype("int8"), "store_dtype must be one of auto, float16, bfloat16, float32"),
    ],
)
def test_each_contract_refuses_with_one_message(call, message):
    with pytest.raises(HpreditError) as e:
        call()
    assert message in str(e.value)


def test_contracts_return_the_values_as_used():
    assert check_count(np.int64(3), "epochs") == 3 and check_limit(None) is None and check_limit(2) == 2
    assert check_layers(None) is None and check_layers([2, 0], 3) == [2, 0] and check_top_k(3, 3) == 3
    assert check_strengths([-1, 0.5]) == [-1.0, 0.5] and check_kl_cap(1) == 1.0 and check_seed(0) == 0
    assert check_scope("generated") == "generated" and check_store_dtype("auto") == "auto"
    assert checks.SCOPES == hpredit.SCOPES


def test_editor_match_names_the_way_out(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    editor = random_hpr(model)
    other = hpredit.fingerprint(tiny_model("qwen2"))
    with pytest.raises(HpreditError, match="editor does not match this model: architecture"):
        check_editor_matches(editor.model_fingerprint, other)
    renamed = dataclasses.replace(hpredit.fingerprint(model), name="someone/else")
    with pytest.raises(HpreditError, match=r"\(pass strict=False to ignore the name\)"):
        check_editor_matches(editor.model_fingerprint, renamed)
    with option_names(), pytest.raises(HpreditError, match=r"\(pass --no-strict to ignore the name\)"):
        check_editor_matches(editor.model_fingerprint, renamed)
    check_editor_matches(editor.model_fingerprint, renamed, strict=False)
    with pytest.raises(HpreditError, match="^editor out/a does not match this model: architecture"):
        check_editor_matches(editor.model_fingerprint, other, editor="out/a")


def test_one_integer_rule_and_one_layers_rule():
    """``is_int`` is every integer check's rule; ``layer_list_problem`` every layer list's (``check_layers``,
    a stored activation store's ``layers``)."""
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0) and not is_int("3")
    assert layer_list_problem(None) is None and layer_list_problem([0, 2], 3) is None
    not_a_list = "layers must be a list of layer indices such as [15, 16], got "
    assert layer_list_problem(None, required=True) == not_a_list + "None"
    assert layer_list_problem((0, 1)) == not_a_list + "(0, 1)"
    assert layer_list_problem([1, 1], name="HPRConfig.layers") == "HPRConfig.layers lists layer(s) [1] more than once"
    with pytest.raises(HpreditError) as e:
        check_layers([True])
    assert str(e.value) == layer_list_problem([True]) == "layers must be integers, got [True]"


def test_one_rule_for_a_loaded_or_named_model():
    """``evaluate`` and ``compare`` take a name (loaded by the job) or a loaded model with its tokenizer."""
    from hpredit.preflight import loaded_model_given

    assert not loaded_model_given(None, None) and not loaded_model_given("org/model", None)
    assert loaded_model_given(tiny_model("llama"), object())
    with pytest.raises(HpreditError, match="^pass the tokenizer together with a loaded model$"):
        loaded_model_given(tiny_model("llama"), None)
    with pytest.raises(HpreditError, match="^model must be a name, a path or a loaded model, got int$"):
        loaded_model_given(3, None)


@pytest.mark.parametrize(
    "api, argv, python, option",
    [
        (dict(limit=0), ["--limit", "0"], "limit must be positive, got 0", "--limit must be positive, got 0"),
        (dict(epochs=0), ["--epochs", "0"], "epochs must be at least 1", "--epochs must be at least 1"),
        (dict(kl_cap=-1.0), ["--kl-cap", "-1"], "kl_cap must be a positive", "--kl-cap must be a positive"),
        (dict(seed=-2), ["--seed", "-2"], "seed must be a whole number ≥ 0", "--seed must be a whole number ≥ 0"),
        (dict(top_k=0), ["--top-k", "0"], "top_k must be at least 1", "--top-k must be at least 1"),
        (
            dict(strengths=[0.5, 200.0]),
            ["--strengths", "0.5,200"],
            "each of strengths must be a number between -100 and 100",
            "each of --strengths must be a number between -100 and 100",
        ),
    ],
)
def test_library_and_cli_refuse_a_value_alike(api, argv, python, option, tmp_path, truthfulqa_csv, capsys):
    """``hpredit.run(...)`` and ``hpredit run`` apply the same contract; only the value's name differs."""
    with pytest.raises(HpreditError) as e:
        hpredit.run(out=tmp_path / "api", data=truthfulqa_csv, **api)
    assert python in str(e.value)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--data", str(truthfulqa_csv), "--out", str(tmp_path / "cli"), *argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and option in lines[0], lines
    assert list(tmp_path.iterdir()) == []
