"""Pure geometry of HPR: reflections and norm-preserving rotations. No model code here.

Every function takes activations of any shape ``(..., d)``, does its scalar math in float32
(or float64 when given float64) and casts the result back to the input dtype.
"""

from __future__ import annotations

import torch

from .errors import HpreditError

__all__ = [
    "broadcast_strength",
    "angle_between",
    "fallback_axis",
    "householder_reflect",
    "pseudo_rotate",
    "pseudo_rotate_coefficients",
    "reflection_angle",
    "rotate_toward",
    "rotation_direction",
]

_TINY = 1e-12


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(_TINY)


def _orthogonal_fallback(u: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
    """Where ``u`` (..., d) vanishes, the coordinate axis least aligned with x̂, made orthogonal to it."""
    axis = torch.nn.functional.one_hot(xhat.abs().argmin(dim=-1), xhat.shape[-1]).to(xhat.dtype)
    alt = axis - (axis * xhat).sum(-1, keepdim=True) * xhat
    return _unit(torch.where(u.norm(dim=-1, keepdim=True) < 1e-6, alt, u))


def householder_reflect(x: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """Reflect ``x`` (..., d) across the hyperplane through the origin with normal ``normal``.

    ``H x = x − 2 (ŵ·x) ŵ``: a rank-1 update, O(d) per vector; ``‖Hx‖ = ‖x‖``.
    """
    ct = _compute_dtype(x)
    w = _unit(normal.to(ct))
    xf = x.to(ct)
    return (xf - 2.0 * (xf * w).sum(-1, keepdim=True) * w).to(x.dtype)


def angle_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in [0, π] between ``a`` and ``b`` (..., d), accurate near 0 and π.

    Uses ``2·atan2(‖â − b̂‖, ‖â + b̂‖)`` instead of ``acos`` (which loses all precision near 0 and π).
    A zero vector makes angle 0 with anything.
    """
    ct = torch.promote_types(_compute_dtype(a), _compute_dtype(b))
    ua, ub = _unit(a.to(ct)), _unit(b.to(ct))
    angle = 2.0 * torch.atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1))
    zero = (a.to(ct).norm(dim=-1) == 0) | (b.to(ct).norm(dim=-1) == 0)
    return torch.where(zero, torch.zeros_like(angle), angle)


def rotation_direction(x: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """Unit vector ``e`` (..., d) in span{x, ŵ}, orthogonal to ``x``, pointing toward ``Hx``.

    ``e ∝ −sign(ŵ·x) (ŵ − (ŵ·x̂) x̂)``. On the hyperplane (``ŵ·x = 0``) it points to the positive
    side (+ŵ). When ``x ∥ ŵ`` the plane is undefined (``Hx = −x``); we then take the fixed
    direction of the coordinate axis least aligned with ``x``, orthogonalised against ``x``, so the
    result is deterministic and finite. Computed in float32 (float64 for float64 input).
    """
    ct = _compute_dtype(x)
    xf = x.to(ct)
    w = _unit(normal.to(ct)).expand_as(xf)
    xhat = _unit(xf)
    c = (w * xhat).sum(-1, keepdim=True)
    sign = torch.where(c > 0, 1.0, -1.0).to(ct)
    return _orthogonal_fallback(-sign * (w - c * xhat), xhat)


def pseudo_rotate(x: torch.Tensor, normal: torch.Tensor, angle: torch.Tensor | float) -> torch.Tensor:
    """Rotate ``x`` (..., d) by ``angle`` (..., or scalar, radians) toward its reflection ``Hx``.

    The stable form of HPR's edit: ``x' = cos γ · x + sin γ · ‖x‖ · e`` with ``e`` from
    :func:`rotation_direction`. ``‖x'‖ = ‖x‖`` exactly in exact arithmetic (to float32 rounding
    here); ``γ = ∠(x, Hx)`` lands on ``Hx``. ``x = 0`` is returned unchanged. Never builds a d×d matrix.
    """
    ct = _compute_dtype(x)
    xf = x.to(ct)
    gamma = torch.as_tensor(angle, dtype=ct, device=x.device)
    if gamma.dim() > 0:
        gamma = gamma.unsqueeze(-1)
    e = rotation_direction(xf, normal)
    norm = xf.norm(dim=-1, keepdim=True)
    out = torch.cos(gamma) * xf + torch.sin(gamma) * norm * e
    return out.to(x.dtype)


def rotate_toward(x: torch.Tensor, target: torch.Tensor, angle: torch.Tensor | float) -> torch.Tensor:
    """Rotate ``x`` (..., d) by ``angle`` inside span{x, target}, toward ``target``, keeping ‖x‖.

    The general form behind :func:`pseudo_rotate` (there ``target = Hx``); used by the HPR ablation
    whose probe has a bias, where the "reflection" is affine and no longer norm-preserving.
    """
    ct = _compute_dtype(x)
    xf = x.to(ct)
    xhat = _unit(xf)
    t = _unit(target.to(ct))
    e = _orthogonal_fallback(t - (t * xhat).sum(-1, keepdim=True) * xhat, xhat)
    e = _unit(e - (e * xhat).sum(-1, keepdim=True) * xhat)  # second pass: orthogonal to rounding
    gamma = torch.as_tensor(angle, dtype=ct, device=x.device)
    if gamma.dim() > 0:
        gamma = gamma.unsqueeze(-1)
    return (torch.cos(gamma) * xf + torch.sin(gamma) * xf.norm(dim=-1, keepdim=True) * e).to(x.dtype)


def fallback_axis(normal: torch.Tensor) -> torch.Tensor:
    """The unit vector ``u`` (d,) ⟂ ŵ that :func:`rotation_direction` uses when ``x ∥ ŵ``.

    The coordinate axis least aligned with ŵ, made orthogonal to it: for ``x = ±k ŵ`` that is the
    same axis the reference picks from x̂, so the fast path lands where the reference does.
    """
    ct = _compute_dtype(normal)
    w = _unit(normal.to(ct))
    return _orthogonal_fallback(torch.zeros_like(w), w)


#: Below this value of ``sin ∠(x, ŵ)`` the fast path treats ``x`` as parallel to ŵ. Computed from
#: ``1 − (ŵ·x̂)²`` in float32 it is only known to ~3e-4 there, hence a threshold well above that.
PARALLEL_SIN = 1e-3


def pseudo_rotate_coefficients(
    score: torch.Tensor, sq_norm: torch.Tensor, gamma: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scalars ``(a, b, c)`` (...,) with ``pseudo_rotate(x, ŵ, γ) = a·x + b·ŵ + c·u``.

    From ``score = ŵ·x`` (ŵ unit) and ``sq_norm = ‖x‖²`` only, so an edit needs two reductions
    over d and one fused ``a·x + [b c]·[ŵ; u]`` instead of d-sized temporaries. With
    ``S = sin ∠(x, ŵ) = √(1 − (ŵ·x̂)²)``: ``a = cos γ + sin γ·|ŵ·x̂|/S``, ``b = −sign(ŵ·x)·sin γ·‖x‖/S``,
    ``c = 0``; when ``S < PARALLEL_SIN`` (x ∥ ŵ) ``a = cos γ``, ``b = 0``, ``c = sin γ·‖x‖`` with
    ``u`` = :func:`fallback_axis`. ``x = 0`` gives ``a·0 = 0``. Float32 in, float32 out.
    """
    norm = sq_norm.sqrt()
    cos_xw = score / norm.clamp_min(_TINY)
    sin_xw = (1.0 - cos_xw * cos_xw).clamp_min(0.0).sqrt()
    parallel = sin_xw < PARALLEL_SIN
    gamma = torch.as_tensor(gamma, dtype=score.dtype, device=score.device)
    cos_g, sin_g = torch.cos(gamma), torch.sin(gamma)
    inv = torch.where(parallel, 0.0, 1.0 / sin_xw.clamp_min(PARALLEL_SIN))
    sign = torch.where(score > 0, 1.0, -1.0)
    a = cos_g + sin_g * cos_xw.abs() * inv
    b = -sign * sin_g * norm * inv
    c = torch.where(parallel, sin_g * norm, 0.0)
    return a, b, c


def reflection_angle(x: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """``φ = ∠(x, Hx) = π − 2·∠(x, ŵ-plane)``, computed as ``2·asin(|ŵ·x̂|)`` (stable)."""
    ct = _compute_dtype(x)
    xhat = _unit(x.to(ct))
    c = (xhat * _unit(normal.to(ct))).sum(-1).abs().clamp(max=1.0)
    return 2.0 * torch.asin(c)


def broadcast_strength(strength: torch.Tensor, lead: torch.Size, device: torch.device) -> torch.Tensor:
    """Per-token strengths as float32 of shape ``lead`` (= hidden.shape[:-1]), or one clear error."""
    try:
        return torch.as_tensor(strength, device=device).float().broadcast_to(lead)
    except RuntimeError:
        raise HpreditError(
            f"strength of shape {tuple(strength.shape)} does not broadcast to the tokens' shape "
            f"{tuple(lead)}: pass a number or one strength per token"
        ) from None
