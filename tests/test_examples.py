"""The ``>>>`` examples of the public API's docstrings run, on a tiny random model (seconds)."""

import doctest

import pytest
import torch

import hpredit
from hpredit import activations, hooks, models
from hpredit.data import ContrastivePair
from hpredit.editors import HPREditor, base

from .conftest import saved_tiny_model

PAIRS = [
    ContrastivePair(f"Q: question {i}?\nA:", f" Right answer {i}.", f" Wrong answer {i}.", group=i) for i in range(6)
]


@pytest.fixture(scope="module")
def globs(tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("examples")
    model = saved_tiny_model(tmp / "tiny", tokenizer)
    store = hpredit.collect_activations(model, tokenizer, PAIRS, progress=False)
    editor = HPREditor.fit(store, epochs=1, angle_depth=2, top_k=2, progress=False)
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    return {
        "torch": torch,
        "model": model,
        "tok": tokenizer,
        "ids": ids,
        "plain": model(ids).logits,
        "store": store,
        "editor": editor,
        "tmp": tmp,
        "tiny_model_dir": tmp / "tiny",
        "HPREditor": HPREditor,
        "load_model": hpredit.load_model,
        "collect_activations": hpredit.collect_activations,
        "record": hooks.record,
    }


# In order: from_pretrained reads what save_pretrained wrote.
EXAMPLES = [
    ("load_model", models.load_model),
    ("collect_activations", activations.collect_activations),
    ("record", hooks.record),
    ("HPREditor.fit", HPREditor.fit),
    ("Editor.attach", base.Editor.attach),
    ("Editor.save_pretrained", base.Editor.save_pretrained),
    ("Editor.from_pretrained", base.Editor.from_pretrained),
]


def test_every_public_example_runs(globs):
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for name, obj in EXAMPLES:
        tests = finder.find(obj, name, globs=dict(globs))
        assert tests and tests[0].examples, f"{name} has no example"
        for test in tests:
            result = runner.run(test, out=lambda s: None)
            assert result.failed == 0, f"the example of {name} fails:\n" + _report(test, globs)


def _report(test, globs) -> str:
    import io

    out = io.StringIO()
    doctest.DocTestRunner().run(doctest.DocTest(test.examples, dict(globs), test.name, None, 0, None), out=out.write)
    return out.getvalue()
