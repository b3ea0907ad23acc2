"""Activation collection: completion tokens only, one pass per unique text, cache == no cache."""

import pytest
import torch

from hpredit import collect_activations
from hpredit.activations import ActivationStore, tokenize_completion
from hpredit.data import ContrastivePair
from hpredit.errors import HpreditError

from .conftest import tiny_model

PROMPT_A = "Q: What colour is the sky?\nA:"
PROMPT_B = "Q: How many legs does a spider have?\nA:"
PAIRS = [
    ContrastivePair(PROMPT_A, " Blue.", " Green, obviously.", group=0, split="train"),
    ContrastivePair(PROMPT_A, " Blue.", " Red.", group=0, split="train"),
    ContrastivePair(PROMPT_A, " It is blue on a clear day.", " Red.", group=0, split="train"),
    ContrastivePair(PROMPT_B, " Eight.", " Six.", group=1, split="val"),
]


@pytest.fixture(scope="module")
def model_tok(tokenizer):
    return tiny_model("llama", vocab=len(tokenizer)), tokenizer


def _reference(model, tok, prompt, completion, layers):
    """Block outputs of one text alone, full forward pass, completion tokens only (float32)."""
    ids, start = tokenize_completion(tok, prompt, completion)
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    # hidden_states[i + 1] is the output of block i (the last one is after the final norm: skip it)
    return [out.hidden_states[i + 1][0, start:] for i in layers]


def test_unique_texts_once_and_completion_tokens_only(model_tok):
    model, tok = model_tok
    acts = collect_activations(model, tok, PAIRS, layers=[0, 1], progress=False)
    assert len(acts.texts) == 6  # " Blue." and " Red." are shared between pairs of question 0
    assert acts.pairs.tolist() == [[0, 1], [0, 2], [3, 2], [4, 5]]
    assert acts.acts.dtype == torch.float16 and acts.acts.shape[0] == 2
    for i, (prompt, completion) in enumerate(acts.texts):
        ids, start = tokenize_completion(tok, prompt, completion)
        assert acts.offsets[i + 1] - acts.offsets[i] == len(ids) - start
        for r, ref in enumerate(_reference(model, tok, prompt, completion, [0, 1])):
            got = acts.acts[r, acts.offsets[i] : acts.offsets[i + 1]].float()
            torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_prefix_cache_equals_plain_batches(arch, tokenizer):
    model = tiny_model(arch, vocab=len(tokenizer))
    a = collect_activations(model, tokenizer, PAIRS, progress=False, batch_size=2)
    b = collect_activations(model, tokenizer, PAIRS, progress=False, batch_size=3, prefix_cache=False)
    assert torch.equal(a.offsets, b.offsets)
    torch.testing.assert_close(a.acts.float(), b.acts.float(), rtol=2e-3, atol=2e-3)


def test_last_block_is_the_pre_norm_block_output(model_tok):
    model, tok = model_tok
    acts = collect_activations(model, tok, PAIRS[:1], layers=[2], progress=False)
    ids, start = tokenize_completion(tok, PROMPT_A, " Blue.")
    seen = {}
    h = model.model.layers[2].register_forward_hook(lambda m, a, o: seen.setdefault("x", o[0] if isinstance(o, tuple) else o))
    model(input_ids=torch.tensor([ids]))
    h.remove()
    torch.testing.assert_close(acts.acts[0, : len(ids) - start].float(), seen["x"][0, start:], rtol=2e-3, atol=2e-3)


def test_token_pairs_align_by_position(model_tok):
    model, tok = model_tok
    acts = collect_activations(model, tok, PAIRS, layers=[0], progress=False)
    pos, neg = acts.token_pairs()
    lengths = (acts.offsets[1:] - acts.offsets[:-1]).tolist()
    expected = sum(min(lengths[p], lengths[n]) for p, n in acts.pairs.tolist())
    assert len(pos) == len(neg) == expected
    p0, n0 = acts.pairs[0].tolist()
    assert pos[0] == acts.offsets[p0] and neg[0] == acts.offsets[n0]
    assert pos[1] == acts.offsets[p0] + 1 and neg[1] == acts.offsets[n0] + 1
    only_val = acts.token_pairs(acts.split_mask("val"))
    p3, n3 = acts.pairs[3].tolist()
    assert only_val[0].tolist()[0] == acts.offsets[p3]


def test_save_load_roundtrip_and_shards(model_tok, tmp_path, monkeypatch):
    import hpredit.activations as mod

    model, tok = model_tok
    acts = collect_activations(model, tok, PAIRS, progress=False)
    monkeypatch.setattr(mod, "_SHARD_BYTES", acts.acts[0].numel() * 2)  # one layer per shard
    acts.save(tmp_path / "store")
    assert len(list((tmp_path / "store").glob("acts-*.safetensors"))) == 3
    back = ActivationStore.load(tmp_path / "store")
    assert torch.equal(back.acts, acts.acts) and back.layers == acts.layers
    assert torch.equal(back.pairs, acts.pairs) and back.splits == acts.splits and back.texts == acts.texts
    assert back.fingerprint == acts.fingerprint
    shard = next((tmp_path / "store").glob("acts-00001*"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(HpreditError, match="damaged"):
        ActivationStore.load(tmp_path / "store")
    with pytest.raises(HpreditError, match="missing"):
        ActivationStore.load(tmp_path / "nothing")


def test_bad_inputs(model_tok):
    model, tok = model_tok
    with pytest.raises(HpreditError, match="no contrastive pairs"):
        collect_activations(model, tok, [], progress=False)
    with pytest.raises(HpreditError, match=r"out of range: the model has 3 blocks"):
        collect_activations(model, tok, PAIRS, layers=[5], progress=False)


def test_bfloat16_model_stores_bfloat16(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer), dtype=torch.bfloat16)
    acts = collect_activations(model, tokenizer, PAIRS[:1], progress=False)
    assert acts.acts.dtype == torch.bfloat16 and torch.isfinite(acts.acts.float()).all()
