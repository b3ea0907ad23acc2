"""HPR training, the edit itself, and the artifact (save/load, validation, atomicity)."""

import dataclasses
import json
import math
import shutil

import pytest
import torch

import hpredit
from hpredit.activations import ActivationStore
from hpredit.editors.hpr import HPRConfig, HPREditor, _mlp
from hpredit.errors import HpreditError
from hpredit.geometry import angle_between
from hpredit.models import ModelFingerprint

D = 16


def synthetic_store(n_groups=40, tokens=3, layers=(0, 1, 2), informative=(1,), seed=0) -> ActivationStore:
    """Pairs whose positive/negative tokens differ along a fixed direction only at ``informative`` layers."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(D, generator=g)
    direction /= direction.norm()
    n_texts = 2 * n_groups
    acts = torch.randn(len(layers), n_texts * tokens, D, generator=g) * 2
    for r, layer in enumerate(layers):
        if layer in informative:
            for t in range(n_texts):
                sign = 1.0 if t % 2 == 0 else -1.0
                rows = slice(t * tokens, (t + 1) * tokens)
                acts[r, rows] -= (acts[r, rows] @ direction)[:, None] * direction
                acts[r, rows] += sign * 3.0 * direction
    offsets = torch.arange(0, n_texts * tokens + 1, tokens)
    pairs = torch.tensor([[2 * i, 2 * i + 1] for i in range(n_groups)])
    return ActivationStore(
        acts=acts.half(),
        layers=list(layers),
        offsets=offsets,
        pairs=pairs,
        groups=torch.arange(n_groups),
        splits=[None] * n_groups,
        texts=[("p", f" t{t}") for t in range(n_texts)],
        fingerprint=ModelFingerprint("ToyForCausalLM", D, 4, "toy"),
    )


@pytest.fixture(scope="module")
def fitted():
    return HPREditor.fit(
        synthetic_store(), progress=False, epochs=10, top_k=1, batch_size=8, lr=1e-2, angle_layers="all"
    )


def test_fit_learns_the_informative_layer(fitted):
    acc = fitted.probe_accuracy
    assert acc[1] > 0.95
    assert fitted.layers == [1]
    assert fitted.fitted_layers == [0, 1, 2]
    m = fitted.metrics
    assert m["val_groups"] == 8 and m["train_groups"] == 32  # 20% of groups held out
    assert len(m["history"]) == 10


def _joint_reference(store, config):
    """The spec written plainly: one optimizer, one loss = mean over layers of BCE + MSE, per-layer
    best-epoch checkpoints; same initialisation and batches as HPREditor.fit."""
    from hpredit.editors.base import train_val_masks
    from hpredit.editors.hpr import _pair_angles, _probe_accuracy

    train, val = train_val_masks(store, config.val_fraction, config.seed)
    tp, tn = store.token_pairs(train)
    vp, vn = store.token_pairs(val)
    gen = torch.Generator().manual_seed(config.seed)
    L = len(store.layers)
    widths = config.mlp_widths(D)
    probe = (torch.rand(L, D, generator=gen) * 2 - 1) / math.sqrt(D)
    ws, bs = [], []
    for j in range(len(widths) - 1):
        ws.append((torch.rand(L, widths[j + 1], widths[j], generator=gen) * 2 - 1) / math.sqrt(widths[j]))
        bs.append((torch.rand(L, widths[j + 1], generator=gen) * 2 - 1) / math.sqrt(widths[j]))
    orders = [torch.randperm(len(tp), generator=gen) for _ in range(config.epochs)]
    params = [probe, *ws, *bs]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = math.ceil(len(tp) / config.batch_size) * config.epochs
    warm = int(config.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )
    X = store.acts
    target = torch.stack([_pair_angles(X[r], tp, tn) for r in range(L)])
    best_acc, best = torch.full((L,), -1.0), [p.detach().clone() for p in params]
    for order in orders:
        for s in range(0, len(order), config.batch_size):
            idx = order[s : s + config.batch_size]
            z = torch.cat([X[:, tp[idx]], X[:, tn[idx]]], 1).float()
            y = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))]).expand(L, -1)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(
                torch.einsum("lnd,ld->ln", z, probe), y, reduction="none"
            ).mean(1)
            theta = math.pi * torch.sigmoid(_mlp(z, ws, bs))
            mse = ((theta - torch.cat([torch.zeros(L, len(idx)), target[:, idx]], 1)) ** 2).mean(1)
            loss = (bce + mse).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = _probe_accuracy(X, probe.detach(), vp, vn)
        better = acc > best_acc
        for b, p in zip(best, params):
            b[better] = p.detach()[better]
        best_acc = torch.where(better, acc, best_acc)
    return best, best_acc


def test_two_phase_training_equals_joint_training():
    store = synthetic_store(n_groups=12)
    config = HPRConfig(epochs=3, batch_size=4, lr=5e-3, angle_depth=3, angle_layers="all")
    ed = HPREditor.fit(store, config, progress=False)
    best, best_acc = _joint_reference(store, config)
    assert [ed.probe_accuracy[i] for i in store.layers] == pytest.approx(best_acc.tolist())
    torch.testing.assert_close(ed.probe, best[0], rtol=1e-5, atol=1e-6)
    for got, ref in zip(ed.weights + ed.biases, best[1:]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # with the default, only the selected layers get angle predictors, identical to the joint ones
    top = HPREditor.fit(store, dataclasses.replace(config, angle_layers="selected", top_k=2), progress=False)
    rows = [store.layers.index(i) for i in top.fitted_layers]
    assert top.fitted_layers == top.layers and len(top.layers) == 2
    torch.testing.assert_close(top.weights[0], best[1][rows], rtol=1e-5, atol=1e-6)


def test_fit_is_deterministic():
    store = synthetic_store()
    a = HPREditor.fit(store, progress=False, epochs=1, batch_size=8)
    b = HPREditor.fit(store, progress=False, epochs=1, batch_size=8)
    for k, v in a.tensors().items():
        assert torch.equal(v, b.tensors()[k]), k
    c = HPREditor.fit(store, progress=False, epochs=1, batch_size=8, seed=7)
    assert not torch.equal(a.probe, c.probe)


def test_val_split_pairs_are_used_for_validation():
    store = synthetic_store(n_groups=10)
    store.splits = ["train"] * 7 + ["val"] * 3
    ed = HPREditor.fit(store, progress=False, epochs=1)
    assert ed.metrics["validation"] == "val split" and ed.metrics["val_groups"] == 3


def test_explicit_layers_and_bad_config():
    store = synthetic_store()
    ed = HPREditor.fit(store, progress=False, epochs=1, layers=[0, 2])
    assert ed.layers == [0, 2]
    with pytest.raises(HpreditError, match=r"layers \[7\] were not collected"):
        HPREditor.fit(store, progress=False, layers=[7])
    with pytest.raises(HpreditError, match="epochs must be"):
        HPREditor.fit(store, progress=False, epochs=0)
    with pytest.raises(HpreditError, match="lr must be"):
        HPREditor.fit(store, progress=False, lr=-1.0)


def test_angle_targets_and_loss_match_the_spec():
    """One hand-checked step: loss = mean over layers of BCE(probe) + MSE(angle)."""
    store = synthetic_store(n_groups=2, tokens=1, layers=(0,))
    p, n = store.acts[0, 0].float(), store.acts[0, 1].float()
    target = angle_between(n, p)
    cos = torch.dot(n, p) / (n.norm() * p.norm())
    assert abs(float(target) - math.acos(float(cos))) < 1e-4
    widths = HPRConfig(angle_depth=4).mlp_widths(D)
    assert widths == [16, 8, 4, 2, 1]
    assert HPRConfig(angle_depth=2).mlp_widths(576) == [576, 288, 1]


def test_batched_mlp_equals_per_layer_mlp():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g)
    ws = [torch.randn(3, 4, 8, generator=g), torch.randn(3, 1, 4, generator=g)]
    bs = [torch.randn(3, 4, generator=g), torch.randn(3, 1, generator=g)]
    out = _mlp(x, ws, bs)
    for r in range(3):
        h = torch.nn.functional.gelu(x[r] @ ws[0][r].T + bs[0][r])
        torch.testing.assert_close(out[r], (h @ ws[1][r].T + bs[1][r]).squeeze(-1))


def test_edit_gates_rotates_and_keeps_norms(fitted):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, D, generator=g) * 5
    w = fitted.probe[fitted.fitted_layers.index(1)]
    out = fitted.edit(1, x, strength=1.0)
    negative = (x @ w) < 0
    assert negative.any() and (~negative).any()
    assert torch.equal(out[~negative], x[~negative])  # positive side: untouched, bit for bit
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    theta = fitted.angle(1, x)
    torch.testing.assert_close(angle_between(x, out)[negative], theta[negative], rtol=1e-4, atol=1e-4)
    half = fitted.edit(1, x, strength=0.5)
    torch.testing.assert_close(angle_between(x, half)[negative], 0.5 * theta[negative], rtol=1e-4, atol=1e-4)
    assert torch.equal(fitted.edit(1, x, strength=0.0), x)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[:, -1] = True
    masked = fitted.edit(1, x, mask=mask)
    assert torch.equal(masked[:, :-1], x[:, :-1]) and torch.equal(masked[:, -1], out[:, -1])


def test_select_layers(fitted):
    sub = fitted.select_layers([0, 2])
    assert sub.layers == [0, 2] and fitted.layers == [1]
    with pytest.raises(HpreditError, match="cannot select layers"):
        fitted.select_layers([9])


# ---------------------------------------------------------------------------------- artifact


def test_save_load_roundtrip(fitted, tmp_path):
    fitted.save_pretrained(tmp_path / "ed")
    cfg = json.loads((tmp_path / "ed" / "config.json").read_text())
    assert cfg["method"] == "hpr" and cfg["format_version"] == 2 and cfg["layers"] == [1]
    assert cfg["model"] == {"architecture": "ToyForCausalLM", "hidden_size": D, "num_layers": 4, "name": "toy"}
    assert cfg["config"]["lr"] == 1e-2 and cfg["fitted_layers"] == [0, 1, 2]
    back = HPREditor.from_pretrained(tmp_path / "ed")
    assert isinstance(back, HPREditor) and back.layers == fitted.layers
    for k, v in fitted.tensors().items():
        assert torch.equal(back.tensors()[k], v)
    assert back.probe_accuracy == pytest.approx(fitted.probe_accuracy)
    assert isinstance(hpredit.load_editor(tmp_path / "ed"), HPREditor)
    assert sorted(p.name for p in (tmp_path / "ed").iterdir()) == ["README.md", "config.json", "editor.safetensors"]


def _edit_config(path, fn):
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: shutil.rmtree(d), "does not exist"),
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "editor.safetensors").unlink(), "editor.safetensors is missing"),
        (lambda d: (d / "config.json").write_text("{broken"), "not valid JSON"),
        (
            lambda d: (d / "editor.safetensors").write_bytes((d / "editor.safetensors").read_bytes()[:-50]),
            "does not match the checksum",
        ),
        (lambda d: _edit_config(d / "config.json", lambda c: c.update(layers=[99])), r"layers \[99\] are invalid"),
        (lambda d: _edit_config(d / "config.json", lambda c: c["model"].update(hidden_size=32)), "has shape"),
        (
            lambda d: _edit_config(d / "config.json", lambda c: c.update(method="magic")),
            "unknown editor method 'magic'",
        ),
        (lambda d: _edit_config(d / "config.json", lambda c: c.update(format_version=9)), "format version 9"),
        (lambda d: _edit_config(d / "config.json", lambda c: c["config"].update(bogus=1)), "unknown config field"),
        (
            lambda d: _edit_config(d / "config.json", lambda c: c["config"].update(angle_depth=2)),
            "do not match the config",
        ),
        (lambda d: _edit_config(d / "config.json", lambda c: c["config"].update(epochs=-1)), "epochs must be"),
        (lambda d: _edit_config(d / "config.json", lambda c: c.pop("model")), "bad or missing 'model'"),
        (lambda d: _edit_config(d / "config.json", lambda c: c.update(fitted_layers="all")), "fitted_layers"),
    ],
)
def test_damaged_artifacts_fail_clearly(fitted, tmp_path, damage, message):
    d = tmp_path / "ed"
    fitted.save_pretrained(d)
    damage(d)
    with pytest.raises(HpreditError, match=message):
        HPREditor.from_pretrained(d)


def test_crash_mid_save_leaves_old_artifact(fitted, tmp_path, monkeypatch):
    import hpredit.editors.base as base

    d = tmp_path / "ed"
    fitted.save_pretrained(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(base, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        fitted.select_layers([0]).save_pretrained(d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ed"]  # no temporary directory left behind
    with pytest.raises(OSError):
        fitted.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_whole_artifact(fitted, tmp_path):
    d = tmp_path / "ed"
    fitted.save_pretrained(d)
    (d / "stray.txt").write_text("x")
    fitted.select_layers([0, 2]).save_pretrained(d)
    assert hpredit.load_editor(d).layers == [0, 2] and not (d / "stray.txt").exists()


# --------------------------------------------------------------------------- nonsense refused (issue 14)


@pytest.mark.parametrize(
    "layers,message",
    [
        ([1, 1], r"layers lists layer\(s\) \[1\] more than once"),
        ([], "layers is empty: give at least one layer"),
        ([0.7, 1.2], "layers must be integers"),
        (["0", "1"], "layers must be integers"),
        ([True], "layers must be integers"),
        ([-1], r"layers \[-1\] out of range: layers are numbered from 0"),
    ],
)
def test_bad_layer_lists_are_refused_at_fit_time(layers, message):
    from hpredit.editors import CAAEditor

    store = synthetic_store(n_groups=6)
    with pytest.raises(HpreditError, match=message):
        HPREditor.fit(store, progress=False, layers=layers)
    with pytest.raises(HpreditError, match=message):
        CAAEditor.fit(store, progress=False, layers=layers)


def test_top_k_beyond_the_collected_layers_is_refused():
    from hpredit.editors import CAAEditor

    store = synthetic_store(n_groups=6)
    for cls, kw in ((HPREditor, {"epochs": 1}), (CAAEditor, {})):
        with pytest.raises(HpreditError, match=r"top_k 100 is more than the 3 collected layers: choose top_k betwe"):
            cls.fit(store, progress=False, top_k=100, **kw)
        assert len(cls.fit(store, progress=False, **kw).layers) == 3  # the default (5) takes all 3
        assert len(cls.fit(store, progress=False, top_k=3, **kw).layers) == 3


def test_configs_validate_on_construction_in_one_style():
    from hpredit.editors import AdditiveConfig, ITIConfig

    for make, message in [
        (lambda: HPRConfig(epochs=0), "HPRConfig: epochs must be an integer ≥ 1"),
        (lambda: HPRConfig(epochs=2.0), "HPRConfig: epochs must be an integer"),
        (lambda: HPRConfig(layers=[3, 3]), r"HPRConfig: layers lists layer\(s\) \[3\] more than once"),
        (lambda: AdditiveConfig(top_k=0), "AdditiveConfig: top_k must be an integer ≥ 1"),
        (lambda: AdditiveConfig(val_fraction=1.5), r"AdditiveConfig: val_fraction must be in \(0"),
        (lambda: ITIConfig(num_heads=0), "ITIConfig: num_heads must be null or an integer ≥ 1"),
        (lambda: ITIConfig(probe_lr=True), "ITIConfig: probe_lr must be > 0"),
    ]:
        with pytest.raises(HpreditError, match=message):
            make()
    config = HPRConfig(epochs=3)
    with pytest.raises(HpreditError, match="HPRConfig: lr must be > 0"):
        dataclasses.replace(config, lr=0)
    with pytest.raises(HpreditError, match=r"HPRConfig: unknown option\(s\) \['epoch'\]"):
        HPREditor.fit(synthetic_store(n_groups=4), progress=False, epoch=1)


def _saved(fitted, tmp_path, change):
    d = tmp_path / "ed"
    fitted.save_pretrained(d)
    _edit_config(d / "config.json", change)
    return d


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.update(layers=[]), "'layers' must be a non-empty list of integers"),
        (lambda c: c.update(layers=[1.0]), "'layers' must be a non-empty list of integers"),
        (lambda c: c.update(layers=["1"]), "'layers' must be a non-empty list of integers"),
        (lambda c: c.update(layers=[1, 1]), r"layers \[1, 1\] are invalid .*each layer once"),
        (lambda c: c["config"].update(layers=[15.7, 16.2]), "layers must be integers"),
        (lambda c: c["config"].update(top_k="5"), "top_k must be an integer"),
        (lambda c: c.update(fitted_layers=[0, 1, 1, 2]), "fitted_layers"),
        (lambda c: c.update(metrics=[0.5]), "'metrics' must be an object"),
        (
            lambda c: c["metrics"].update(val_probe_accuracy=[0.5, 0.9]),
            "'val_probe_accuracy' must map layers to numbers",
        ),
        (lambda c: c["metrics"].update(val_probe_accuracy={"1": "high"}), "must map layers to numbers"),
        (lambda c: c["metrics"].update(val_probe_accuracy={"layer one": 0.9}), "keyed by layer numbers"),
    ],
)
def test_nonsense_artifacts_are_refused_at_load(fitted, tmp_path, change, message):
    with pytest.raises(HpreditError, match=message):
        HPREditor.from_pretrained(_saved(fitted, tmp_path, change))


def test_loaded_metrics_always_give_probe_accuracy(fitted, tmp_path):
    back = HPREditor.from_pretrained(_saved(fitted, tmp_path, lambda c: c.update(metrics={})))
    assert back.probe_accuracy == {}
    back = HPREditor.from_pretrained(_saved(fitted, tmp_path, lambda c: None))
    assert back.probe_accuracy == pytest.approx(fitted.probe_accuracy)


def test_fit_on_a_device_gives_the_same_editor_as_the_default(tmp_path):
    """fit(device=...) trains on that device from the same initial values and batches; on this
    CPU-only machine the check is the plumbing (device "cpu" equals the default to the bit) and the
    refusal of a missing GPU; the same test on a GPU machine compares CUDA against the CPU."""
    store = synthetic_store()
    base = HPREditor.fit(store, epochs=2, angle_depth=2, top_k=2, progress=False)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        other = HPREditor.fit(store, epochs=2, angle_depth=2, top_k=2, progress=False, device=device)
        assert other.layers == base.layers and other.probe.device.type == "cpu"
        for name, t in base.tensors().items():
            tol = 0 if device == "cpu" else 1e-4
            torch.testing.assert_close(other.tensors()[name], t, rtol=tol, atol=tol)
    if not torch.cuda.is_available():
        with pytest.raises(HpreditError, match="cuda"):
            HPREditor.fit(store, epochs=1, progress=False, device="cuda")
