"""The additive baselines and HPR's ablations: their math on hand-made activations, and artifacts."""

import math

import pytest
import torch

import hpredit
from hpredit.editors import CAAEditor, HPREditor, NormRestoreEditor
from hpredit.errors import HpreditError
from hpredit.geometry import angle_between

from .test_hpr import D, synthetic_store


def _means(store, layer_row, split_mask):
    tp, tn = store.token_pairs(split_mask)
    return store.acts[layer_row, tp].float().mean(0), store.acts[layer_row, tn].float().mean(0)


def test_caa_vector_is_the_mean_difference():
    store = synthetic_store()
    ed = CAAEditor.fit(store, progress=False, top_k=1)
    from hpredit.editors.base import train_val_masks

    train, _ = train_val_masks(store, 0.2, 42)
    for r, layer in enumerate(store.layers):
        pos, neg = _means(store, r, train)
        torch.testing.assert_close(ed.vector(layer), pos - neg)
    assert ed.layers == [1]  # the only informative layer
    assert ed.metrics["val_pair_accuracy"]["1"] > 0.95


def test_caa_adds_and_norm_restore_keeps_norms():
    store = synthetic_store()
    caa = CAAEditor.fit(store, progress=False)
    nr = NormRestoreEditor.fit(store, progress=False)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0)) * 4
    v = caa.vector(1)
    torch.testing.assert_close(caa.edit(1, x, strength=2.0), x + 2.0 * v)
    out = nr.edit(1, x, strength=2.0)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(
        out / out.norm(dim=-1, keepdim=True), (x + 2.0 * v) / (x + 2.0 * v).norm(dim=-1, keepdim=True)
    )
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 2] = True
    masked = caa.edit(1, x, mask=mask)
    assert torch.equal(masked[~mask], x[~mask])
    assert torch.equal(caa.edit(1, x, strength=0.0), x)


@pytest.mark.parametrize("cls", [CAAEditor, NormRestoreEditor])
def test_additive_artifact_roundtrip_and_validation(cls, tmp_path):
    ed = cls.fit(synthetic_store(), progress=False, layers=[0, 2])
    ed.save_pretrained(tmp_path / "ed")
    back = hpredit.load_editor(tmp_path / "ed")
    assert type(back) is cls and back.layers == [0, 2] and torch.equal(back.vectors, ed.vectors)
    with pytest.raises(HpreditError, match="holds a"):
        HPREditor.from_pretrained(tmp_path / "ed")
    with pytest.raises(HpreditError, match=r"layers \[9\] were not collected"):
        cls.fit(synthetic_store(), progress=False, layers=[9])
    with pytest.raises(HpreditError, match="top_k must be"):
        cls.fit(synthetic_store(), progress=False, top_k=0)


def _fit(**kw):
    return HPREditor.fit(synthetic_store(), progress=False, epochs=10, batch_size=8, lr=1e-2, top_k=1, **kw)


def test_ablation_no_gate_rotates_every_token():
    ed = _fit(gate=False)
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(1)) * 3
    out = ed.edit(1, x)
    assert (out != x).any(-1).all()
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


def test_ablation_fixed_angle_rotates_by_that_angle(tmp_path):
    ed = _fit(fixed_angle=0.3)
    assert ed.weights == [] and ed.biases == []
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(2)) * 3
    out = ed.edit(1, x)
    neg = (x @ ed.probe[ed.fitted_layers.index(1)]) < 0
    torch.testing.assert_close(angle_between(x, out)[neg], torch.full((int(neg.sum()),), 0.3), rtol=1e-4, atol=1e-4)
    assert torch.equal(out[~neg], x[~neg])
    ed.save_pretrained(tmp_path / "ed")
    back = hpredit.load_editor(tmp_path / "ed")
    assert back.config.fixed_angle == 0.3 and torch.equal(back.edit(1, x), out)


def test_ablation_probe_bias_gates_on_the_affine_plane(tmp_path):
    ed = _fit(probe_bias=True)
    assert ed.probe_bias is not None and ed.probe_bias.shape == (1,)
    r = ed.fitted_layers.index(1)
    w, b = ed.probe[r], float(ed.probe_bias[r])
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(3)) * 3
    out = ed.edit(1, x)
    neg = (x @ w + b) < 0
    assert torch.equal(out[~neg], x[~neg]) and (out[neg] != x[neg]).any(-1).all()
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # the rotation still keeps norms
    # full rotation toward the affine mirror image points along it
    target = x - (2 * (x @ w + b) / (w @ w)).unsqueeze(-1) * w
    phi = angle_between(x, target)
    full = hpredit.geometry.rotate_toward(x, target, phi)
    cos = torch.nn.functional.cosine_similarity(full, target, dim=-1)
    assert (cos > 1 - 1e-5).all()
    ed.save_pretrained(tmp_path / "ed")
    back = hpredit.load_editor(tmp_path / "ed")
    assert torch.equal(back.probe_bias, ed.probe_bias) and torch.equal(back.edit(1, x), out)


def test_ablation_config_validation():
    with pytest.raises(HpreditError, match="fixed_angle must be"):
        _fit(fixed_angle=4.0)
    assert math.pi > 3.14  # the bound used above


# ------------------------------------------------------------------------------------------ ITI

