"""Attaching editors: exact detach, KV cache on/off, left/right padding, dtypes, scopes, errors."""

import pytest
import torch

from hpredit.errors import HpreditError
from hpredit.models import decoder_layers

from .conftest import ARCHS, EDITOR_KINDS, random_editor, random_hpr, tiny_model

PROMPTS = [[5, 17, 33, 9, 71, 12, 8], [44, 3, 90], [7, 7, 120, 61, 2 + 3, 99]]
NEW = 6


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _gen(model, ids, mask, use_cache=True):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        use_cache=use_cache,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences, torch.stack(out.logits, 1).float()


def _batch(prompts, side):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[r, sl] = torch.tensor(p)
        mask[r, sl] = 1
    return ids, mask


def _capture(model, layer, first=False):
    """Record the output of block ``layer`` on every forward call; an attached editor's hook runs
    before it, unless ``first`` (registered after attach: the block's own output)."""
    seen = []
    _, blocks = decoder_layers(model)
    h = blocks[layer].register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().clone()), prepend=first
    )
    return seen, h


def _hooks_clean(model):
    path, blocks = decoder_layers(model)
    parent = model.get_submodule(path.rsplit(".", 1)[0])
    return (
        all(not b._forward_hooks for b in blocks) and not parent._forward_pre_hooks and "generate" not in model.__dict__
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_attach_edits_and_detach_restores_exactly(arch):
    model = _no_eos(tiny_model(arch))
    editor = random_hpr(model)
    ids = torch.tensor([PROMPTS[0]])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(input_ids=ids).logits
    with editor.attach(model, scope="all"):
        edited = model(input_ids=ids).logits
        seq, _ = _gen(model, ids, torch.ones_like(ids))
    assert not torch.allclose(before, edited)
    assert torch.equal(model(input_ids=ids).logits, before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert _hooks_clean(model)
    assert seq.shape == (1, len(PROMPTS[0]) + NEW)


def test_handle_remove_and_exception_inside_with():
    model = tiny_model("llama")
    editor = random_hpr(model)
    ids = torch.tensor([PROMPTS[1]])
    before = model(input_ids=ids).logits
    handle = editor.attach(model)
    assert handle.attached and not torch.equal(model(input_ids=ids).logits, before)
    handle.remove()
    handle.remove()  # idempotent
    assert _hooks_clean(model) and torch.equal(model(input_ids=ids).logits, before)
    with pytest.raises(RuntimeError, match="inside"):
        with editor.attach(model, scope="last-prompt-and-generated"):
            model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
            raise RuntimeError("inside")
    assert _hooks_clean(model) and torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_on_and_off_agree(arch):
    model = _no_eos(tiny_model(arch))
    editor = random_hpr(model)
    ids, mask = _batch(PROMPTS, "left")
    with editor.attach(model, scope="last-prompt-and-generated"):
        s1, l1 = _gen(model, ids, mask, use_cache=True)
        s2, l2 = _gen(model, ids, mask, use_cache=False)
    s0, _ = _gen(model, ids, mask)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(l1, l2, rtol=1e-3, atol=1e-3)
    assert not torch.equal(s0, s1) or not torch.allclose(_gen(model, ids, mask)[1], l1)


@pytest.mark.parametrize("kind", EDITOR_KINDS)
@pytest.mark.parametrize("scope", ["all", "last-prompt-and-generated", "generated"])
def test_kv_cache_every_scope(scope, kind):
    model = _no_eos(tiny_model("llama"))
    editor = random_editor(kind, model)
    ids, mask = _batch(PROMPTS, "left")
    with editor.attach(model, scope=scope):
        s1, l1 = _gen(model, ids, mask, use_cache=True)
        s2, l2 = _gen(model, ids, mask, use_cache=False)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(l1, l2, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "arch, kind", [(a, "hpr") for a in ("llama", "gpt2", "gemma2", "qwen3")] + [("llama", k) for k in EDITOR_KINDS[1:]]
)
@pytest.mark.parametrize("scope", ["all", "last-prompt-and-generated", "generated"])
def test_left_padded_generate_equals_alone(arch, scope, kind):
    model = _no_eos(tiny_model(arch))
    editor = random_editor(kind, model)
    ids, mask = _batch(PROMPTS, "left")
    with editor.attach(model, scope=scope):
        seqs, logits = _gen(model, ids, mask)
        for r, p in enumerate(PROMPTS):
            one = torch.tensor([p])
            s, lg = _gen(model, one, torch.ones_like(one))
            assert torch.equal(seqs[r, -NEW:], s[0, -NEW:])
            torch.testing.assert_close(logits[r], lg[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "arch, kind", [(a, "hpr") for a in ("llama", "gpt2", "phi3")] + [("llama", k) for k in EDITOR_KINDS[1:]]
)
@pytest.mark.parametrize("scope", ["all", "last-prompt-and-generated"])
def test_right_padded_forward_equals_alone(arch, scope, kind):
    model = tiny_model(arch)
    editor = random_editor(kind, model)
    ids, mask = _batch(PROMPTS, "right")
    with editor.attach(model, scope=scope):
        logits = model(input_ids=ids, attention_mask=mask).logits
        for r, p in enumerate(PROMPTS):
            alone = model(input_ids=torch.tensor([p])).logits[0]
            torch.testing.assert_close(logits[r, : len(p)], alone, rtol=1e-3, atol=1e-3)


def test_left_padded_forward_with_positions_equals_alone():
    model = tiny_model("llama")
    editor = random_hpr(model)
    ids, mask = _batch(PROMPTS, "left")
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with editor.attach(model, scope="last-prompt-and-generated"):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        for r, p in enumerate(PROMPTS):
            alone = model(input_ids=torch.tensor([p])).logits[0]
            torch.testing.assert_close(logits[r, -len(p) :], alone, rtol=1e-3, atol=1e-3)


def test_scopes_touch_the_right_positions():
    model = tiny_model("llama")
    editor = random_hpr(model, layers=[1])
    ids, mask = _batch(PROMPTS, "right")
    plain, h = _capture(model, 1)
    model(input_ids=ids, attention_mask=mask)
    h.remove()
    for scope in ("all", "last-prompt-and-generated", "generated"):
        with editor.attach(model, scope=scope):
            seen, h = _capture(model, 1)
            model(input_ids=ids, attention_mask=mask)
            h.remove()
        changed = (seen[0] != plain[0]).any(-1)
        if scope == "generated":
            assert not changed.any()  # a prompt alone has no generated tokens
        elif scope == "last-prompt-and-generated":
            last = mask.sum(1) - 1
            allowed = torch.zeros_like(changed)
            allowed[torch.arange(3), last] = True
            assert not (changed & ~allowed).any()
        else:
            assert changed.sum() > 3


def test_generated_scope_edits_from_the_first_new_token():
    model = _no_eos(tiny_model("llama"))
    editor = random_hpr(model, layers=[1])
    ids = torch.tensor([PROMPTS[0]])
    plain, h = _capture(model, 1)
    _gen(model, ids, torch.ones_like(ids))
    h.remove()
    with editor.attach(model, scope="generated"):
        seen, h = _capture(model, 1)
        _gen(model, ids, torch.ones_like(ids))
        h.remove()
    assert torch.equal(seen[0], plain[0])  # the prompt pass is untouched
    assert any(not torch.equal(a, b) for a, b in zip(seen[1:], plain[1:]))


@pytest.mark.parametrize("kind", ["hpr", "hpr-no-gate", "caa-norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_no_nan_and_norms_kept(dtype, kind):
    """Norm-keeping editors (HPR and the norm-restoring addition) keep norms in every dtype."""
    model = _no_eos(tiny_model("llama", dtype=dtype))
    editor = random_editor(kind, model, layers=[1])
    ids, mask = _batch(PROMPTS, "left")
    with editor.attach(model, scope="all"):
        pre, h_pre = _capture(model, 1, first=True)  # ahead of the editor: the block's own output
        post, h_post = _capture(model, 1)  # behind it: the edited output
        seqs, logits = _gen(model, ids, mask)
    h_pre.remove()
    h_post.remove()
    assert torch.isfinite(logits).all() and seqs.shape[1] == ids.shape[1] + NEW
    eps = torch.finfo(dtype).eps
    changed = 0
    for a, b in zip(pre, post):
        assert a.dtype == b.dtype == dtype and torch.isfinite(b).all()
        live = a.float().norm(dim=-1) > 0  # fully masked pad rows can be exactly zero (and stay zero)
        ratio = b.float().norm(dim=-1)[live] / a.float().norm(dim=-1)[live]
        assert (ratio - 1).abs().max() < 4 * eps
        assert torch.equal(b[~live], a[~live])
        changed += int((a != b).any(-1).sum())
    assert changed > 0


@pytest.mark.parametrize("kind", ["hpr-bias", "caa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtypes_no_nan_for_norm_changing_editors(dtype, kind):
    model = _no_eos(tiny_model("llama", dtype=dtype))
    editor = random_editor(kind, model, layers=[1])
    ids, mask = _batch(PROMPTS, "left")
    with editor.attach(model, scope="all"):
        _, logits = _gen(model, ids, mask)
    assert torch.isfinite(logits).all()


def test_bad_scope_strength_and_layers():
    model = tiny_model("llama")
    editor = random_hpr(model, layers=[0, 1])
    with pytest.raises(HpreditError, match="unknown scope 'everything'"):
        editor.attach(model, scope="everything")
    for bad in (float("nan"), float("inf"), 1e39, -100.5, True, None):
        with pytest.raises(HpreditError, match=r"strength must be a number between -100 and 100"):
            editor.attach(model, strength=bad)
    with editor.attach(model, strength=-100.0) as handle:  # the bound itself, either sign
        assert handle.strength == -100.0
    with pytest.raises(HpreditError, match="strength must be a number"):
        editor.attach(model, strength="strong")
    with pytest.raises(HpreditError, match=r"no module for layer\(s\) \[2\]"):
        editor.attach(model, layers=[2])
    assert _hooks_clean(model)


def test_fingerprint_mismatch_is_refused():
    editor = random_hpr(tiny_model("llama"))
    with pytest.raises(HpreditError, match="architecture GPT2LMHeadModel"):
        editor.attach(tiny_model("gpt2"))
    other = tiny_model("llama")
    other.config._name_or_path = "someone/other-model"
    with pytest.raises(HpreditError, match="name 'someone/other-model'.*strict=False"):
        editor.attach(other)
    editor.attach(other, strict=False).remove()
    import transformers

    wider = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=256, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
        )
    )
    wider.config._name_or_path = "tiny-llama"
    with pytest.raises(HpreditError, match="hidden_size 32"):
        editor.attach(wider)


def test_expanded_generate_keeps_per_row_prompt_ends():
    model = _no_eos(tiny_model("llama"))
    editor = random_hpr(model)
    ids, mask = _batch(PROMPTS, "left")
    with editor.attach(model, scope="last-prompt-and-generated"):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=3,
            do_sample=False,
            num_beams=2,
            num_return_sequences=2,
            pad_token_id=0,
        )
        alone = model.generate(
            input_ids=torch.tensor([PROMPTS[1]]),
            max_new_tokens=3,
            do_sample=False,
            num_beams=2,
            num_return_sequences=2,
            pad_token_id=0,
        )
    assert torch.equal(out[2:4, -3:], alone[:, -3:])


def test_output_hidden_states_show_the_edit_whatever_the_call_order():
    """transformers installs its hidden-state capture hooks at the first forward call; the edit
    must come before them both when attached before and after that call."""
    model = tiny_model("llama")
    ed = random_hpr(model, layers=[0])
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    with ed.attach(model, strength=1.0):  # attached before transformers' hooks exist
        first = model(ids, output_hidden_states=True).hidden_states[1]
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True).hidden_states[1]
    with ed.attach(model, strength=1.0):  # attached after them
        later = model(ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(first, later)
    torch.testing.assert_close(later, ed.edit(0, plain, 1.0))
    assert not torch.allclose(later, plain)
