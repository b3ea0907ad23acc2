"""Serving without an engine: request arguments, per-token strengths, `hpredit serve` start-up errors.

These need no vLLM (the checks run before vLLM is imported); the engine tests are in test_vllm.py.
"""

import json
import math
import re

import numpy as np
import pytest
import torch

from hpredit.checks import DEFAULT_STRENGTH
from hpredit.cli import main
from hpredit.editors.kl_curve import KLCurve
from hpredit.errors import HpreditError
from hpredit.serving import serve_argv
from hpredit.serving.params import FrontSpec, RequestEdit, ServeSettings, token_strengths, validate_extra_args

from .conftest import random_editor, tiny_model


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"strength": float("nan")}, "a number between -100 and 100"),
        ({"strength": float("inf")}, "a number between -100 and 100"),
        ({"strength": 1e39}, "a number between -100 and 100"),
        ({"strength": -100.5}, "a number between -100 and 100"),
        ({"strength": "0.5"}, "must be a number"),
        ({"strength": True}, "must be a number"),
        ({"strength": [1.0]}, "must be a number"),
        ({"scope": "prompt"}, "'scope' must be one of"),
        ({"strenght": 1.0}, "unknown extra argument(s) ['strenght']"),
        ({"kl": -0.1}, "'kl' must be a number ≥ 0 (nats/token)"),
        ({"kl": float("nan")}, "'kl' must be a number ≥ 0"),
        ({"kl": "0.1"}, "'kl' must be a number ≥ 0"),
        ({"kl": 0.1, "strength": 1.0}, "give 'strength' or 'kl', not both"),
    ],
)
def test_bad_request_arguments(extra, message):
    with pytest.raises(
        ValueError, match=".*" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        validate_extra_args(extra)


def test_request_arguments_and_defaults():
    settings = ServeSettings((("a", "/a"), ("b", "/b")), 0.5, "all")
    assert settings.resolve(None, 4) == RequestEdit.one(0, 0.5, 0)  # the first editor is the default
    assert settings.resolve({"strength": 2}, 4) == RequestEdit.one(0, 2.0, 0)
    assert settings.resolve({"strength": -1.5, "editor": "b"}, 4) == RequestEdit.one(1, -1.5, 0)
    assert settings.resolve({"strength": 0, "scope": "generated"}, 4) == RequestEdit.one(0, 0.0, 4)
    assert settings.resolve({"scope": "last-prompt-and-generated"}, 4) == RequestEdit.one(0, 0.5, 3)
    assert settings.resolve({"kv_transfer_params": {"x": 1}}, 4) == RequestEdit.one(0, 0.5, 0)  # vLLM's own key
    with pytest.raises(ValueError, match="unknown editor 'c': this server has a, b"):
        settings.resolve({"editor": "c"}, 4)
    with pytest.raises(ValueError, match="unknown editor 3"):
        validate_extra_args({"editor": 3})


CURVE = KLCurve((0.25, 0.5, 1.0), (0.02, 0.1, 0.45), "test")


def test_request_kl_is_converted_through_its_editors_curve():
    """A request's ``kl`` becomes the strength the editor's curve gives (as ``attach(kl=)`` converts it);
    a cost beyond the curve, or an editor without one, is refused at admission (the validator)."""
    other = KLCurve((1.0, 2.0), (0.3, 0.9))
    settings = ServeSettings((("a", "/a"), ("b", "/b"), ("c", "/c")), 0.5, "all", curves=(CURVE, other, None))
    assert settings.max_kl == (0.45, 0.9, None)
    assert settings.resolve({"kl": 0.1}, 4) == RequestEdit.one(0, CURVE.strength_for(0.1), 0)
    assert CURVE.strength_for(0.1) == 0.5  # a measured point: its own strength
    assert settings.resolve({"kl": 0.3, "editor": "b"}, 4) == RequestEdit.one(1, 1.0, 0)
    assert settings.resolve({"kl": 0, "scope": "generated"}, 4) == RequestEdit.one(0, 0.0, 4)
    assert settings.resolve({"editor": "c"}, 4) == RequestEdit.one(2, 0.5, 0)  # no kl: the default strength
    for extra, message in [
        ({"kl": 0.5}, "'kl' 0.5 is beyond editor 'a''s measured strength → KL curve (0 to 0.45 nats/token)"),
        ({"kl": 0.1, "editor": "c"}, "editor 'c' has no measured strength → KL curve, so 'kl' cannot be converted"),
        ({"kl": 0.1, "editor": "d"}, "unknown editor 'd'"),
    ]:
        with pytest.raises(ValueError, match="^hpredit: " + re.escape(message)):
            settings.resolve(extra, 4)
        with pytest.raises(ValueError, match="^hpredit: " + re.escape(message)):
            validate_extra_args(extra, settings.names, settings.max_kl)


def test_server_default_kl():
    """``--kl``: each editor's default strength is its own curve's conversion; every editor must reach it."""
    other = KLCurve((1.0, 2.0), (0.3, 0.9))
    settings = ServeSettings((("a", "/a"), ("b", "/b")), 1.0, "all", kl=0.1, curves=(CURVE, other))
    assert settings.resolve(None, 3) == RequestEdit.one(0, 0.5, 0)
    assert settings.resolve({"editor": "b"}, 3) == RequestEdit.one(1, other.strength_for(0.1), 0)
    assert settings.resolve({"strength": 2.0}, 3) == RequestEdit.one(0, 2.0, 0)  # a request's own strength wins
    assert settings.resolve({"kl": 0.45}, 3) == RequestEdit.one(0, 1.0, 0)
    with pytest.raises(HpreditError, match=re.escape("--kl 0.5 is beyond editor 'a''s measured") + ".*pass --strength"):
        ServeSettings((("a", "/a"), ("b", "/b")), 1.0, "all", kl=0.5, curves=(CURVE, other))
    with pytest.raises(HpreditError, match="editor 'b' has no measured strength → KL curve, so --kl cannot"):
        ServeSettings((("a", "/a"), ("b", "/b")), 1.0, "all", kl=0.1, curves=(CURVE, None))
    with pytest.raises(HpreditError, match="editor 'a' has no measured"):
        ServeSettings((("a", "/a"),), 1.0, "all", kl=0.1)


def test_settings_round_trip_through_the_model_config():
    from types import SimpleNamespace

    settings = ServeSettings((("default", "/x"), ("refuse", "/y")), -0.25, "generated")
    overrides = settings.overrides("Qwen2ForCausalLM")
    assert overrides["architectures"] == ["HPREditQwen2ForCausalLM"]
    config = SimpleNamespace(**json.loads(json.dumps(overrides)))  # as vLLM's processes see it
    assert ServeSettings.from_config(config) == settings
    with pytest.raises(ValueError, match="no editor configured"):
        ServeSettings.from_config(SimpleNamespace())
    with_curves = ServeSettings((("a", "/x"), ("b", "/y")), 1.0, "all", kl=0.1, curves=(CURVE, CURVE))
    config = SimpleNamespace(**json.loads(json.dumps(with_curves.overrides("LlamaForCausalLM"))))
    assert ServeSettings.from_config(config) == with_curves


def test_token_strengths_per_editor_and_scope():
    """The one function both model runners use: (requests, positions) → (editors, tokens) strengths."""
    rows = [
        RequestEdit.one(1, 0.5, 0),
        RequestEdit.one(0, 2.0, 3),
        RequestEdit.one(2, -1.0, 2),
        RequestEdit.one(0, 0.0, 0),
    ]
    counts = np.array([2, 3, 1, 2])
    positions = np.array([0, 1, 1, 2, 3, 5, 0, 1])  # request 1 is chunked: positions 1-3; request 2 decodes
    out = token_strengths(rows, counts, positions, 3)
    assert out.dtype == np.float32 and out.shape == (3, 8)
    assert out.tolist() == [
        [0, 0, 0, 0, 2.0, 0, 0, 0],  # request 1 from position 3 on
        [0.5, 0.5, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, -1.0, 0, 0],
    ]
    assert token_strengths([], np.array([], dtype=np.int64), np.array([]), 2).shape == (2, 0)


@pytest.mark.parametrize("kind", ["hpr", "hpr-no-gate", "caa", "caa-norm"])
def test_per_token_strength_tensor(kind):
    """A tensor of per-token strengths edits each token as that float strength does; 0 is untouched."""
    model = tiny_model("llama")
    ed = random_editor(kind, model, layers=[1])
    fn = ed.layer_edit(1, torch.device("cpu"), torch.float32)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) * 3
    s = torch.tensor([[0.0, 0.5, 1.0, 0.0, 2.0], [1.0, 0.0, 0.25, 0.5, 0.0]])
    out = fn(x, s != 0, s)
    for b in range(2):
        for t in range(5):
            ref = fn(x[b : b + 1, t : t + 1], None, float(s[b, t]))[0, 0]
            if s[b, t] == 0:
                assert torch.equal(out[b, t], x[b, t])
            else:
                torch.testing.assert_close(out[b, t], ref, atol=1e-5, rtol=1e-5)
    flat = fn(x.reshape(10, 64), (s != 0).reshape(10), s.reshape(10))  # the (tokens, d) layout vLLM uses
    torch.testing.assert_close(flat, out.reshape(10, 64), atol=0, rtol=0)


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _one_line_error(code, err, pattern):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and pattern in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def smol_editor(tmp_path_factory, smol_dir):
    """A random HPR editor with the embedded SmolLM2's fingerprint (no weights loaded)."""
    from hpredit.editors.hpr import HPRConfig, HPREditor
    from hpredit.models import ModelFingerprint

    fp = ModelFingerprint("LlamaForCausalLM", 576, 30, "HuggingFaceTB/SmolLM2-135M-Instruct")
    cfg = HPRConfig(angle_depth=2)
    g = torch.Generator().manual_seed(0)
    ed = HPREditor(
        cfg,
        [3],
        fp,
        [3],
        torch.randn(1, 576, generator=g),
        [torch.randn(1, 288, 576, generator=g) * 0.01, torch.randn(1, 1, 288, generator=g) * 0.01],
        [torch.zeros(1, 288), torch.zeros(1, 1)],
        {},
    )
    return ed.save_pretrained(tmp_path_factory.mktemp("serve") / "editor")


