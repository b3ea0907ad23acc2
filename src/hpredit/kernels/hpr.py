"""The fused HPR edit of one layer: the angle MLP's matmuls, then one pass over each token.

Per call: the hidden layers of the angle MLP as ``addmm`` + GELU in the activations' dtype, then
one row-wise step that reads ``x`` once and computes ``‖x‖²``, the probe score ``ŵ·x``, the last
MLP layer (GELU, dot, bias), ``γ = strength·π·sigmoid(·)``, the coefficients ``a, b, c`` of
:func:`~hpredit.geometry.pseudo_rotate_coefficients`, the gate and ``a·x + b·ŵ + c·u``.
That step is one Triton kernel on a GPU (:mod:`hpredit.kernels._triton`) and plain PyTorch
elsewhere, under ``torch.compile`` (inductor fuses it itself) or without Triton.
"""

from __future__ import annotations

import functools
import math
from typing import cast

import torch
import torch.nn.functional as F

from ..errors import HpreditError
from ..geometry import pseudo_rotate_coefficients
from ..hooks import broadcast_strength

__all__ = ["BACKENDS", "hpr_edit", "triton_available"]

#: ``auto``: the Triton kernel on CUDA tensors when Triton imports, PyTorch otherwise;
#: ``triton``: always the kernel (on CPU tensors only under ``TRITON_INTERPRET=1``); ``torch``: never.
BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports (it ships with CUDA builds of PyTorch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def hpr_edit(
    w_hat: torch.Tensor,
    axis: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    fixed_angle: float | None = None,
    gated: bool = True,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
):
    """Build the edit ``(hidden (..., d), mask (...) bool or None, strength) -> hidden`` of one layer.

    ``w_hat`` (d,): the unit probe normal; ``axis`` (d,): :func:`~hpredit.geometry.fallback_axis`;
    ``weights[j]`` (out, in) and ``biases[j]`` (out,): the angle MLP (unused with ``fixed_angle``).
    Everything is prepared here once: the hidden MLP layers transposed in ``dtype`` (the
    activations' dtype), the last layer, ŵ and u in float32. ``strength``: a number or a tensor of
    per-token strengths broadcastable to ``hidden.shape[:-1]``; tokens outside the gate, outside
    ``mask`` or with strength 0 come back bit for bit.
    """
    if backend not in BACKENDS:
        raise HpreditError(f"unknown kernel backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "triton" and not triton_available():
        raise HpreditError("backend 'triton' needs Triton: pip install triton (or use backend 'auto')")
    if fixed_angle is not None:  # a constant angle: no angle MLP at all
        weights, biases = [], []
    device = w_hat.device
    mlp_dtype = dtype if dtype.is_floating_point else torch.float32
    w_hat = w_hat.to(device=device, dtype=torch.float32).contiguous()
    axis = axis.to(device=device, dtype=torch.float32).contiguous()
    basis = torch.stack([w_hat, axis])  # (2, d)
    hidden_layers = [
        (w.to(device=device, dtype=mlp_dtype).t().contiguous(), b.to(device=device, dtype=mlp_dtype))
        for w, b in zip(weights[:-1], biases[:-1])
    ]
    # the last layer (width → 1), in the MLP's dtype like the others: (width,) and (1,)
    w_last = weights[-1].reshape(-1).to(device=device, dtype=mlp_dtype).contiguous() if weights else None
    b_last = biases[-1].reshape(1).to(device=device, dtype=mlp_dtype) if weights else None
    gelu_last = len(weights) > 1  # the last layer's input is a hidden layer's pre-activation
    fixed = None if fixed_angle is None else float(fixed_angle)

    def mlp_input(h: torch.Tensor) -> torch.Tensor | None:
        """The last MLP layer's input (n, width), before its GELU: every hidden layer but the last activated."""
        if w_last is None:
            return None
        z = h.to(mlp_dtype)
        for j, (wt, b) in enumerate(hidden_layers):
            if j:
                z = F.gelu(z)
            z = torch.addmm(b, z, wt)
        return z

    def use_triton(h: torch.Tensor) -> bool:
        if backend == "torch" or torch.compiler.is_compiling():
            return False
        if backend == "triton":
            return True
        return h.is_cuda and triton_available()

    def edit(hidden: torch.Tensor, mask: torch.Tensor | None, strength: float | torch.Tensor) -> torch.Tensor:
        lead, d = hidden.shape[:-1], hidden.shape[-1]
        if not isinstance(strength, torch.Tensor) and strength == 0:
            return hidden
        h = hidden.reshape(-1, d)
        s: float | torch.Tensor = (
            broadcast_strength(strength, lead, hidden.device).reshape(-1)
            if isinstance(strength, torch.Tensor)
            else float(strength)
        )
        m = None if mask is None else mask.broadcast_to(lead).reshape(-1)
        z = mlp_input(h)
        if use_triton(h):
            from ._triton import hpr_rows

            out = hpr_rows(h, z, w_hat, axis, w_last, b_last, gelu_last, fixed, gated, s, m)
        else:
            out = _hpr_rows_torch(h, z, basis, w_last, b_last, gelu_last, fixed, gated, s, m)
        return out.reshape(hidden.shape)

    return edit


def _hpr_rows_torch(
    h,
    z,
    basis,
    w_last,
    b_last,
    gelu_last: bool,
    fixed: float | None,
    gated: bool,
    s: float | torch.Tensor,
    m: torch.Tensor | None,
) -> torch.Tensor:
    """The row-wise step in plain PyTorch: ``h`` (n, d) → edited (n, d), same dtype; the Triton kernel's spec.

    The last MLP layer runs in the MLP's dtype (its GELU, dot and bias rounded to it, as a matmul
    would), the rest in float32."""
    x = h.float()
    score = x @ basis[0]
    sq_norm = torch.linalg.vecdot(x, x)
    if z is None:
        theta = torch.full_like(score, float(cast(float, fixed)))
    else:
        logit = torch.addmv(b_last, F.gelu(z) if gelu_last else z, w_last)
        theta = math.pi * torch.sigmoid(logit.float())
    a, b, c = pseudo_rotate_coefficients(score, sq_norm, s * theta)
    gate = score < 0 if gated else None
    for extra in (m, s != 0 if isinstance(s, torch.Tensor) else None):
        if extra is not None:
            gate = extra if gate is None else gate & extra
    out = torch.addmm(x * a.unsqueeze(-1), torch.stack([b, c], dim=-1), basis).to(h.dtype)
    return out if gate is None else torch.where(gate.unsqueeze(-1), out, h)
