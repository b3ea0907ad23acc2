"""The lm-evaluation-harness backend: a tiny model plus an editor, on a local multiple-choice task."""

import json
import math

import pytest
import torch

from hpredit.cli import main
from hpredit.errors import HpreditError

from .conftest import random_hpr, saved_tiny_model

ROWS = [
    {"question": "Where is the Eiffel Tower?", "choices": [" In Paris.", " In Rome.", " On the Moon."], "label": 0},
    {"question": "What colour is the sky on a clear day?", "choices": [" Blue.", " Green."], "label": 0},
    {"question": "How many legs has a spider?", "choices": [" Six.", " Eight.", " Ten."], "label": 1},
]

TASK = """task: hpredit_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("lm_eval")
    model = saved_tiny_model(root / "model", tokenizer)
    editor = random_hpr(model, layers=[0, 1])
    # fitted on "the model at this path", the name lm-eval's loader will give it
    editor.model_fingerprint = type(editor.model_fingerprint)(
        **{**editor.model_fingerprint.to_dict(), "name": str(root / "model")}
    )
    editor.save_pretrained(root / "editor")
    (root / "tasks").mkdir()
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "tasks" / "local.yaml").write_text(TASK.format(data=root / "data.jsonl"))
    return root, model, editor


def _loglikelihoods(root, model_args: str) -> list[float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import hpredit.evaluation.lm_eval_backend  # noqa: F401  (registers "hpredit")

    out = simple_evaluate(
        model="hpredit",
        model_args=model_args,
        tasks=["hpredit_local_mc"],
        device="cpu",
        batch_size=2,
        log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(root / "tasks")),
    )
    samples = sorted(out["samples"]["hpredit_local_mc"], key=lambda s: s["doc_id"])
    return [float(r[0]) for s in samples for r in s["filtered_resps"]]


def _direct(model, tok, editor=None, strength=1.0) -> list[float]:
    """log p(choice | question) computed here, with or without the editor attached."""
    values = []
    for row in ROWS:
        ctx = tok(f"Q: {row['question']}\nA:")["input_ids"]
        for choice in row["choices"]:
            full = tok(f"Q: {row['question']}\nA:{choice}")["input_ids"]
            ids = torch.tensor([full])
            with torch.no_grad():
                if editor is None:
                    logits = model(ids).logits
                else:
                    with editor.attach(model, strength=strength, strict=False):
                        logits = model(ids).logits
            lp = torch.log_softmax(logits.float(), -1)[0, :-1]
            target = ids[0, 1:]
            values.append(float(lp[len(ctx) - 1 :].gather(-1, target[len(ctx) - 1 :, None]).sum()))
    return values


def test_backend_scores_with_the_editor_attached(setup, tokenizer):
    root, model, editor = setup
    plain = _loglikelihoods(root, f"pretrained={root / 'model'},dtype=float32")
    zero = _loglikelihoods(root, f"pretrained={root / 'model'},dtype=float32,editor={root / 'editor'},strength=0")
    edited = _loglikelihoods(root, f"pretrained={root / 'model'},dtype=float32,editor={root / 'editor'},strength=1.0")
    assert len(plain) == sum(len(r["choices"]) for r in ROWS)
    assert plain == pytest.approx(_direct(model, tokenizer), abs=1e-3)
    assert zero == pytest.approx(plain, abs=1e-5)
    assert edited == pytest.approx(_direct(model, tokenizer, editor, 1.0), abs=1e-3)
    assert max(abs(a - b) for a, b in zip(edited, plain)) > 1e-2
    assert all(math.isfinite(v) for v in edited)


def test_backend_refuses_a_bad_editor(setup, tmp_path):
    from hpredit.evaluation.lm_eval_backend import HpreditLM

    root, _, _ = setup
    with pytest.raises(HpreditError, match="editor"):
        HpreditLM(pretrained=str(root / "model"), editor=str(tmp_path / "missing"), device="cpu", dtype="float32")
    with pytest.raises(HpreditError, match="strict must be true or false"):
        HpreditLM(pretrained=str(root / "model"), editor=str(root / "editor"), strict="maybe", device="cpu")


def test_cli_passes_through_to_lm_eval(setup, tmp_path, capsys):
    root, _, _ = setup
    with pytest.raises(SystemExit) as done:
        main(
            [
                "lm-eval",
                "run",
                "--model",
                "hpredit",
                "--model_args",
                f"pretrained={root / 'model'},dtype=float32,editor={root / 'editor'},strength=0.5",
                "--tasks",
                "hpredit_local_mc",
                "--include_path",
                str(root / "tasks"),
                "--device",
                "cpu",
                "--batch_size",
                "2",
                "--output_path",
                str(tmp_path / "results"),
            ]
        )
    assert done.value.code in (0, None)
    results = list((tmp_path / "results").rglob("results_*.json"))
    assert results, capsys.readouterr().err[-2000:]
    data = json.loads(results[0].read_text())
    assert "hpredit_local_mc" in data["results"] and data["config"]["model"] == "hpredit"
    args = data["config"]["model_args"]
    assert args["editor"] == str(root / "editor") and args["strength"] == 0.5