@pytest.fixture(scope="module")
def smol_editor_with_curve(smol_editor, tmp_path_factory):
    """:func:`smol_editor` with a strength → KL curve in its artifact (as hpredit run records one)."""
    from hpredit.editors import load_editor

    ed = load_editor(smol_editor)
    ed.kl_curve = CURVE
    return ed.save_pretrained(tmp_path_factory.mktemp("serve") / "curved")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--kl", "0.1"], "editor 'default' has no measured strength → KL curve, so --kl cannot be converted"),
        (["--kl", "-1"], "--kl must be a number ≥ 0"),
    ],
)
def test_serve_bad_kl(args, pattern, capsys, smol_editor):
    code, _, err = run_cli(["serve", "--editor", str(smol_editor), *args], capsys)
    _one_line_error(code, err, pattern)


def test_serve_kl_needs_every_editor_to_reach_it(capsys, smol_editor, smol_editor_with_curve):
    code, _, err = run_cli(["serve", "--editor", str(smol_editor_with_curve), "--kl", "1.0"], capsys)
    _one_line_error(code, err, "--kl 1 is beyond editor 'default''s measured strength → KL curve (0 to 0.45")
    code, _, err = run_cli(["serve", "--editor", str(smol_editor_with_curve), "--kl", "0.1", "--strength", "1"], capsys)
    _one_line_error(code, err, "give --strength or --kl, not both")
    argv = ["serve", "--editor", f"a={smol_editor_with_curve}", "--editor", f"b={smol_editor}", "--kl", "0.1"]
    code, _, err = run_cli(argv, capsys)
    _one_line_error(code, err, "editor 'b' has no measured strength → KL curve")


