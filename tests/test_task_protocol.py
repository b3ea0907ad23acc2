"""A new task is one class and one registry line: ``evaluate`` (and the CLI) run it like any other."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import hpredit
from hpredit.data import ContrastivePair, ContrastivePairs
from hpredit.errors import HpreditError
from hpredit.evaluation import tasks
from hpredit.evaluation.scoring import score_continuations

from .conftest import random_hpr, saved_tiny_model


@dataclass(frozen=True)
class _Item:
    prompt: str
    options: tuple[str, str]
    target: int
    group: int


@dataclass(frozen=True)
class CountingTask(tasks.Task):
    """Does the model prefer the next number? Two options per item, accuracy by log-probability."""

    def load(self, data=None):
        return [_Item(f"{i}, {i + 1}, {i + 2},", (f" {i + 3}", f" {i + 7}"), 0, i) for i in range(12)]

    def check_source(self, data=None):
        if data is not None:
            raise HpreditError("the counting task makes its own items: no --data")

    def pairs(self, items, split_of, tok):
        return ContrastivePairs(
            [
                ContrastivePair(it.prompt, *it.options, it.group, split_of[it.group])
                for it in items
                if it.group in split_of
            ]
        )

    def score(self, model, tok, items):
        scores = score_continuations(model, tok, [(it.prompt, list(it.options)) for it in items]).scores
        right = [int(np.argmax(s)) == it.target for it, s in zip(items, scores)]
        return {"acc": float(np.mean(right))}


@pytest.fixture
def counting():
    yield tasks.register_task(CountingTask("counting", "acc", ("acc",), "counting", "made by the task"))
    tasks.unregister_task("counting")  # the registry as it was before the test


def test_a_registered_task_runs_through_evaluate(counting, tokenizer, tmp_path):
    assert "counting" in tasks.task_names() and tasks.get_task("counting") is counting
    model = saved_tiny_model(tmp_path / "tiny", tokenizer)
    editor = random_hpr(model)
    result = hpredit.evaluate(model, tokenizer, editor, task="counting", split="all", show=False, out=tmp_path / "ev")
    m = result.metrics
    assert result["headline"] == ["acc"] and result["items"] == 12 and result["questions"] == 12
    assert 0 <= m["unedited"]["acc"] <= 1 and 0 <= m["edited"]["acc"] <= 1
    assert m["difference"]["acc"]["mean"] == pytest.approx(m["edited"]["acc"] - m["unedited"]["acc"])
    assert m["unedited"] == counting.score(model, tokenizer, counting.load())  # the same scoring as compare uses
    assert hpredit.load_result(tmp_path / "ev").metrics == m
    test = hpredit.evaluate(model, tokenizer, task="counting", split="test", seed=1, show=False)
    assert test["questions"] == 6 and test["data"] == {"source": "made by the task"}


def test_a_registered_task_brings_its_own_checks(counting, tokenizer, tmp_path):
    model = saved_tiny_model(tmp_path / "tiny", tokenizer)
    with pytest.raises(HpreditError, match="no --data"):
        hpredit.evaluate(str(tmp_path / "tiny"), task="counting", data=tmp_path / "x", show=False)
    with pytest.raises(HpreditError, match="only --scope all applies"):  # it does not generate
        hpredit.evaluate(model, tokenizer, random_hpr(model), task="counting", scope="generated", show=False)
    with pytest.raises(HpreditError, match="judges apply to truthfulqa-gen only"):
        hpredit.evaluate(model, tokenizer, task="counting", judges=lambda q, a: 1.0, show=False)


def test_a_registered_task_runs_in_compare(counting, tokenizer):
    from hpredit.compare import compare

    model = saved_tiny_model_in_memory(tokenizer)
    result = compare(
        model,
        tokenizer,
        methods=["none", "caa"],
        seeds=[0],
        task="counting",
        strengths={"caa": (1.0,)},
        kl_cap=1e9,
        protocol="grid",
        progress=False,
        log=lambda s: None,
    )
    assert result.metrics == ["acc"] and set(result.summary) == {"none", "caa"}
    assert all(0 <= r["test"]["acc"] <= 1 for r in result.runs)


def saved_tiny_model_in_memory(tokenizer):
    from .conftest import tiny_model

    return tiny_model("llama", vocab=len(tokenizer))
