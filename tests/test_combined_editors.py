"""Several editors at once (issue 28, item 4): ``attach_editors`` in Hugging Face, a request's
``editors`` on the server (arguments, per-token strengths, the edit chained in the server's order,
the cache salt), and ``generate --also``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hpredit import attach_editors
from hpredit.checks import MAX_COMBINED_EDITORS
from hpredit.errors import HpreditError
from hpredit.serving.params import RequestEdit, ServeSettings, token_strengths, validate_extra_args

from .conftest import random_editor, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, 200, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("scope", ["all", "last-prompt-and-generated"])
def test_attach_editors_applies_them_in_the_order_given(model, ids, scope):
    """Two editors sharing layers 1 and 2: ``attach_editors([(a, sa), (b, sb)])`` equals a's edit then
    b's at each layer (two handles nested so that a's hook runs first: each handle's hook goes first
    in line, so b is attached first), exactly, and differs from the other order."""
    a = random_editor("hpr", model, layers=[0, 1, 2], seed=0)
    b = random_editor("caa", model, layers=[1, 2], seed=3)
    plain = _logits(model, ids)
    with attach_editors(model, [(a, 1.0), (b, 0.5)], scope=scope):
        combined = _logits(model, ids)
    with b.attach(model, strength=0.5, scope=scope), a.attach(model, strength=1.0, scope=scope):
        nested = _logits(model, ids)
    with attach_editors(model, [(b, 0.5), (a, 1.0)], scope=scope):
        reversed_ = _logits(model, ids)
    assert torch.equal(combined, nested)
    assert (combined - reversed_).abs().max() > 1e-3  # the order matters where they share a layer
    assert (combined - plain).abs().max() > 1e-2
    assert torch.equal(_logits(model, ids), plain)  # detached: the model is as before


def test_attach_editors_at_strength_zero_is_the_others_alone(model, ids):
    a = random_editor("hpr", model, layers=[0, 1, 2], seed=0)
    b = random_editor("caa", model, layers=[1, 2], seed=3)
    with a.attach(model, strength=0.75):
        alone = _logits(model, ids)
    with attach_editors(model, {a: 0.75, b: 0.0}):  # a mapping works too
        combined = _logits(model, ids)
    assert torch.equal(alone, combined)


def test_attach_editors_generate_with_a_kv_cache(model, ids):
    """generate() with the cache, under a scope that needs positions: as the nested handles."""
    a = random_editor("hpr", model, layers=[0, 1, 2], seed=0)
    b = random_editor("caa-norm", model, layers=[2], seed=4)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with attach_editors(model, [(a, 1.0), (b, 2.0)], scope="last-prompt-and-generated"):
        combined = model.generate(ids, **kwargs)
    with b.attach(model, strength=2.0, scope="last-prompt-and-generated"):
        with a.attach(model, strength=1.0, scope="last-prompt-and-generated"):
            nested = model.generate(ids, **kwargs)
    assert torch.equal(combined, nested)


def test_attach_editors_bad_input(model):
    a = random_editor("hpr", model, layers=[1], seed=0)
    iti = random_editor("iti", model)
    other = random_editor("caa", tiny_model("qwen2"), layers=[1])
    cases = [
        ([], "give at least one (editor, strength) pair"),
        ([(a, 1.0)] * (MAX_COMBINED_EDITORS + 1), f"at most {MAX_COMBINED_EDITORS} at once"),
        ([a], "entry 0 must be an (editor, strength) pair"),
        ([(a, 1.0, 2.0)], "entry 0 must be an (editor, strength) pair"),
        ([("dir", 1.0)], "entry 0 must be an (editor, strength) pair"),
        ([(a, float("nan"))], "must be a number between -100 and 100"),
        ([(a, "1")], "must be a number between -100 and 100"),
        ([(a, 1.0), (iti, 1.0)], "different sites (heads, residual)"),
        ([(a, 1.0), (other, 1.0)], "fitted on"),
    ]
    for editors, message in cases:
        with pytest.raises(HpreditError, match=".*" + message.replace("(", r"\(").replace(")", r"\)")):
            attach_editors(model, editors)
    with pytest.raises(HpreditError, match="unknown scope"):
        attach_editors(model, [(a, 1.0)], scope="prompt")
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())  # nothing left


# ----------------------------------------------------------------- a served request's "editors"


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"editors": {}}, "'editors' is empty"),
        ({"editors": []}, "'editors' is empty"),
        ({"editors": "a"}, "'editors' must be an object of editor names → strengths"),
        ({"editors": ["a", 1.0, "b"]}, "'editors' must be an object"),
        ({"editors": {"a": True}}, "the strength of editor 'a' in 'editors' must be a number"),
        ({"editors": {"a": None}}, "must be a number between -100 and 100, got None"),
        ({"editors": {"a": 101}}, "must be a number between -100 and 100"),
        ({"editors": {"nope": 1.0}}, "unknown editor 'nope': this server has a, b, c"),
        ({"editors": ["a", 1.0, "a", 0.5]}, "'editors' names editor 'a' twice"),
        ({"editors": {"a": 1.0}, "editor": "b"}, "give 'editors' (names → strengths) or 'editor', not both"),
        ({"editors": {"a": 1.0}, "strength": 1.0}, "or 'strength', not both"),
        ({"editors": {"a": 1.0}, "kl": 0.1}, "or 'kl', not both"),
        ({"editors": {f"e{i}": 1.0 for i in range(MAX_COMBINED_EDITORS + 1)}}, f"at most {MAX_COMBINED_EDITORS}"),
    ],
)
def test_bad_request_editors(extra, message):
    with pytest.raises(ValueError, match=".*" + message.replace("(", r"\(").replace(")", r"\)")):
        validate_extra_args(extra, ("a", "b", "c") if "e0" not in extra.get("editors", {}) else None)


def test_request_editors_resolve_in_the_servers_order():
    settings = ServeSettings((("a", "/a"), ("b", "/b"), ("c", "/c")), 0.5, "all")
    want = RequestEdit(((0, 0.25), (2, 1.0)), 3)
    assert settings.resolve({"editors": {"c": 1, "a": 0.25}, "scope": "last-prompt-and-generated"}, 4) == want
    assert settings.resolve({"editors": ["a", 0.25, "c", 1.0], "scope": "last-prompt-and-generated"}, 4) == want


def test_token_strengths_with_several_editors_per_request():
    rows = [RequestEdit(((0, 0.5), (2, -1.0)), 1), RequestEdit.one(1, 2.0, 0), RequestEdit((), 0)]
    counts, positions = np.array([3, 1, 2]), np.array([0, 1, 2, 7, 0, 1])
    assert token_strengths(rows, counts, positions, 3).tolist() == [
        [0, 0.5, 0.5, 0, 0, 0],
        [0, 0, 0, 2.0, 0, 0],
        [0, -1.0, -1.0, 0, 0, 0],
    ]


def test_edit_block_output_chains_a_tokens_editors_in_order():
    """The served edit: a token both editors edit gets a's edit, then b's on a's output (as
    attach_editors); a token one editor edits gets that one; a non-finite second edit leaves the
    first's output."""
    pytest.importorskip("vllm")
    from hpredit.serving.model import edit_block_output

    model = tiny_model("llama")
    a = random_editor("hpr", model, layers=[1], seed=0)
    b = random_editor("caa", model, layers=[1], seed=3)
    fa, fb = (e.layer_edit(1, torch.device("cpu"), torch.float32) for e in (a, b))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    s = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]])
    out = edit_block_output(x, ((0, fa), (1, fb)), s)
    first = fa(x, s[0] != 0, s[0])
    assert torch.equal(out, fb(first, s[1] != 0, s[1]))  # b on a's output, per token
    close = dict(atol=1e-5, rtol=1e-5)  # one row alone: another matmul shape, another rounding
    torch.testing.assert_close(out[0], fb(fa(x[:1], None, 1.0), None, 0.5)[0], **close)
    torch.testing.assert_close(out[1], fa(x[1:2], None, 1.0)[0], **close)
    torch.testing.assert_close(out[2], fb(x[2:3], None, 0.5)[0], **close)
    assert torch.equal(out[3], x[3])

    def inf(h, m, st):
        return torch.where(m.unsqueeze(-1), torch.full_like(h, float("inf")), h)

    guarded = edit_block_output(x, ((0, fa), (1, inf)), s)
    assert torch.equal(guarded[:2], first[:2]) and torch.equal(guarded[2:], x[2:])