def test_serve_argv_carries_the_curves(smol_editor, smol_editor_with_curve):
    from types import SimpleNamespace

    argv = serve_argv({"a": smol_editor_with_curve, "b": smol_editor}, None, 1.0, "all", [], kl=None)
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    settings = ServeSettings.from_config(SimpleNamespace(**overrides))
    assert settings.curves == (CURVE, None) and settings.kl is None and settings.max_kl == (0.45, None)
    argv = serve_argv(smol_editor_with_curve, None, DEFAULT_STRENGTH, "all", [], kl=0.1)
    settings = ServeSettings.from_config(SimpleNamespace(**json.loads(argv[argv.index("--hf-overrides") + 1])))
    assert settings.kl == 0.1 and settings.resolve(None, 2).edits == ((0, 0.5),)


def test_serve_missing_editor(tmp_path, capsys):
    code, _, err = run_cli(["serve", "--editor", str(tmp_path / "nope"), "--port", "1"], capsys)
    _one_line_error(code, err, "does not exist")


def test_serve_damaged_editor(tmp_path, capsys, smol_editor):
    import shutil

    bad = tmp_path / "editor"
    shutil.copytree(smol_editor, bad)
    (bad / "editor.safetensors").write_bytes((bad / "editor.safetensors").read_bytes()[:100])
    code, _, err = run_cli(["serve", "--editor", str(bad)], capsys)
    _one_line_error(code, err, "does not match the checksum")
    (bad / "config.json").write_text("{not json")
    code, _, err = run_cli(["serve", "--editor", str(bad)], capsys)
    _one_line_error(code, err, "config.json")


