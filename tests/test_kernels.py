"""The fused HPR edit (hpredit.kernels): Triton kernel (interpreted on CPU: conftest sets
TRITON_INTERPRET=1) and PyTorch fallback against float64 geometry, and the per-token strength
contract of every editor's LayerEdit."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from hpredit.errors import HpreditError
from hpredit.geometry import pseudo_rotate
from hpredit.kernels import hpr_edit, triton_available

from .conftest import random_editor, random_hpr, tiny_model

BACKENDS = ["torch", "triton"]


def _float64_edit(ed, layer, x, strength, mask=None):
    """HPR's edit of ``x`` (..., d) in float64 throughout: probe gate, angle MLP, pseudo-rotation."""
    r = ed._row(layer)
    x64 = x.double()
    w = ed.probe[r].double()
    if ed.config.fixed_angle is not None:
        theta = torch.full(x.shape[:-1], float(ed.config.fixed_angle), dtype=torch.float64)
    else:
        z = x64
        for j, (m, b) in enumerate(zip(ed.weights, ed.biases)):
            z = z @ m[r].double().t() + b[r].double()
            if j < len(ed.weights) - 1:
                z = F.gelu(z)
        theta = math.pi * torch.sigmoid(z.squeeze(-1))
    s = torch.as_tensor(strength, dtype=torch.float64).broadcast_to(x.shape[:-1])
    gate = (x64 @ w < 0) if ed.config.gate else torch.ones(x.shape[:-1], dtype=torch.bool)
    gate = gate & (s != 0)
    if mask is not None:
        gate = gate & mask
    out = pseudo_rotate(x64, w, s * theta)
    return torch.where(gate.unsqueeze(-1), out, x64), gate


def _with_backend(ed, backend):
    out = copy.copy(ed)
    out.kernel_backend = backend
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _inputs(d, dtype, seed=10, batch=3, seq=5):
    """Random activations of varied norms (seeds other than the editors', whose probes they would copy)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, d, generator=g) * (torch.rand(batch, seq, 1, generator=g) * 8 + 0.5)
    return x.to(dtype), g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["depth4", "depth1", "no-gate", "fixed-angle"])
def test_fused_edit_matches_float64(backend, dtype, variant):
    if backend == "triton" and not triton_available():
        pytest.skip("triton not installed")
    model = tiny_model("llama")
    d = model.config.hidden_size
    ed = random_hpr(model, depth=1 if variant == "depth1" else 4)
    if variant == "no-gate":
        ed.config = dataclasses.replace(ed.config, gate=False)
    if variant == "fixed-angle":
        ed.config = dataclasses.replace(ed.config, fixed_angle=0.8)
    ed = _with_backend(ed, backend)
    x, g = _inputs(d, dtype)
    strength = torch.rand(3, 5, generator=g) * 2
    strength[0, :2] = 0.0
    mask = torch.rand(3, 5, generator=g) > 0.25
    for s in (1.0, 0.5, strength):
        for m in (None, mask):
            got = ed.edit(1, x, s, mask=m)
            ref, gate = _float64_edit(ed, 1, x, s, m)
            assert got.dtype == dtype and got.shape == x.shape
            assert gate.any() and (not gate.all() or (m is None and not torch.is_tensor(s) and not ed.config.gate))
            # untouched tokens: bit for bit (strength 0, outside the gate or the mask)
            assert torch.equal(_bits(got[~gate]), _bits(x[~gate])), variant
            rel = (got.double() - ref).norm(dim=-1) / x.double().norm(dim=-1)
            smax = float(torch.as_tensor(s).max())
            if dtype == torch.float32:
                assert rel.max() < 2e-6 * max(1.0, smax), (variant, float(rel.max()))
            else:  # the output's rounding (and in float16 the MLP's): the sharp bound is
                # test_16bit_error_within_rounding_bound's, at a realistic width
                assert rel.max() <= 3 * torch.finfo(dtype).eps * max(1.0, smax), (variant, float(rel.max()))
            ratio = got.double().norm(dim=-1) / x.double().norm(dim=-1)
            assert (ratio - 1).abs().max() < (1e-6 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_equals_torch_fallback(dtype):
    """The kernel against its specification, the PyTorch step, to the dtype's last bit or two."""
    model = tiny_model("llama")
    ed = random_hpr(model, depth=4)
    x, g = _inputs(model.config.hidden_size, dtype, seed=5, batch=2, seq=7)
    mask = torch.rand(2, 7, generator=g) > 0.3
    s = torch.rand(2, 7, generator=g) * 1.5
    tri = _with_backend(ed, "triton").edit(2, x, s, mask=mask)
    ref = _with_backend(ed, "torch").edit(2, x, s, mask=mask)
    tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    rel = (tri.float() - ref.float()).norm(dim=-1) / x.float().norm(dim=-1)
    assert rel.max() <= tol, float(rel.max())
    assert torch.equal(tri == x, ref == x) or dtype != torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_tokens_parallel_and_zero(backend):
    if backend == "triton" and not triton_available():
        pytest.skip("triton not installed")
    model = tiny_model("llama")
    ed = _with_backend(random_hpr(model, depth=2), backend)
    w = ed.probe[0] / ed.probe[0].norm()
    x = torch.stack([-3.0 * w, torch.zeros_like(w)]).unsqueeze(0)
    ed.config = dataclasses.replace(ed.config, gate=False)
    out = ed.edit(0, x, 1.0)
    ref, _ = _float64_edit(ed, 0, x, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0].double(), ref[0, 0], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0, 1], x[0, 1])
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


