"""End to end on the real embedded SmolLM2-135M-Instruct with a few TruthfulQA questions."""

import json

import pytest
import torch

import hpredit
from hpredit.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fitted(smol, truthfulqa_csv, tmp_path_factory):
    model, tok = smol
    pairs = hpredit.data.truthfulqa_pairs(split="train+val", seed=0, path=truthfulqa_csv, limit=4)
    acts = hpredit.collect_activations(model, tok, pairs, progress=False)
    editor = hpredit.HPREditor.fit(acts, progress=False, epochs=2, top_k=3)
    out = tmp_path_factory.mktemp("hpr") / "editor"
    editor.save_pretrained(out)
    return acts, hpredit.HPREditor.from_pretrained(out), out


def test_python_api_end_to_end(smol, fitted):
    model, tok = smol
    acts, editor, _ = fitted
    assert acts.acts.shape[0] == 30 and acts.hidden_size == 576 and acts.acts.dtype == torch.float16
    assert len(editor.layers) == 3 and len(editor.probe_accuracy) == 30
    assert editor.model_fingerprint.name == hpredit.DEFAULT_MODEL
    prompts = [hpredit.data.qa_prompt(q) for q in ("Is the Earth flat?", "What happens if you swallow gum?")]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    plain = model.generate(**enc, **kwargs)
    with editor.attach(model, strength=1.0, scope="last-prompt-and-generated"):
        cached = model.generate(**enc, **kwargs)
        uncached = model.generate(**enc, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(torch.stack(cached.logits), torch.stack(plain.logits))
    after = model.generate(**enc, **kwargs)
    assert torch.equal(after.sequences, plain.sequences)


def test_cli_run_and_generate(truthfulqa_csv, tmp_path, capsys, smol_dir):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--data", str(truthfulqa_csv), "--limit", "3", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "val probe acc" in out and "edited layers" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"]["name"] == hpredit.DEFAULT_MODEL and len(summary["layers_edited"]) == 5
    assert (tmp_path / "run" / "split.json").is_file() and (tmp_path / "run" / "activations" / "meta.json").is_file()
    ev = summary["evaluation"]
    sweep = ev["validation_sweep"]  # the KL search (the default rule): the grid first, then toward the cap
    assert [t["strength"] for t in sweep][:3] == [0.25, 0.5, 1.0] and ev["strength_rule"] == "matched"
    chosen = next(t for t in sweep if t["strength"] == ev["strength"])
    assert abs(chosen["kl"] - ev["kl_cap"]) <= 0.05 * ev["kl_cap"] and not ev["over_kl_cap"]
    assert {"unedited", "edited", "difference"} <= set(ev["test"])
    assert (tmp_path / "run" / "eval" / "summary.json").is_file()
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "generate",
                "Is the Earth flat?",
                "--qa",
                "--editor",
                str(tmp_path / "run" / "editor"),
                "--max-new-tokens",
                "5",
            ]
        )
    assert exc.value.code in (0, None)
    shown = capsys.readouterr().out
    assert "unedited" in shown and "edited" in shown


def test_editor_refuses_another_model(fitted, tokenizer):
    from .conftest import tiny_model

    _, editor, _ = fitted
    with pytest.raises(hpredit.HpreditError, match="editor does not match this model"):
        editor.attach(tiny_model("llama", vocab=len(tokenizer)))
