"""The pure math against independent float64 references."""

import math

import pytest
import torch

from hpredit.geometry import angle_between, householder_reflect, pseudo_rotate, reflection_angle, rotation_direction


def _ref_reflect(x, w):
    """Reflection as the explicit d×d matrix I − 2ŵŵᵀ (float64)."""
    w = w / w.norm()
    H = torch.eye(len(w), dtype=torch.float64) - 2 * torch.outer(w, w)
    return x @ H.T


def _ref_rotate(x, w, gamma):
    """Rotation by γ in span{x, ŵ} toward Hx via an explicit orthonormal basis (float64, one vector)."""
    hx = _ref_reflect(x, w)
    b1 = x / x.norm()
    v = hx - (hx @ b1) * b1  # component of Hx orthogonal to x
    b2 = v / v.norm()
    return x.norm() * (math.cos(gamma) * b1 + math.sin(gamma) * b2)


def _ref_slerp(x, w, gamma):
    """The reference implementation's spherical interpolation from x to Hx (float64)."""
    hx = _ref_reflect(x, w)
    phi = torch.arccos(torch.clamp((x @ hx) / (x.norm() * hx.norm()), -1, 1))
    return torch.sin(gamma) / torch.sin(phi) * hx + torch.sin(phi - gamma) / torch.sin(phi) * x


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def test_reflect_matches_matrix(rng):
    x = torch.randn(7, 33, dtype=torch.float64, generator=rng)
    w = torch.randn(33, dtype=torch.float64, generator=rng)
    torch.testing.assert_close(householder_reflect(x, w), _ref_reflect(x, w))
    torch.testing.assert_close(householder_reflect(x, w).norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotation_matches_basis_reference(rng, dtype):
    d = 48
    for _ in range(20):
        x = torch.randn(d, dtype=torch.float64, generator=rng) * 10
        w = torch.randn(d, dtype=torch.float64, generator=rng)
        gamma = float(torch.rand(1, generator=rng)) * math.pi
        ref = _ref_rotate(x, w, gamma)
        got = pseudo_rotate(x.to(dtype), w.to(dtype), gamma).double()
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * x.norm().item())


def test_rotation_matches_slerp_where_slerp_is_well_conditioned(rng):
    x = torch.randn(64, dtype=torch.float64, generator=rng)
    w = torch.randn(64, dtype=torch.float64, generator=rng)
    for gamma in (0.1, 0.7, 1.5, 2.5):
        expected = _ref_slerp(x, w, torch.tensor(gamma, dtype=torch.float64))
        torch.testing.assert_close(pseudo_rotate(x, w, gamma), expected)


def test_full_angle_lands_on_reflection(rng):
    x = torch.randn(5, 32, dtype=torch.float64, generator=rng)
    w = torch.randn(32, dtype=torch.float64, generator=rng)
    phi = reflection_angle(x, w)
    torch.testing.assert_close(phi, angle_between(x, _ref_reflect(x, w)))
    torch.testing.assert_close(pseudo_rotate(x, w, phi), _ref_reflect(x, w))


def test_batched_shapes_and_per_token_angles(rng):
    x = torch.randn(2, 3, 16, generator=rng)
    w = torch.randn(16, generator=rng)
    gamma = torch.rand(2, 3, generator=rng)
    out = pseudo_rotate(x, w, gamma)
    assert out.shape == x.shape
    for i in range(2):
        for j in range(3):
            expected = _ref_rotate(x[i, j].double(), w.double(), gamma[i, j].item())
            torch.testing.assert_close(out[i, j].double(), expected, rtol=1e-4, atol=1e-4)
    # rotated by exactly γ, norm kept
    torch.testing.assert_close(angle_between(x, out), gamma, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_norm_kept_and_no_nan_near_the_hyperplane(rng, dtype):
    d = 256
    w = torch.randn(d, generator=rng)
    w_hat = w / w.norm()
    x = torch.randn(1000, d, generator=rng) * 30
    x = x - (x @ w_hat)[:, None] * w_hat  # on the hyperplane ...
    x = x + 1e-4 * torch.randn(1000, 1, generator=rng) * w_hat  # ... give or take a hair
    xd = x.to(dtype)
    out = pseudo_rotate(xd, w, torch.full((1000,), 1.0))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    # the math is float32: before casting back, norms agree to float32 rounding
    out32 = pseudo_rotate(xd.float(), w, torch.full((1000,), 1.0))
    torch.testing.assert_close(out32.norm(dim=-1), xd.float().norm(dim=-1), rtol=1e-5, atol=0)
    # after casting, to the dtype's rounding
    eps = torch.finfo(dtype).eps
    rel = (out.float().norm(dim=-1) / xd.float().norm(dim=-1) - 1).abs().max()
    assert rel < 4 * eps


def test_slerp_form_is_unstable_where_ours_is_not():
    """Documents why the stable form exists: SLERP divides by sin φ ≈ 0."""
    w = torch.zeros(8)
    w[0] = 1
    x = torch.ones(8, dtype=torch.float16)
    x[0] = 0  # exactly on the hyperplane: φ = 0
    ours = pseudo_rotate(x, w, 0.5)
    assert torch.isfinite(ours).all()
    hx = householder_reflect(x, w)
    phi = angle_between(x.float(), hx.float())
    slerp = torch.sin(torch.tensor(0.5)) / torch.sin(phi) * hx.float()
    assert not torch.isfinite(slerp).all()


def test_degenerate_cases_are_defined():
    w = torch.tensor([0.0, 3.0, 0.0, 0.0])
    zero = torch.zeros(4)
    assert torch.equal(pseudo_rotate(zero, w, 1.0), zero)
    # x parallel to w: Hx = -x; a full rotation by π lands there, deterministically
    for x in (torch.tensor([0.0, 2.0, 0.0, 0.0]), torch.tensor([0.0, -2.0, 0.0, 0.0])):
        e = rotation_direction(x, w)
        assert torch.isfinite(e).all() and abs(float(e @ x)) < 1e-6 and abs(float(e.norm()) - 1) < 1e-6
        torch.testing.assert_close(pseudo_rotate(x, w, math.pi), -x, atol=1e-5, rtol=0)
        torch.testing.assert_close(pseudo_rotate(x, w, 0.3).norm(), x.norm())
        torch.testing.assert_close(pseudo_rotate(x, w, 0.3), pseudo_rotate(x.clone(), w, 0.3))
    # on the hyperplane: moves toward the positive side
    x = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert float(pseudo_rotate(x, w, 0.5) @ w) > 0


def test_direction_points_toward_reflection(rng):
    x = torch.randn(50, 20, dtype=torch.float64, generator=rng)
    w = torch.randn(20, dtype=torch.float64, generator=rng)
    e = rotation_direction(x, w)
    hx = _ref_reflect(x, w)
    assert ((e * hx).sum(-1) > 0).all()
    torch.testing.assert_close((e * x).sum(-1), torch.zeros(50, dtype=torch.float64), atol=1e-10, rtol=0)


def test_angle_between_accurate_at_extremes():
    a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    tiny = 1e-9
    b = torch.tensor([1.0, tiny, 0.0], dtype=torch.float64)
    assert abs(float(angle_between(a, b)) - tiny) < 1e-15
    assert abs(float(angle_between(a, -b)) - (math.pi - tiny)) < 1e-12
    assert float(angle_between(a, torch.zeros(3, dtype=torch.float64))) == 0.0
    x = torch.randn(10, 5, dtype=torch.float64)
    y = torch.randn(10, 5, dtype=torch.float64)
    ref = torch.arccos((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)))
    torch.testing.assert_close(angle_between(x, y), ref)
