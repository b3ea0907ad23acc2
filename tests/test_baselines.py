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
    torch.testing.assert_close(out / out.norm(dim=-1, keepdim=True),
                               (x + 2.0 * v) / (x + 2.0 * v).norm(dim=-1, keepdim=True))
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
