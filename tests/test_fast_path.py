"""The fast HPR edit (attach's default) against the float32 reference path and float64 geometry."""

import copy
import dataclasses
import functools
import math

import pytest
import torch

from hpredit.geometry import PARALLEL_SIN, fallback_axis, pseudo_rotate, pseudo_rotate_coefficients
from hpredit.models import fingerprint

from .conftest import random_hpr, tiny_model

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_coefficients_rebuild_pseudo_rotate_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 64, generator=g, dtype=torch.float64)
    x = x * torch.rand(500, 1, generator=g, dtype=torch.float64) * 5
    w = torch.randn(64, generator=g, dtype=torch.float64)
    w_hat = w / w.norm()
    gamma = torch.rand(500, generator=g, dtype=torch.float64) * math.pi
    a, b, c = pseudo_rotate_coefficients(x @ w_hat, (x * x).sum(-1), gamma)
    got = a[:, None] * x + b[:, None] * w_hat + c[:, None] * fallback_axis(w_hat)
    torch.testing.assert_close(got, pseudo_rotate(x, w, gamma), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_coefficients_parallel_and_zero(sign):
    """x ∥ ŵ: the fallback axis, as the reference; x = 0 stays 0."""
    w = torch.tensor([0.6, 0.0, 0.8, 0.0])
    x = torch.stack([sign * 3.0 * w, torch.zeros(4)])
    a, b, c = pseudo_rotate_coefficients(x @ w, (x * x).sum(-1), torch.tensor([0.7, 0.7]))
    got = a[:, None] * x + b[:, None] * w + c[:, None] * fallback_axis(w)
    torch.testing.assert_close(got, pseudo_rotate(x, w, torch.tensor([0.7, 0.7])), atol=1e-6, rtol=0)
    assert torch.isfinite(got).all() and torch.equal(got[1], torch.zeros(4))
    torch.testing.assert_close(got[0].norm(), x[0].norm())
    assert float(torch.sqrt(1 - (x[0] @ w / x[0].norm()) ** 2)) < PARALLEL_SIN


def _with(ed, **changes):
    out = copy.copy(ed)
    out.config = dataclasses.replace(ed.config, **changes)
    return out


def _variants(ed):
    return {"hpr": ed, "no-gate": _with(ed, gate=False), "fixed-angle": _with(ed, fixed_angle=0.8)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0, 2.0])
def test_fast_equals_reference_to_dtype_rounding(dtype, strength):
    model = tiny_model("llama")
    d = fingerprint(model).hidden_size
    ed = random_hpr(model, depth=4)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 11, d, generator=g) * torch.rand(3, 11, 1, generator=g) * 8).to(dtype)
    mask = torch.rand(3, 11, generator=g) > 0.3
    for name, variant in _variants(ed).items():
        for m in (None, mask):
            fast = variant.edit(1, x, strength, mask=m, fast=True)
            ref = variant.edit(1, x, strength, mask=m, fast=False)
            assert fast.dtype == dtype and fast.shape == x.shape
            if dtype == torch.float32:
                torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5, msg=name)
            else:  # the output's rounding, and where the fast path's angle MLP runs in float16 its
                # rounding: the angle moves by ~eps, the output by ~eps·‖x‖ per unit of strength
                rel = (fast.float() - ref.float()).norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-6)
                assert rel.max() <= 2 * torch.finfo(dtype).eps * max(1.0, strength), (name, float(rel.max()))
            # the same tokens are edited (gate and mask decided in float32 on both paths) ...
            edited = ~(ref == x).all(-1)
            assert edited.any() or strength == 0.0
            assert not (edited & ~(fast != x).any(-1)).any() or dtype != torch.float32
            # ... and the others come back bit for bit
            assert torch.equal(fast[~edited], x[~edited]) or strength == 0.0
            if m is not None:
                assert torch.equal(fast[~m], x[~m])
            if strength == 0.0:
                assert torch.equal(fast, x)
            ratio = fast.float().norm(dim=-1) / x.float().norm(dim=-1)
            assert (ratio - 1).abs().max() < (1e-6 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scope", ["all", "last-prompt-and-generated"])
def test_fast_and_reference_generate_the_same_tokens(dtype, scope):
    model = tiny_model("llama", dtype=dtype)
    ed = random_hpr(model, layers=[0, 1], depth=4)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    outs, hidden = {}, {}
    for fast in (True, False):
        if not fast:
            ed.layer_edit = functools.partial(type(ed).layer_edit, ed, fast=False)
        with ed.attach(model, strength=1.0, scope=scope):
            outs[fast] = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
            hidden[fast] = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    del ed.layer_edit
    assert torch.equal(outs[True], outs[False])
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, outs[True]) or scope != "all"
    for a, b in zip(hidden[True], hidden[False]):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        else:  # bf16: rounding-size differences, carried through the later layers
            rel = (a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1).clamp_min(1e-6)
            assert rel.max() <= 4 * torch.finfo(dtype).eps, float(rel.max())