# ---------------------------------------------------------------- the per-token strength contract

KINDS = ["hpr-fast-torch", "hpr-fast-triton", "hpr-reference", "caa", "caa-norm", "iti"]


def _layer_edit(kind, model, dtype):
    """(edit function, hidden width) of ``kind`` for layer 0 of ``model``."""
    if kind.startswith("hpr"):
        ed = random_hpr(model, depth=4)
        if kind == "hpr-fast-triton":
            if not triton_available():
                pytest.skip("triton not installed")
            ed.kernel_backend = "triton"
        return ed.layer_edit(0, torch.device("cpu"), dtype, fast=kind != "hpr-reference"), model.config.hidden_size
    ed = random_editor(kind, model)
    layer = ed.layers[0]
    width = model.config.hidden_size
    return ed.layer_edit(layer, torch.device("cpu"), dtype), width


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_strength(kind, dtype):
    """A strength tensor (batch, seq), (batch, 1) or (n,) for flattened tokens equals the number,
    token by token; strength 0 gives the token back bit for bit."""
    model = tiny_model("llama")
    fn, d = _layer_edit(kind, model, dtype)
    x, g = _inputs(d, dtype, seed=2, batch=2, seq=6)
    s = torch.tensor([[0.0, 0.5, 1.0, 2.0, 0.0, -1.0], [1.0, 0.0, 0.25, 3.0, 1.5, 0.0]])
    mask = torch.rand(2, 6, generator=g) > 0.2
    for m in (None, mask):
        got = fn(x, m, s)
        for v in s.unique().tolist():  # the same call with the number, on the same shape (same matmuls)
            rows = s == v
            assert torch.equal(_bits(got[rows]), _bits(fn(x, m, v)[rows])), (kind, v)
        zero = s == 0
        assert torch.equal(_bits(got[zero]), _bits(x[zero]))
        assert not torch.equal(got, x)
    # (batch, 1) broadcasts over the sequence; (n,) strengths for flattened (n, d) tokens
    torch.testing.assert_close(fn(x, None, s[:, :1]), fn(x, None, s[:, :1].expand(2, 6)), atol=0, rtol=0)
    flat = fn(x.reshape(12, d), None, s.reshape(12))
    assert torch.equal(_bits(flat), _bits(fn(x, None, s).reshape(12, d)))
    assert torch.equal(_bits(fn(x, None, torch.zeros(2, 6))), _bits(x))
    assert torch.equal(fn(x, None, 0.0), x)
    with pytest.raises(HpreditError, match="does not broadcast"):
        fn(x, None, torch.ones(5))


def test_backend_errors(monkeypatch):
    w = torch.nn.functional.normalize(torch.randn(8), dim=0)
    with pytest.raises(HpreditError, match="unknown kernel backend"):
        hpr_edit(w, w, [], [], fixed_angle=0.5, backend="cuda")
    import hpredit.kernels.hpr as kh

    monkeypatch.setattr(kh, "triton_available", lambda: False)
    with pytest.raises(HpreditError, match="needs Triton"):
        kh.hpr_edit(w, w, [], [], fixed_angle=0.5, backend="triton")
    # auto without Triton (or on CPU): the PyTorch step, no error
    fn = kh.hpr_edit(w, w, [], [], fixed_angle=0.5, backend="auto")
    x = torch.randn(4, 8)
    assert fn(x, None, 1.0).shape == x.shape


