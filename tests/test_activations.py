"""Activation collection: completion tokens only, one pass per unique text, cache == no cache."""

import json

import pytest
import torch

from hpredit import collect_activations
from hpredit.activations import ActivationStore, tokenize_completion
from hpredit.data import ContrastivePair
from hpredit.errors import HpreditError
from hpredit.hooks import untuple

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
    h = model.model.layers[2].register_forward_hook(lambda m, a, o: seen.setdefault("x", untuple(o)))
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
    with pytest.raises(HpreditError, match=r"out of range: the model has 3 layers"):
        collect_activations(model, tok, PAIRS, layers=[5], progress=False)


def test_bfloat16_model_stores_bfloat16(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer), dtype=torch.bfloat16)
    acts = collect_activations(model, tokenizer, PAIRS[:1], progress=False)
    assert acts.acts.dtype == torch.bfloat16 and torch.isfinite(acts.acts.float()).all()


# --------------------------------------------------------------------------- recording (hooks.record)


def test_record_block_outputs_and_attention_inputs(model_tok):
    from hpredit.hooks import record

    model, tok = model_tok
    ids = torch.tensor([tokenize_completion(tok, PROMPT_A, " Blue.")[0]])
    ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    hooks = lambda: [(len(b._forward_hooks), len(b.self_attn.o_proj._forward_pre_hooks)) for b in model.model.layers]  # noqa: E731
    before = hooks()
    with record(model, [0, 1]) as acts, record(model, [1], site="attn_in") as heads:
        model(input_ids=ids)
    assert sorted(acts) == [0, 1] and list(heads) == [1]
    torch.testing.assert_close(acts[0], ref[1])  # hidden_states[i + 1] is block i's output (but the last)
    torch.testing.assert_close(acts[1], ref[2])
    assert heads[1].shape == (1, ids.shape[1], 64)
    assert hooks() == before


def test_record_removes_hooks_on_error_and_can_stop_early(model_tok):
    from hpredit.hooks import StopForward, record, untuple

    model, tok = model_tok
    ids = torch.tensor([[5, 6, 7]])
    before = len(model.model.layers[0]._forward_hooks)
    with pytest.raises(RuntimeError), record(model, [0]):
        raise RuntimeError("boom")
    assert len(model.model.layers[0]._forward_hooks) == before
    ran = []
    late = model.model.layers[2].register_forward_hook(lambda *a: ran.append(2))
    try:
        with record(model, [0, 1], stop=True, transform=lambda h: h.norm(dim=-1)) as norms:
            with pytest.raises(StopForward):
                model(input_ids=ids)
    finally:
        late.remove()
    assert ran == [] and norms[1].shape == (1, 3)  # block 2 never ran; the transform kept norms only
    assert untuple((torch.ones(1), "x")) is not None and untuple(torch.zeros(2)).shape == (2,)
    with pytest.raises(HpreditError, match="out of range"):
        with record(model, [9]):
            pass
    with pytest.raises(HpreditError, match="unknown record site"):
        with record(model, site="mlp"):
            pass


def test_cache_kwarg_is_public(model_tok):
    import inspect

    from hpredit.prefix import cache_kwarg

    model, _ = model_tok
    key = cache_kwarg(model)
    assert key in ("cache", "past_key_values") and key in inspect.signature(model.forward).parameters


# --------------------------------------------------------------------------- store dtype (issue 14)


def _loud_model(tokenizer, scale: float = 1e6):
    """A tiny Llama whose embeddings are scaled so block outputs exceed float16's 65,504."""
    model = tiny_model("llama", vocab=len(tokenizer))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(scale)
    return model


def test_auto_store_dtype_switches_to_bfloat16_where_float16_overflows(tokenizer, tmp_path):
    from hpredit.editors import CAAEditor, HPRConfig, HPREditor

    model = _loud_model(tokenizer)
    ids = torch.tensor([tokenize_completion(tokenizer, PROMPT_A, " Blue.")[0]])
    assert model(input_ids=ids, output_hidden_states=True).hidden_states[1].abs().max() > 65504
    acts = collect_activations(model, tokenizer, PAIRS, progress=False)  # the default: dtype="auto"
    assert acts.acts.dtype == torch.bfloat16 and torch.isfinite(acts.acts.float()).all()
    assert acts.dtype_choice.startswith("auto: bfloat16 (float16 overflows at layer")
    acts.save(tmp_path / "store")
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["dtype_choice"] == acts.dtype_choice
    assert ActivationStore.load(tmp_path / "store").dtype_choice == acts.dtype_choice
    for cls, config in ((HPREditor, HPRConfig(epochs=1, angle_depth=2, top_k=2)), (CAAEditor, None)):
        editor = cls.fit(acts, config, progress=False)
        base = model(input_ids=ids).logits
        with editor.attach(model):
            edited = model(input_ids=ids).logits
        assert torch.isfinite(edited).all() and not torch.equal(edited, base)
    with pytest.raises(HpreditError, match="beyond the float16 range.*use store dtype auto or bfloat16"):
        collect_activations(model, tokenizer, PAIRS, dtype="float16", progress=False)