def test_serve_fingerprint_mismatch(tmp_path, capsys, smol_editor):
    import shutil

    other = tmp_path / "editor"
    shutil.copytree(smol_editor, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"]["num_layers"] = 24
    (other / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["serve", "--editor", str(other)], capsys)
    _one_line_error(code, err, "num_layers 30 (editor fitted on 24)")
    cfg["model"]["num_layers"], cfg["model"]["name"] = 30, "meta-llama/Llama-3-8B"
    (other / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["serve", "--editor", str(other)], capsys)
    _one_line_error(code, err, "name")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--strength", "nan"], "--strength must be a number between -100 and 100"),
        (["--strength", "1e300"], "--strength must be a number between -100 and 100"),
        (["--scope", "prompt"], "unknown scope 'prompt'"),
        (["--kill-after", "nan"], "--kill-after must be a number of seconds between 0 and 3600"),
        (["--kill-after", "-1"], "--kill-after must be a number of seconds between 0 and 3600"),
        (["--kill-after", "1e9"], "--kill-after must be a number of seconds between 0 and 3600"),
        (["--kill-after", "abc"], "Invalid value for '--kill-after'"),
    ],
)
def test_serve_bad_options(args, pattern, capsys, smol_editor):
    code, _, err = run_cli(["serve", "--editor", str(smol_editor), *args], capsys)
    _one_line_error(code, err, pattern)


def test_serve_argv(smol_editor, smol_dir):
    argv = serve_argv(smol_editor, None, 0.5, "all", ["--port", "8123", "--enforce-eager"])
    assert argv[:2] == ["serve", str(smol_dir)]
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert overrides["architectures"] == ["HPREditLlamaForCausalLM"] and overrides["hpredit_strength"] == 0.5
    assert "--enable-prefix-caching" in argv and argv[-3:] == ["--port", "8123", "--enforce-eager"]
    assert argv[argv.index("--served-model-name") + 1] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not math.isnan(overrides["hpredit_strength"])


def test_parse_editors(tmp_path):
    from hpredit.serving import parse_editors

    odd = tmp_path / "a=b"  # an existing directory with '=' in its name is a plain editor directory
    odd.mkdir()
    assert parse_editors(["x/ed"]) == {"default": "x/ed"}
    assert parse_editors(["x/ed", "refusal=y/ed", "t_2=z"]) == {"default": "x/ed", "refusal": "y/ed", "t_2": "z"}
    assert parse_editors([str(odd)]) == {"default": str(odd)}


@pytest.mark.parametrize(
    "specs, pattern",
    [
        (["a=x", "a=y"], "--editor 'a' is given twice"),
        (["x", "y"], "--editor 'default' is given twice"),
        (["no good=x"], "an editor name must be letters, digits"),
        (["=x"], "an editor name must be letters, digits"),
    ],
)
def test_serve_bad_editor_lists(specs, pattern, capsys):
    argv = ["serve"]
    for spec in specs:
        argv += ["--editor", spec]
    code, _, err = run_cli(argv, capsys)
    _one_line_error(code, err, pattern)