ITI_PAIRS = [
    hpredit.ContrastivePair("Q: Is fire hot?\nA:", " Yes.", " No, it is cold.", group=g, split=s)
    for g, s in ((0, "train"), (1, "train"), (2, "val"))
] + [
    hpredit.ContrastivePair(
        f"Q: Is {x} wet?\nA:", " Yes, it is.", " Never.", group=3 + i, split=("train", "val")[i % 2]
    )
    for i, x in enumerate(["rain", "the sea", "a lake", "dew"])
]


@pytest.fixture(scope="module")
def iti_setup(tokenizer):
    from hpredit.models import num_attention_heads

    from .conftest import tiny_model

    model = tiny_model("llama", vocab=len(tokenizer))
    stores = hpredit.collect_activations(model, tokenizer, ITI_PAIRS, site=("residual", "heads"), progress=False)
    H = num_attention_heads(model)
    return model, stores, H


def test_head_activations_are_the_output_projection_input(iti_setup, tokenizer):
    model, stores, H = iti_setup
    heads = stores["heads"]
    assert heads.site == "heads" and stores["residual"].site == "residual"
    assert heads.acts.shape[-1] == model.model.layers[0].self_attn.o_proj.in_features
    assert torch.equal(heads.offsets, stores["residual"].offsets)
    ids, start = hpredit.activations.tokenize_completion(tokenizer, *heads.texts[0])
    seen = {}
    h = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    model(input_ids=torch.tensor([ids]))
    h.remove()
    n = len(ids) - start
    torch.testing.assert_close(heads.acts[1, :n].float(), seen["x"][0, start:], rtol=2e-3, atol=2e-3)


def test_iti_fit_and_edits_only_selected_heads(iti_setup, tmp_path):
    from hpredit.editors import ITIEditor

    model, stores, H = iti_setup
    ed = ITIEditor.fit(stores["heads"], num_attention_heads=H, num_heads=2, probe_steps=50)
    assert len(ed.heads) == 2 and len(ed.metrics["val_probe_accuracy"]) == 3 * H
    torch.testing.assert_close(ed.directions.norm(dim=-1), torch.ones(2))
    hd = ed.head_dim
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    for layer in range(3):
        proj = model.model.layers[layer].self_attn.o_proj
        before = {}
        with ed.attach(model, strength=0.5, scope="all"):
            h1 = proj.register_forward_pre_hook(
                lambda m, a, seen=before: seen.setdefault("x", a[0].clone()), prepend=True
            )
            after = {}
            h2 = proj.register_forward_pre_hook(lambda m, a, seen=after: seen.setdefault("x", a[0].clone()))
            model(input_ids=ids)
        h1.remove()
        h2.remove()
        delta = (after["x"] - before["x"])[0]  # (seq, width)
        for head in range(H):
            sl = delta[:, head * hd : (head + 1) * hd]
            if (layer, head) in ed.heads:
                k = ed.heads.index((layer, head))
                expected = 0.5 * ed.config.alpha * ed.sigma[k] * ed.directions[k]
                torch.testing.assert_close(sl, expected.expand_as(sl), rtol=1e-4, atol=1e-4)
            else:
                assert torch.equal(sl, torch.zeros_like(sl))
    ed.save_pretrained(tmp_path / "iti")
    back = hpredit.load_editor(tmp_path / "iti")
    assert back.heads == ed.heads and torch.equal(back.directions, ed.directions)


def test_iti_bad_inputs(iti_setup):
    from hpredit.editors import ITIEditor

    _, stores, H = iti_setup
    with pytest.raises(HpreditError, match="site='heads'"):
        ITIEditor.fit(stores["residual"], num_attention_heads=H)
    with pytest.raises(HpreditError, match="needs num_attention_heads"):
        ITIEditor.fit(stores["heads"])
    with pytest.raises(HpreditError, match="not divisible"):
        ITIEditor.fit(stores["heads"], num_attention_heads=7)
    with pytest.raises(HpreditError, match="unknown activation site"):
        hpredit.collect_activations(None, None, ITI_PAIRS, site="mlp")


def test_iti_refuses_more_heads_than_collected_and_bad_metrics(iti_setup, tmp_path):
    import json

    from hpredit.editors import ITIEditor

    _, stores, H = iti_setup
    with pytest.raises(HpreditError, match=rf"num_heads 100 is more than the {3 * H} heads"):
        ITIEditor.fit(stores["heads"], num_attention_heads=H, num_heads=100, probe_steps=5)
    ed = ITIEditor.fit(stores["heads"], num_attention_heads=H, num_heads=2, probe_steps=5)
    ed.save_pretrained(tmp_path / "iti")
    cfg = json.loads((tmp_path / "iti" / "config.json").read_text())
    assert all("." in k for k in cfg["metrics"]["val_probe_accuracy"])  # keyed by layer.head, and loads
    assert hpredit.load_editor(tmp_path / "iti").heads == ed.heads
    cfg["metrics"]["val_probe_accuracy"] = {"0.1": None}
    (tmp_path / "iti" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HpreditError, match="'val_probe_accuracy' must map layers to numbers"):
        hpredit.load_editor(tmp_path / "iti")


def test_residual_editors_refuse_head_activations(iti_setup):
    from hpredit.editors import CAAEditor, HPREditor, NormRestoreEditor

    _, stores, _ = iti_setup
    for cls in (HPREditor, CAAEditor, NormRestoreEditor):
        with pytest.raises(HpreditError, match="fits on residual activations, got a 'heads' store"):
            cls.fit(stores["heads"], progress=False)