def test_request_check_flattens_editors_for_vllm_and_salts_them():
    """vLLM's request schema takes no nested object in ``vllm_xargs``: the front door hands it the flat
    list. The salt is the same however the request spells the same editors (order, 1 vs 1.0, an
    editor at 0), and none when every strength is 0."""
    from hpredit.serving.middleware import edit_salt, salted

    body = {"prompt": "Hi", "vllm_xargs": {"editors": {"b": 0.5, "a": 1}}}
    out = json.loads(salted(json.loads(json.dumps(body))))
    assert out["vllm_xargs"]["editors"] == ["b", 0.5, "a", 1]
    salt = edit_salt({"editors": {"b": 0.5, "a": 1}})
    assert out["cache_salt"] == salt
    assert salt == edit_salt({"editors": ["a", 1.0, "b", 0.5]}) == edit_salt({"editors": {"a": 1.0, "b": 0.5, "c": 0}})
    assert salt != edit_salt({"editors": {"a": 1.0, "b": 0.5}, "scope": "generated"})
    assert salt != edit_salt({"editors": {"a": 0.5, "b": 1.0}})
    assert edit_salt({"editors": {"a": 0, "b": 0.0}}) is None
    zero = json.loads(salted({"prompt": "Hi", "vllm_xargs": {"editors": {"a": 0}}}))
    assert zero == {"prompt": "Hi", "vllm_xargs": {"editors": ["a", 0]}}  # flattened, no salt needed