# ---------------------------------------------------------------- 16-bit error against float64


def _wide_hpr(d: int, depth: int = 4, seed: int = 0):
    """A random HPR editor of width ``d`` (weights N(0, 1/fan_in), biases N(0, 0.01))."""
    from hpredit.editors.hpr import HPRConfig, HPREditor
    from hpredit.models import ModelFingerprint

    g = torch.Generator().manual_seed(seed)
    config = HPRConfig(layers=[0], angle_depth=depth)
    widths = config.mlp_widths(d)
    weights = [torch.randn(1, widths[j + 1], widths[j], generator=g) / math.sqrt(widths[j]) for j in range(depth)]
    biases = [torch.randn(1, widths[j + 1], generator=g) * 0.1 for j in range(depth)]
    fp = ModelFingerprint("LlamaForCausalLM", d, 1, "random")
    return HPREditor(config, [0], fp, [0], torch.randn(1, d, generator=g), weights, biases, {})


def _logit_and_rounding_spread(ed, x64):
    """The angle MLP's logit (n,) in float64 and, per token, ``S = √Σ_q (∂l/∂q · q)²`` over every
    quantity q the fused path rounds to the MLP's dtype: its input, each hidden layer's weights,
    biases and output, and each GELU output fed to a hidden layer (the last layer is float32)."""
    depth = len(ed.weights)
    W = [w[0].double() for w in ed.weights]
    B = [b[0].double() for b in ed.biases]
    inputs, pre = [x64], []
    for j in range(depth):
        pre.append(inputs[-1] @ W[j].t() + B[j])
        if j < depth - 1:
            inputs.append(F.gelu(pre[-1]))
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    gelu_grad = lambda z: normal.cdf(z) + z * normal.log_prob(z).exp()  # noqa: E731
    spread = torch.zeros(x64.shape[0], dtype=torch.float64)
    g = torch.ones_like(pre[-1])  # ∂l/∂(last pre-activation)
    for j in reversed(range(depth)):
        a = inputs[j]
        grad_a = g @ W[j]  # ∂l/∂(layer j's input)
        if j < depth - 1:  # a hidden layer: weights, biases, output rounded
            spread += ((g**2) @ (W[j] ** 2) * a**2).sum(-1) + ((g * B[j]) ** 2).sum(-1) + ((g * pre[j]) ** 2).sum(-1)
        if j < depth - 1 or j == 0:  # its input rounded: x, or a GELU output feeding a hidden layer
            spread += ((grad_a * a) ** 2).sum(-1)
        if j:
            g = grad_a * gelu_grad(pre[j - 1])
    return pre[-1].squeeze(-1), spread.sqrt()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, precision, mlp_dtype",
    [
        (torch.bfloat16, "float16", torch.float16),
        (torch.bfloat16, "float32", torch.float32),
        (torch.bfloat16, "model", torch.bfloat16),
        (torch.float16, "model", torch.float16),
    ],
)
def test_16bit_error_within_rounding_bound(backend, dtype, precision, mlp_dtype):
    """The fused edit against float64 at a realistic width, under a bound derived from the unit
    roundoffs and sizes, not measured. Per token, ‖edit − exact‖/‖x‖ ≤
    u_out (the output's rounding to ``dtype``) + s·(π/4)·|Δl| (a logit error Δl moves the angle
    by at most π/4·|Δl|, the rotation by s times that) + (d + 16)·(1 + s)·u_f32 (float32 reductions
    and coefficients). Δl: with every rounding inside the MLP an independent relative error
    uniform on [−u_mlp, u_mlp] (the standard probabilistic model of rounding), Δl is a sum of many
    independent terms with σ = u_mlp·S/√3, S = √Σ_q (∂l/∂q·q)² (exact, in float64), and
    |Δl| ≤ σ·√(2 ln(2N/p)) for all N tokens but with probability p = 1e-6 (Gaussian tail). The
    bfloat16 MLP fails the bound of the float16 one (8× its rounding), and so does an angle 2% off."""
    if backend == "triton" and not triton_available():
        pytest.skip("triton not installed")
    d, n, s = 1024, 256, 4.0  # a strong edit: the angle's error, not the output's rounding, dominates
    ed = _with_backend(_wide_hpr(d), backend)
    ed.mlp_precision = precision
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(n, d, generator=g) * (torch.rand(n, 1, generator=g) * 6 + 1)).to(dtype)
    truth, gate = _float64_edit(ed, 0, x, s)
    assert 0.2 < gate.float().mean() < 0.8
    logit, spread = _logit_and_rounding_spread(ed, x.double())
    unit = lambda t: torch.finfo(t).eps / 2  # noqa: E731
    # Triton's CPU interpreter casts float32 → bfloat16 by truncation (a GPU rounds to nearest, the
    # cast's default): its output rounding is < eps, not ≤ eps/2
    u_out = torch.finfo(dtype).eps if backend == "triton" and dtype == torch.bfloat16 else unit(dtype)
    tail = math.sqrt(2 * math.log(2 * n / 1e-6))

    def bound(u_mlp):
        sigma = u_mlp * spread / math.sqrt(3)
        return u_out + s * math.pi / 4 * tail * sigma + (d + 16) * (1 + s) * unit(torch.float32)

    def error(out):
        return (out.double() - truth).norm(dim=-1) / x.double().norm(dim=-1)

    got = ed.edit(0, x, s)
    assert torch.equal(_bits(got[~gate]), _bits(x[~gate]))
    assert (error(got) <= bound(unit(mlp_dtype))).all(), float((error(got) / bound(unit(mlp_dtype))).max())
    if mlp_dtype == torch.bfloat16 and backend == "torch":  # the bfloat16 MLP against the float16
        # MLP's bound: fails (the MLP is the same for both backends; the interpreter's truncating
        # output cast loosens the Triton bound)
        assert (error(got) > bound(unit(torch.float16))).any()
    wrong = ed.edit(0, x, s * 1.02)  # an angle 2% off
    assert (error(wrong) > bound(unit(mlp_dtype))).any()
    assert logit.abs().max() > 1  # the angles are not all at the sigmoid's flat ends (nor its middle)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_mlp_beyond_its_range(backend):
    """A bfloat16 token beyond float16's ±65504 (a massive activation in one dimension) overflows
    the float16 MLP (inf, then NaN): the edit stays finite and equals the float32 MLP's (for this
    editor both leave that token unrotated). In the row-wise step a NaN angle leaves its token as
    it is, bit for bit, and an infinite logit is a valid angle (0 or π)."""
    if backend == "triton" and not triton_available():
        pytest.skip("triton not installed")
    from hpredit.geometry import fallback_axis
    from hpredit.kernels import hpr_rows

    ed = _with_backend(_wide_hpr(1024), backend)
    ed.mlp_precision = "float16"
    ed.config = dataclasses.replace(ed.config, gate=False)
    x, _ = _inputs(1024, torch.bfloat16, seed=4, batch=1, seq=3)
    x[0, 1, 3] = 3e5
    out = ed.edit(0, x, 1.0)
    precise = copy.copy(ed)
    precise.mlp_precision = "float32"
    rel = (out.double() - precise.edit(0, x, 1.0).double()).norm(dim=-1) / x.double().norm(dim=-1)
    assert torch.isfinite(out).all() and rel.max() <= 2 * torch.finfo(torch.bfloat16).eps, rel
    # the row-wise step with an overflowed last-layer input
    g = torch.Generator().manual_seed(0)
    w_hat = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    basis = torch.stack([w_hat, fallback_axis(w_hat)])
    h = torch.randn(4, 64, generator=g).to(torch.bfloat16)
    z = torch.randn(4, 8, generator=g).half()
    z[1, 2], z[2, :] = float("inf"), float("-inf")  # GELU(inf)·w: ±inf; GELU(-inf) = NaN
    z[3, 0] = float("nan")
    rows = hpr_rows(
        h, z, basis, torch.randn(8, generator=g), torch.zeros(1), True, None, False, 1.0, None, backend == "triton"
    )
    assert torch.isfinite(rows).all() and not torch.equal(rows[0], h[0])
    assert torch.equal(_bits(rows[2:]), _bits(h[2:]))  # NaN angles: unedited
