"""The fused HPR edit of one layer: the angle MLP's matmuls, then one pass over each token.

Per call: the hidden layers of the angle MLP as ``addmm`` + GELU (for 16-bit activations in
float16 by default, see :data:`PRECISIONS`), then one row-wise step that reads ``x`` once and
computes in float32 ``‖x‖²``, the probe score ``ŵ·x``, the last MLP layer (GELU, dot, bias),
``γ = strength·π·sigmoid(·)``, the
coefficients ``a, b, c`` of :func:`~hpredit.geometry.pseudo_rotate_coefficients`, the gate and
``a·x + b·ŵ + c·u``. That step is one Triton kernel on a GPU (:mod:`hpredit.kernels._triton`) and
plain PyTorch elsewhere. It is also the custom op ``hpredit::hpr_rows``, which ``torch.compile``
keeps whole (a fake implementation gives it shapes): static cache + compile and vLLM's compiled
graphs run the same kernel as eager mode instead of inductor regenerating the PyTorch step.
"""

from __future__ import annotations

import functools
import math
from typing import cast

import torch
import torch.nn.functional as F

from ..errors import HpreditError
from ..geometry import broadcast_strength, pseudo_rotate_coefficients

__all__ = ["BACKENDS", "PRECISIONS", "hpr_edit", "hpr_rows", "triton_available"]

#: ``auto``: the Triton kernel on CUDA tensors when Triton imports, PyTorch otherwise;
#: ``triton``: always the kernel (on CPU tensors only under ``TRITON_INTERPRET=1``); ``torch``: never
#: (and under ``torch.compile`` the PyTorch step inline, for inductor to fuse, instead of the custom op).
BACKENDS = ("auto", "triton", "torch")

#: The hidden layers of the angle MLP for 16-bit activations (float32 activations keep float32; the
#: last layer is always float32). ``float16``: weights and activations in float16, matmuls of
#: bfloat16's speed on GPU tensor cores with 8× less rounding: every bfloat16 rounding inside the MLP
#: (any layer's weights or inputs) moves the angle by ~1.5e-3 rad rms, so that the bfloat16 MLP's
#: worst token is ~10× the float32 reference's error, the float16 one's ~1.4×
#: (``benchmarks/edit_precision.py``). A token whose MLP leaves float16's range (inputs or hidden
#: values beyond ±65504: its angle is NaN) is left unedited. ``float32``:
#: all in float32 (2× the weight bytes). ``model``: in the activations' dtype. ``auto`` (default):
#: ``float16`` on CUDA, ``float32`` elsewhere (CPUs rarely have fast float16 matmuls).
PRECISIONS = ("auto", "float16", "float32", "model")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports (it ships with CUDA builds of PyTorch)."""
    try:
        import triton  # noqa: F401  (optional: Triton ships only with CUDA builds of torch, or the test extra)
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
    precision: str = "auto",
):
    """Build the edit ``(hidden (..., d), mask (...) bool or None, strength) -> hidden`` of one layer.

    ``w_hat`` (d,): the unit probe normal; ``axis`` (d,): :func:`~hpredit.geometry.fallback_axis`;
    ``weights[j]`` (out, in) and ``biases[j]`` (out,): the angle MLP (unused with ``fixed_angle``).
    Everything is prepared here once: the hidden MLP layers transposed in the MLP's dtype
    (``precision``, see :data:`PRECISIONS`), the last layer, ŵ and u in float32. ``strength``: a
    number or a tensor of per-token strengths broadcastable to ``hidden.shape[:-1]``; tokens outside
    the gate, outside ``mask`` or with strength 0 come back bit for bit.
    """
    _check_options(backend, precision)
    if fixed_angle is not None:  # a constant angle: no angle MLP at all
        weights, biases = [], []
    device = w_hat.device
    mlp_dtype = _mlp_dtype(dtype, precision, device)
    w_hat = w_hat.to(device=device, dtype=torch.float32).contiguous()
    axis = axis.to(device=device, dtype=torch.float32).contiguous()
    basis = torch.stack([w_hat, axis])  # (2, d)
    hidden_layers, w_last, b_last = _prepare_mlp(weights, biases, device, mlp_dtype)
    gelu_last = len(weights) > 1  # the last layer's input is a hidden layer's pre-activation
    fixed = None if fixed_angle is None else float(fixed_angle)

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
        z = None if w_last is None else _mlp_input(h, hidden_layers, mlp_dtype)
        kernel = backend == "triton" or (backend == "auto" and h.is_cuda and triton_available())
        if torch.compiler.is_compiling() and backend != "torch":  # kept whole: the same kernel as eager
            out = _op(h, z, basis, w_last, b_last, s, m, gelu_last, fixed, gated, kernel)
        else:
            out = hpr_rows(h, z, basis, w_last, b_last, gelu_last, fixed, gated, s, m, kernel)
        return out.reshape(hidden.shape)

    return edit


def _check_options(backend: str, precision: str) -> None:
    """Refuse an unknown backend or precision, and backend 'triton' without Triton, before any work."""
    if backend not in BACKENDS:
        raise HpreditError(f"unknown kernel backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise HpreditError(f"unknown MLP precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if backend == "triton" and not triton_available():
        raise HpreditError("backend 'triton' needs Triton: pip install triton (or use backend 'auto')")


def _prepare_mlp(
    weights: list[torch.Tensor], biases: list[torch.Tensor], device: torch.device, mlp_dtype: torch.dtype
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None, torch.Tensor | None]:
    """The angle MLP on ``device``: hidden layers (weight.T, bias) in ``mlp_dtype``, the last (width → 1) in float32."""
    hidden_layers = [
        (w.to(device=device, dtype=mlp_dtype).t().contiguous(), b.to(device=device, dtype=mlp_dtype, copy=True))
        for w, b in zip(weights[:-1], biases[:-1])
    ]
    # All copies, no views of the editor's stacked tensors: a compiled graph would guard on their base's shape.
    w_last = weights[-1].reshape(-1).to(device=device, dtype=torch.float32, copy=True) if weights else None
    b_last = biases[-1].reshape(1).to(device=device, dtype=torch.float32, copy=True) if weights else None
    return hidden_layers, w_last, b_last


def _mlp_input(
    h: torch.Tensor, hidden_layers: list[tuple[torch.Tensor, torch.Tensor]], mlp_dtype: torch.dtype
) -> torch.Tensor:
    """The last MLP layer's input (n, width), before its GELU: every hidden layer but the last activated."""
    z = h.to(mlp_dtype)
    for j, (wt, b) in enumerate(hidden_layers):
        if j:
            z = F.gelu(z)
        z = torch.addmm(b, z, wt)
    return z