def test_serve_every_editor_must_fit_the_model(tmp_path, capsys, smol_editor):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(smol_editor, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"]["num_layers"] = 24
    (other / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["serve", "--editor", str(smol_editor), "--editor", f"other={other}"], capsys)
    _one_line_error(code, err, f"editor {other} does not match this model")


def test_serve_a_name_mismatch_says_no_strict(tmp_path, capsys, smol_editor, smol_dir):
    """The editor-vs-model check is the library's own: a model that differs only by name is
    refused with the hint to pass --no-strict."""
    model = tmp_path / "model"
    model.mkdir()
    for f in smol_dir.iterdir():
        (model / f.name).symlink_to(f)
    code, _, err = run_cli(["serve", "--editor", str(smol_editor), "--model", str(model)], capsys)
    _one_line_error(code, err, f"editor {smol_editor} does not match this model: name")
    assert "(pass --no-strict to ignore the name)" in err


def test_serve_unsupported_architecture(tmp_path, capsys, tokenizer):
    """An architecture vLLM serves only through its generic backend: refused before vLLM starts."""
    import dataclasses

    from .conftest import saved_tiny_model

    model = saved_tiny_model(tmp_path / "model", tokenizer, arch="gpt_neox")
    ed = random_editor("hpr", model, layers=[1])
    ed.model_fingerprint = dataclasses.replace(ed.model_fingerprint, name=str(tmp_path / "model"))
    ed.save_pretrained(tmp_path / "editor")
    capsys.readouterr()  # transformers' progress bar while saving
    code, _, err = run_cli(["serve", "--editor", str(tmp_path / "editor"), "--model", str(tmp_path / "model")], capsys)
    _one_line_error(code, err, "serving GPTNeoXForCausalLM is not supported (supported: LlamaForCausalLM,")


def test_serve_argv_with_several_editors(smol_editor, tmp_path):
    import importlib
    import shutil
    from types import SimpleNamespace

    pytest.importorskip("vllm")
    from hpredit.serving.plugin import request_params_class, request_params_name

    shutil.copytree(smol_editor, tmp_path / "b")
    argv = serve_argv({"a": smol_editor, "b": tmp_path / "b"}, None, 1.0, "all", [])
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert overrides["hpredit_editors"] == [["a", str(smol_editor.resolve())], ["b", str((tmp_path / "b").resolve())]]
    validator = argv[argv.index("--logits-processors") + 1]
    module, name = validator.split(":")
    cls = getattr(importlib.import_module(module), name)  # as vLLM loads it in each process
    assert cls.spec.names == ("a", "b") and cls.spec.max_kl == (None, None) and len(cls.spec.ids) == 2
    assert cls.spec.ids[0] == cls.spec.ids[1]  # a copy: the same content
    assert cls is request_params_class(cls.spec) and validator == request_params_name(cls.spec)
    with pytest.raises(ValueError, match="editor 'b' has no measured strength → KL curve"):
        cls.validate_params(SimpleNamespace(extra_args={"editor": "b", "kl": 0.1}))
    curved_name = request_params_name(FrontSpec(("a", "b"), (0.45, None))).split(":")[1]
    curved = getattr(importlib.import_module(module), curved_name)
    assert curved.spec.max_kl == (0.45, None)
    curved.validate_params(SimpleNamespace(extra_args={"kl": 0.45}))
    with pytest.raises(ValueError, match="'kl' 0.5 is beyond editor 'a''s"):
        curved.validate_params(SimpleNamespace(extra_args={"kl": 0.5}))
    cls.validate_params(SimpleNamespace(extra_args={"editor": "b", "strength": -3}))
    with pytest.raises(ValueError, match="unknown editor 'c': this server has a, b"):
        cls.validate_params(SimpleNamespace(extra_args={"editor": "c"}))


# ----------------------------------------------------------------- the vLLM options hpredit owns


def _checked(smol_editor, args, tmp_path=None):
    from hpredit.serving import _serve_argv, check_vllm_args

    pytest.importorskip("vllm")
    argv, owned = _serve_argv(smol_editor, None, 1.0, "all", args, True, None)
    return check_vllm_args(argv, owned)


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--logits_processors", "vllm.v1.sample.logits_processor:MinPLogitsProcessor"], "--logits-processors is set"),
        (["--logits-processors=a:b"], "--logits-processors is set"),
        (["--hf_overrides", "{}"], "--hf-overrides is set by hpredit serve"),
        (["--hf-overrides.architectures", '["LlamaForCausalLM"]'], "--hf-overrides is set by hpredit serve"),
        (["--model-impl", "transformers"], "--model-impl transformers cannot serve an editor"),
        (["--model_impl=terratorch"], "--model-impl terratorch cannot serve an editor"),
    ],
)
def test_vllm_options_hpredit_owns_are_refused_in_any_spelling(args, pattern, smol_editor):
    """Issue 31: ownership is decided on vLLM's parsed arguments, not on the spelling (vLLM's parser
    takes ``--x_y``, abbreviations and ``--x.key``, and the last value wins)."""
    with pytest.raises(HpreditError, match=re.escape(pattern)):
        _checked(smol_editor, args)


