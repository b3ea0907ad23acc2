"""Models spread over devices with accelerate's ``device_map``, including disk offload.

On this CPU-only machine the map mixes "cpu" and "disk": the offloaded block's weights live on the
meta device and are loaded by accelerate's hooks at each forward, which is exactly where an edit
that reads the parameters' device (instead of the block's execution device) would break.
"""

from __future__ import annotations

import json

import pytest
import torch

import hpredit
from hpredit.errors import HpreditError
from hpredit.models import execution_device

from .conftest import random_editor, tiny_model

MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    model.generation_config.eos_token_id = None
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _load(directory, device_map=None, tmp=None):
    return hpredit.load_model(directory, device_map=device_map, offload_folder=str(tmp) if tmp else None)


def test_disk_offload_loads_on_the_meta_device(saved_tiny, tmp_path):
    model, _ = _load(saved_tiny, MAP, tmp_path)
    block = hpredit.decoder_layers(model)[1][1]
    assert next(block.parameters()).device.type == "meta"
    assert execution_device(block) == torch.device("cpu")


@pytest.mark.parametrize("kind", ["hpr", "caa", "iti"])
def test_edits_under_a_device_map_equal_the_model_in_one_piece(saved_tiny, tmp_path, kind):
    whole, tok = _load(saved_tiny)
    spread, _ = _load(saved_tiny, MAP, tmp_path)
    editor = random_editor(kind, whole, seed=3)
    tok.padding_side = "left"
    enc = tok(["The capital of France is", "Two plus two"], return_tensors="pt", padding=True)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        plain = whole(**enc).logits
        with editor.attach(whole, strength=1.0):
            expected_logits = whole(**enc).logits
            expected_tokens = whole.generate(**enc, **gen)
        with editor.attach(spread, strength=1.0, strict=False):
            logits = spread(**enc).logits
            tokens = spread.generate(**enc, **gen)
    assert not torch.allclose(expected_logits, plain)  # the edit acts
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)


def test_device_map_from_json_text_and_file(saved_tiny, tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(MAP))
    for spec in (json.dumps(MAP), str(path)):
        model, _ = _load(saved_tiny, spec, tmp_path / "offload")
        assert model.hf_device_map == MAP


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{not json", "--device-map"),
        ('{"model.layers.0": 3.5}', "--device-map"),
        ("nowhere.json", "--device-map"),
    ],
)
def test_bad_device_maps_are_one_clear_error(saved_tiny, spec, message):
    with pytest.raises(HpreditError, match=message):
        _load(saved_tiny, spec)


def test_device_and_device_map_together_are_one_clear_error(saved_tiny):
    with pytest.raises(HpreditError, match="either --device or --device-map"):
        hpredit.load_model(saved_tiny, device="cpu", device_map="auto")


def test_eval_command_with_a_device_map_equals_the_model_in_one_piece(saved_tiny, truthfulqa_csv, tmp_path):
    from hpredit.cli import main

    base = ["eval", "--model", str(saved_tiny), "--data", str(truthfulqa_csv), "--limit", "3"]
    for name, extra in (("whole", []), ("spread", ["--device-map", json.dumps({**MAP, "model.layers.1": "cpu"})])):
        with pytest.raises(SystemExit) as stop:
            main([*base, *extra, "--out", str(tmp_path / name)])
        assert stop.value.code == 0
    whole, spread = (json.loads((tmp_path / n / "summary.json").read_text())["metrics"] for n in ("whole", "spread"))
    assert spread["unedited"] == pytest.approx(whole["unedited"], abs=1e-6)