def test_store_dtype_choices(model_tok):
    model, tok = model_tok
    auto = collect_activations(model, tok, PAIRS[:1], progress=False)
    assert auto.acts.dtype == torch.float16 and auto.dtype_choice == "auto: float16"
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), (torch.float16, torch.float16)):
        acts = collect_activations(model, tok, PAIRS[:1], dtype=name, progress=False)
        assert acts.acts.dtype == dtype and acts.dtype_choice.endswith("(requested)")
        torch.testing.assert_close(acts.acts.float(), auto.acts.float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(HpreditError, match="unknown store dtype 'float8'"):
        collect_activations(model, tok, PAIRS[:1], dtype="float8", progress=False)
    with pytest.raises(HpreditError, match="not supported"):
        collect_activations(model, tok, PAIRS[:1], dtype=torch.int8, progress=False)
    with pytest.raises(HpreditError, match="batch size must be a positive integer"):
        collect_activations(model, tok, PAIRS[:1], batch_size=0, progress=False)
    with pytest.raises(HpreditError, match="layers must be integers"):
        collect_activations(model, tok, PAIRS[:1], layers=[0.5], progress=False)


def test_both_sites_in_one_pass_without_prefix_cache(model_tok):
    model, tok = model_tok
    both = collect_activations(model, tok, PAIRS, site=["residual", "heads"], prefix_cache=False, progress=False)
    alone = collect_activations(model, tok, PAIRS, site="heads", progress=False)
    assert set(both) == {"residual", "heads"}
    torch.testing.assert_close(both["heads"].acts.float(), alone.acts.float(), rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------- hand-edited stores (issue 14)


@pytest.fixture()
def saved_store(model_tok, tmp_path):
    model, tok = model_tok
    collect_activations(model, tok, PAIRS, progress=False).save(tmp_path / "store")
    return tmp_path / "store"


def _edit_meta(store, change):
    meta = json.loads((store / "meta.json").read_text())
    change(meta)
    (store / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda m: m.pop("model"), "meta.json has no 'model' entry"),
        (lambda m: m.pop("splits"), "meta.json has no 'splits' entry"),
        (lambda m: m.__setitem__("model", "llama"), "'model': model fingerprint must be an object"),
        (lambda m: m["model"].__setitem__("hidden_size", "64"), "'hidden_size' must be an integer"),
        (lambda m: m.__setitem__("splits", m["splits"][:2]), "4 pairs but 2 splits"),
        (lambda m: m.__setitem__("splits", "train"), "'splits' must be a list"),
        (lambda m: m.__setitem__("layers", [0, 0, 1]), r"'layers' lists layer\(s\) \[0\] more than once"),
        (lambda m: m.__setitem__("layers", [0, 1, 7]), r"'layers' \[7\] out of range: the model has 3 layers"),
        (lambda m: m.__setitem__("layers", [0.0, 1, 2]), r"'layers' must be integers, got \[0.0, 1, 2\]"),
        (lambda m: m.__setitem__("layers", None), "'layers' must be a list of layer indices"),
        (lambda m: m.__setitem__("texts", m["texts"][:-1]), "offsets do not match the 5 texts"),
        (lambda m: m.__setitem__("texts", [1, 2]), "'texts' must be a list of"),
        (lambda m: m.__setitem__("shards", ["../../etc/passwd"]), "shard '../../etc/passwd' is not a file inside"),
        (lambda m: m.__setitem__("shards", ["/etc/passwd"]), "is not a file inside the store"),
        (lambda m: m.__setitem__("blake2b", {}), "must give a checksum for every file"),
        (lambda m: m.__setitem__("site", "mlp"), "'site' must be one of"),
    ],
)
def test_hand_edited_meta_is_refused(saved_store, change, message):
    _edit_meta(saved_store, change)
    with pytest.raises(HpreditError, match=message):
        ActivationStore.load(saved_store)


def test_store_files_are_checksummed(saved_store):
    shard = next(saved_store.glob("acts-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-64:] = b"\xff" * 64  # same length, values overwritten
    shard.write_bytes(bytes(data))
    with pytest.raises(HpreditError, match="does not match its checksum in meta.json"):
        ActivationStore.load(saved_store)


def test_store_without_checksums_still_loads(saved_store):
    """Stores written before checksums existed have no 'sha256' entry."""
    _edit_meta(saved_store, lambda m: (m.pop("blake2b"), m.pop("dtype_choice")))
    store = ActivationStore.load(saved_store)
    assert store.layers == [0, 1, 2] and store.dtype_choice == ""


def test_store_dtype_and_width_must_match_meta(saved_store):
    _edit_meta(saved_store, lambda m: m.__setitem__("dtype", "float32"))
    with pytest.raises(HpreditError, match="the activations are float16, meta.json says float32"):
        ActivationStore.load(saved_store)
    _edit_meta(saved_store, lambda m: (m.__setitem__("dtype", "float16"), m["model"].__setitem__("hidden_size", 32)))
    with pytest.raises(HpreditError, match="activations of width 64 for a model of hidden size 32"):
        ActivationStore.load(saved_store)