def test_vllm_options_from_a_config_file_are_checked_too(smol_editor, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("model-impl: transformers\nport: 8123\n")
    with pytest.raises(HpreditError, match="--model-impl transformers cannot serve an editor"):
        _checked(smol_editor, ["--config", str(config)])
    config.write_text("port: 8123\nmax-model-len: 256\n")
    args = _checked(smol_editor, ["--config", str(config)])
    assert args.port == 8123 and args.max_model_len == 256


@pytest.mark.parametrize(
    "text, pattern",
    [
        (None, "No such file or directory"),
        ("port: [unclosed\n", "while parsing a flow sequence"),
        ("- a\n- b\n", "'list' object has no attribute 'items'"),
    ],
)
def test_a_config_file_vllm_cannot_read_is_one_error(text, pattern, smol_editor, tmp_path):
    config = tmp_path / "serve.yaml"
    if text is not None:
        config.write_text(text)
    with pytest.raises(HpreditError, match=re.escape(pattern) + r".*--config takes one YAML file"):
        _checked(smol_editor, ["--config", str(config)])


def test_vllm_options_that_leave_hpredits_alone_pass(smol_editor):

    assert _checked(smol_editor, []).enable_prefix_caching is True  # on: each request's cache salted by its edit
    args = _checked(smol_editor, ["--no-enable-prefix-caching", "--port", "8123", "--model-impl", "vllm"])
    assert args.port == 8123 and args.enable_prefix_caching is False  # the user may turn it off
    assert args.hf_overrides["architectures"] == ["HPREditLlamaForCausalLM"]
    args = _checked(smol_editor, ["--middleware", "my.Middleware", "--served_model_name", "mine"])
    assert len(args.middleware) == 2 and args.middleware[1] == "my.Middleware"
    assert args.middleware[0].startswith("hpredit.serving.middleware.RequestCheck_")
    assert args.served_model_name == ["mine"]  # the user's name wins


def test_serve_refuses_a_gguf_quantization_config(tmp_path, capsys, smol_editor, smol_dir):
    """Issue 31: a model directory converted from GGUF whose config.json still says ``quant_method:
    gguf`` (its weights are plain) is refused before vLLM starts, with what to remove."""
    model = tmp_path / "model"
    model.mkdir()
    for f in smol_dir.iterdir():
        (model / f.name).symlink_to(f)
    (model / "config.json").unlink()
    cfg = json.loads((smol_dir / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gguf"}}))
    code, _, err = run_cli(["serve", "--editor", str(smol_editor), "--model", str(model), "--no-strict"], capsys)
    _one_line_error(code, err, f"remove the 'quantization_config' entry from {model / 'config.json'}")


# ----------------------------------------------------------------- the request check at the front door


@pytest.mark.parametrize(
    "xargs, message",
    [
        ('{"strength": true}', "'strength' must be a number between -100 and 100, got True"),
        ('{"strength": null}', "'strength' must be a number between -100 and 100, got None"),
        ('{"kl": false}', "'kl' must be a number"),
        ('{"scope": null}', "'scope' must be one of"),
        ('{"editor": "nope"}', "unknown editor 'nope': this server has a, b"),
        ('{"strength": 1e39}', "between -100 and 100"),
        ('{"strenght": 1}', "unknown extra argument(s) ['strenght']"),
    ],
)
def test_request_check_finds_bad_arguments_as_sent(xargs, message):
    from hpredit.serving.middleware import problem

    body = f'{{"model": "m", "prompt": "Hi", "stream": true, "vllm_xargs": {xargs}}}'.encode()
    found = problem(body, ("a", "b"), (None, None))
    assert found is not None and message in found, found


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "Hi"}',
        b'{"prompt": "Hi", "vllm_xargs": {"strength": 0.5, "editor": "b", "scope": "generated"}}',
        b'{"prompt": "Hi", "vllm_xargs": null}',
        b'{"prompt": "Hi", "vllm_xargs": "strength"}',  # not an object: vLLM's own 400
        b'{"vllm_xargs": {"strength": ',  # not JSON: vLLM's own 400
        b'[1, "vllm_xargs"]',
        b'{"vllm_xargs": {"strength": 1}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # too deep for json
        b'\xff\xfe{"vllm_xargs": {"strength": true}}',  # not UTF-8
    ],
)
def test_request_check_leaves_the_rest_to_vllm(body):
    from hpredit.serving.middleware import problem

    assert problem(body, ("a", "b"), (None, None)) is None


