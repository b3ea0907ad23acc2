"""The ``>>>`` examples of ``evaluate`` and ``compare`` run, on a tiny random model (seconds)."""

import doctest

import pytest

from hpredit.compare import harness
from hpredit.evaluation import job

from .conftest import tiny_model


@pytest.fixture(scope="module")
def globs(tokenizer, truthfulqa_csv):
    model = tiny_model("llama", vocab=len(tokenizer))
    model.generation_config.eos_token_id = None
    return {
        "model": model,
        "tok": tokenizer,
        "csv": truthfulqa_csv,
        "evaluate": job.evaluate,
        "compare": harness.compare,
    }


@pytest.mark.parametrize("name, obj", [("evaluate", job.evaluate), ("compare", harness.compare)])
def test_example_runs(name, obj, globs):
    tests = doctest.DocTestFinder().find(obj, name, globs=dict(globs))
    assert tests and tests[0].examples, f"{name} has no example"
    for test in tests:
        out: list[str] = []
        result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test, out=out.append)
        assert result.failed == 0, "".join(out)