# ----------------------------------------------------------------- hpredit generate --also


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved with the test tokenizer, an HPR editor and a CAA editor for it."""
    from .conftest import random_hpr, saved_tiny_model

    root = tmp_path_factory.mktemp("also")
    model = saved_tiny_model(root / "tiny-llama", tokenizer)
    random_hpr(model).save_pretrained(root / "a")
    random_editor("caa", model, layers=[1, 2], seed=3).save_pretrained(root / "b")
    return root, model


def test_generate_also_equals_attach_editors(tiny_dir, tokenizer):
    from hpredit.editors import load_editor
    from hpredit.pipeline import generate

    root, model = tiny_dir
    a, b = load_editor(root / "a"), load_editor(root / "b")
    result = generate(
        ["Hello there"], root / "a", root / "tiny-llama", strength=1.5, also=[(root / "b", 2.0)], max_new_tokens=4
    )
    enc = tokenizer(["Hello there"], return_tensors="pt")
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with attach_editors(model, [(a, 1.5), (b, 2.0)], scope="last-prompt-and-generated"):
        want = model.generate(**enc, **kwargs)
    with a.attach(model, strength=1.5, scope="last-prompt-and-generated"):
        only_a = model.generate(**enc, **kwargs)
    n = enc["input_ids"].shape[1]
    assert result.rows[0][2] == tokenizer.decode(want[0, n:], skip_special_tokens=True).strip()
    assert not torch.equal(want, only_a)  # b acts
    assert [(e.method, s) for e, s in result.also] == [("caa", 2.0)]


@pytest.mark.parametrize(
    "also, message",
    [
        ("DIR", "--also takes DIR=STRENGTH pairs, comma-separated, got '"),
        ("DIR=x", "/b=x'"),
        ("=1", "got '=1'"),
        (",", "--also needs at least one DIR=STRENGTH"),
        (" ,, ", "--also needs at least one DIR=STRENGTH"),
        ("DIR=101", "must be a number between -100 and 100"),
        ("DIR=nan", "must be a number between -100 and 100"),
        (",".join(["DIR=1"] * MAX_COMBINED_EDITORS), f"at most {MAX_COMBINED_EDITORS} editors at once"),
        ("MISSING=1", "does not exist"),
    ],
)
def test_generate_also_bad_input(tiny_dir, capsys, also, message):
    from .test_cli import _one_line_error, run_cli

    root, _ = tiny_dir
    also = also.replace("DIR", str(root / "b")).replace("MISSING", str(root / "none"))
    argv = ["generate", "Hi", "--model", str(root / "tiny-llama"), "--editor", str(root / "a"), "--also", also]
    code, _, err = run_cli(argv, capsys)
    _one_line_error(code, err, message)


def test_generate_also_on_the_command_line(tiny_dir, capsys):
    from .test_cli import run_cli

    root, _ = tiny_dir
    argv = ["generate", "Hi", "--model", str(root / "tiny-llama"), "--editor", str(root / "a")]
    code, out, err = run_cli([*argv, "--also", f"{root / 'b'}=0.5", "--max-new-tokens", "2"], capsys)
    assert code in (0, None), err
    assert "then CAA layers [1, 2], strength 0.5" in " ".join(out.split())


@pytest.mark.parametrize(
    "also, message",
    [
        ("DIR", "--also takes DIR=STRENGTH pairs"),
        ("DIR=nan", "must be a number between -100 and 100, got nan"),
        ("DIR=-1e9", "must be a number between -100 and 100"),
        (",", "--also needs at least one DIR=STRENGTH"),
    ],
)
def test_generate_also_bad_input_in_a_real_process(tiny_dir, also, message):
    """`hpredit generate --also` as a user types it, in its own process: one error line, exit 2."""
    import subprocess
    import sys

    root, _ = tiny_dir
    argv = ["generate", "Hi", "--model", str(root / "tiny-llama"), "--editor", str(root / "a")]
    argv += ["--also", also.replace("DIR", str(root / "b"))]
    out = subprocess.run([sys.executable, "-m", "hpredit.cli", *argv], capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert message in lines[0]