def _asgi(app, body_chunks, headers=(), path="/v1/completions", with_headers=False):
    """One POST to ``path`` through an ASGI app: ``(status, body)`` (the inner app answers with the body it
    received), and with ``with_headers`` the headers it received."""
    import asyncio

    sent = []
    incoming = [
        {"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1} for i, c in enumerate(body_chunks)
    ]
    length = [(b"content-length", str(sum(map(len, body_chunks))).encode())]
    scope = {"type": "http", "method": "POST", "path": path, "headers": [*headers, *length], "root_path": ""}

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    if with_headers:
        return status, body, dict(next(m["headers"] for m in sent if m["type"] == "http.response.start"))
    return status, body


class _Inner:
    """An ASGI app that answers 200 with the body and the headers it received."""

    async def __call__(self, scope, receive, send):
        body, more = b"", True
        while more:
            m = await receive()
            body, more = body + m.get("body", b""), m.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": scope["headers"]})
        await send({"type": "http.response.body", "body": body})


def test_request_check_answers_400_before_vllm_and_replays_good_bodies():
    from hpredit.serving.middleware import edit_salt, request_check_class

    check = request_check_class(FrontSpec(("a", "b"), (0.4, None)))(_Inner())
    good = [b'{"prompt": "Hi", "vllm_', b'xargs": {"kl": 0.3}}']
    status, body = _asgi(check, good)  # the body, split in two, reaches vLLM whole, with its edit's salt
    assert status == 200 and json.loads(body) == {**json.loads(b"".join(good)), "cache_salt": edit_salt({"kl": 0.3})}
    status, body = _asgi(check, [b'{"stream": true, "vllm_xargs": {"kl": 0.5}}'])
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == 400 and error["type"] == "BadRequestError"
    assert error["message"] == (
        "hpredit: 'kl' 0.5 is beyond editor 'a''s measured strength → KL curve (0 to 0.4 nats/token): "
        "ask for a smaller cost, or pass 'strength'"
    )


def test_edit_salt_is_equal_exactly_for_equal_edits_and_own_salts():
    """Issue 28, item 1: the cache salt hpredit sets keys vLLM's prefix cache on the edit: equal for
    the same edit (1 and 1.0 are one strength), different for another editor, strength, cost, scope or
    client salt; none for strength 0 (the unedited model's KV) without a client salt."""
    from hpredit.serving.middleware import edit_salt

    base = edit_salt({"strength": 0.5})
    assert base == edit_salt({"strength": 0.5}) and edit_salt({"strength": 1}) == edit_salt({"strength": 1.0})
    others = [
        {"strength": 0.25},
        {"strength": 0.5, "editor": "second"},
        {"strength": 0.5, "scope": "generated"},  # its generated tokens' blocks are edited, and cached
        {"kl": 0.5},
        {},  # the server's defaults
    ]
    salts = [base, *(edit_salt(x) for x in others), edit_salt({"strength": 0.5}, "team-a")]
    assert len(set(salts)) == len(salts) and all(s.startswith("hpredit-") and len(s) <= 128 for s in salts)
    assert edit_salt({"strength": 0}) is None and edit_salt({"strength": 0.0, "editor": "second"}) is None
    assert edit_salt({"strength": 0}, "team-a") == edit_salt({"strength": 0.0, "scope": "all"}, "team-a")
    assert edit_salt({"strength": 0}, "team-a") != edit_salt({"strength": 0}, "team-b")


@pytest.mark.parametrize(
    "path, body, salt",
    [
        ("/v1/completions", {"prompt": "Hi", "vllm_xargs": {"strength": 0.5}}, {"strength": 0.5}),
        ("/v1/chat/completions", {"messages": [], "vllm_xargs": {"editor": "b"}}, {"editor": "b"}),
        ("/v1/responses", {"input": "Hi"}, {}),  # no arguments: the server's default edit
        ("/v1/messages", {"messages": [], "vllm_xargs": {"kl": 0.1}}, {"kl": 0.1}),
        (
            "/inference/v1/generate",
            {"token_ids": [1], "sampling_params": {"extra_args": {"strength": 2}}},
            {"strength": 2},
        ),
        (
            "/v1/completions",
            {"prompt": "Hi", "cache_salt": "mine", "vllm_xargs": {"strength": 1}},
            ("mine", {"strength": 1}),
        ),
        ("/v1/completions", {"prompt": "Hi", "cache_salt": None}, {}),  # null: no salt of its own
        ("/v1/completions", {"prompt": "Hi", "cache_salt": "m", "vllm_xargs": {"strength": 0}}, ("m", {"strength": 0})),
    ],
)
def test_request_check_salts_every_generation_request_by_its_edit(path, body, salt):
    from hpredit.serving.middleware import edit_salt, request_check_class

    check = request_check_class(FrontSpec(("a", "b"), None))(_Inner())
    raw = json.dumps(body).encode()
    status, received, headers = _asgi(check, [raw[:7], raw[7:]], path=path, with_headers=True)
    own, edit = salt if isinstance(salt, tuple) else (None, salt)
    assert status == 200 and json.loads(received) == {**body, "cache_salt": edit_salt(edit, own)}
    assert headers[b"content-length"] == str(len(received)).encode()  # the new body's length


@pytest.mark.parametrize(
    "path, raw",
    [
        ("/v1/completions", b'{"prompt": "Hi", "vllm_xargs": {"strength": 0}}'),  # unedited: no salt needed
        ("/v1/completions", b'{"prompt": "Hi", "cache_salt": "a/b"}'),  # vLLM refuses this salt itself
        ("/v1/completions", b'{"prompt": "Hi", "cache_salt": ""}'),
        ("/v1/completions", b'{"prompt": "Hi", "cache_salt": 123}'),  # not a string
        ("/v1/completions", b'{"prompt": "Hi", "cache_salt": "' + b"x" * 129 + b'"}'),  # over vLLM's 128
        ("/v1/completions", b'{"prompt": "Hi", "cache_salt": "a@b"}'),
        ("/v1/completions", b"not json"),
        ("/v1/completions", b"[1, 2]"),
        ("/tokenize", b'{"prompt": "Hi"}'),  # no generation: no salt
    ],
)
def test_request_check_passes_other_bodies_on_as_sent(path, raw):
    from hpredit.serving.middleware import request_check_class

    check = request_check_class(FrontSpec(("a",), None))(_Inner())
    assert _asgi(check, [raw], path=path) == (200, raw)


def test_request_check_leaves_unauthorized_requests_to_vllms_401():
    """A server with an API key: a request without it gets vLLM's 401, not hpredit's 400 (which would
    tell a stranger the editors' names)."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    from hpredit.serving.middleware import request_check_class

    check = request_check_class(FrontSpec(("a",), None))(AuthenticationMiddleware(_Inner(), tokens=["secret"]))
    bad = [b'{"vllm_xargs": {"editor": "zzz"}}']
    assert _asgi(check, bad)[0] == 401
    assert _asgi(check, bad, [(b"authorization", b"Bearer wrong")])[0] == 401
    status, body = _asgi(check, bad, [(b"authorization", b"Bearer secret")])
    assert status == 400 and b"unknown editor 'zzz'" in body


def test_serve_kl_with_an_earlier_artifacts_curve_says_why_it_is_not_used(smol_editor_with_curve, tmp_path, capsys):
    """A format-1 artifact (before config.json's checksum) keeps its curve on disk, but nothing vouches
    for it: `serve --kl` says so, not that the editor has no curve."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(smol_editor_with_curve, old)
    cfg = json.loads((old / "config.json").read_text())
    cfg["format_version"] = 1
    del cfg["config_sha256"]
    (old / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["serve", "--editor", str(old), "--kl", "0.1"], capsys)
    _one_line_error(code, err, "its strength → KL curve was saved without a checksum covering it")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--editor", ""], "not an editor directory"),
        (["--editor", "/nonexistent"], "not an editor directory"),
        (["--requests", "1"], "--requests must be at least 2"),
        (["--requests", "-5"], "--requests must be at least 2"),
        (["--repeat", "0"], "--repeat must be at least 1"),
        (["--requests", "x"], "invalid int value"),
    ],
)
def test_prefix_cache_benchmark_refuses_bad_arguments_before_any_server(args, message, smol_editor):
    """benchmarks/serve_prefix_cache.py: a bad argument is argparse's one line and exit status 2, before a
    server starts."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "serve_prefix_cache.py"
    full = args if args[0] == "--editor" else ["--editor", str(smol_editor), *args]
    r = subprocess.run([sys.executable, str(script), *full], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