def _mlp_dtype(dtype: torch.dtype, precision: str, device: torch.device) -> torch.dtype:
    """The hidden MLP layers' dtype for activations of ``dtype`` on ``device`` (see :data:`PRECISIONS`)."""
    if not dtype.is_floating_point:
        return torch.float32
    if dtype.itemsize > 2 or precision == "model":
        return dtype
    if precision == "auto":
        precision = "float16" if device.type == "cuda" else "float32"
    return torch.float16 if precision == "float16" else torch.float32


def hpr_rows(
    h: torch.Tensor,
    z: torch.Tensor | None,
    basis: torch.Tensor,
    w_last: torch.Tensor | None,
    b_last: torch.Tensor | None,
    gelu_last: bool,
    fixed: float | None,
    gated: bool,
    s: float | torch.Tensor,
    m: torch.Tensor | None,
    kernel: bool,
) -> torch.Tensor:
    """The row-wise step: ``h`` (n, d) → edited (n, d), a new tensor of ``h``'s dtype.

    ``z`` (n, width): the last MLP layer's input (None with a fixed angle); ``basis`` (2, d)
    float32: ŵ and the fallback axis u; ``w_last`` (width,), ``b_last`` (1,): the last layer;
    ``s``: a strength or per-token strengths (n,) float32; ``m`` (n,) bool or None. ``kernel``: the
    Triton kernel, else its specification in PyTorch (:func:`_hpr_rows_torch`)."""
    if kernel:
        from ._triton import hpr_rows_triton  # optional: _triton imports Triton, absent without CUDA builds

        return hpr_rows_triton(h, z, basis[0], basis[1], w_last, b_last, gelu_last, fixed, gated, s, m)
    return _hpr_rows_torch(h, z, basis, w_last, b_last, gelu_last, fixed, gated, s, m)


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

    All in float32: the last MLP layer (GELU of ``z``, dot, bias), the angle, the coefficients. A
    token whose angle is NaN (its MLP overflowed float16: hidden values beyond ±65504) stays as it is."""
    x = h.float()
    score = x @ basis[0]
    sq_norm = torch.linalg.vecdot(x, x)
    if z is None:
        theta = torch.full_like(score, float(cast(float, fixed)))
    else:
        z = z.float()
        theta = math.pi * torch.sigmoid(torch.addmv(b_last, F.gelu(z) if gelu_last else z, w_last))
    a, b, c = pseudo_rotate_coefficients(score, sq_norm, s * theta)
    gate = score < 0 if gated else None
    finite = None if z is None else theta == theta  # NaN where the MLP overflowed (float16): unedited
    for extra in (m, s != 0 if isinstance(s, torch.Tensor) else None, finite):
        if extra is not None:
            gate = extra if gate is None else gate & extra
    out = torch.addmm(x * a.unsqueeze(-1), torch.stack([b, c], dim=-1), basis).to(h.dtype)
    return (out if gate is None else torch.where(gate.unsqueeze(-1), out, h)).contiguous()


# --------------------------------------------------------------------------- the custom op

_SCHEMA = (
    "(Tensor h, Tensor? z, Tensor basis, Tensor? w_last, Tensor? b_last, Tensor? s, Tensor? m, "
    "float s_scalar, float? fixed, bool gelu_last, bool gated, bool kernel) -> Tensor"
)


@torch.library.custom_op("hpredit::hpr_rows", mutates_args=(), schema=_SCHEMA)
def _hpr_rows_op(h, z, basis, w_last, b_last, s, m, s_scalar, fixed, gelu_last, gated, kernel):
    """:func:`hpr_rows` as an op torch.compile keeps whole (``s`` per token, else ``s_scalar``)."""
    return hpr_rows(h, z, basis, w_last, b_last, gelu_last, fixed, gated, s_scalar if s is None else s, m, kernel)


@_hpr_rows_op.register_fake
def _(h, z, basis, w_last, b_last, s, m, s_scalar, fixed, gelu_last, gated, kernel):
    return h.new_empty(h.shape)  # contiguous, like both implementations' result


def _op(h, z, basis, w_last, b_last, s, m, gelu_last, fixed, gated, kernel) -> torch.Tensor:
    per_token = isinstance(s, torch.Tensor)
    return torch.ops.hpredit.hpr_rows(
        h,
        z,
        basis,
        w_last,
        b_last,
        s if per_token else None,
        m,
        0.0 if per_token else float(s),
        fixed,
        gelu_last,
        gated,
        kernel,
    )
