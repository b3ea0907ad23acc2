"""Angular Steering (Vu & Nguyen, NeurIPS 2025, arXiv 2510.26243): rotation inside a fixed 2-D plane.

Sources. The corpus available here holds the paper's abstract and summaries, not its method
section, so its equation numbers could not be checked. The method below is the one the abstract and
summaries describe (a target feature direction from difference in means, a steering plane through
PCA, a norm-preserving rotation inside it toward or away from the feature, and an adaptive variant
that rotates only activations positively aligned with the feature), in the form of the steering
equation of the authors' public code (lone17/angular-steering), which was read to pin the details
down; no code was copied.

- **The plane.** A feature direction from difference in means, and a second direction from the
  principal component of the per-layer candidate directions. Here, per layer ``l``:
  ``b1 = d_l / ‖d_l‖`` with ``d_l = mean(positive) − mean(negative)`` (the completion tokens of the
  training pairs, the same store HPR and CAA fit on); ``b2`` = the first principal component of the
  stacked unit candidates ``[b1_0; …; b1_{L−1}]`` over every collected layer (centred, as a PCA is),
  Gram–Schmidt against that layer's ``b1`` and normalised. ``P = b1 b1ᵀ + b2 b2ᵀ`` projects on the
  plane.
- **The edit** (the steering equation, as the authors' code writes it): the in-plane component
  ``P h`` is replaced by a vector of the same length at angle ``θ`` from ``b1``:
  ``h' = h − P h + ‖P h‖ · (cos θ · b1 + sin θ · b2)``. The out-of-plane part ``h − P h`` is
  untouched, so ``‖h'‖ = ‖h‖`` exactly: ``‖h − Ph‖² + ‖Ph‖²``.
- **Adaptive Angular Steering** (the paper's selective variant): only tokens positively aligned
  with the feature direction, ``h·b1 > 0``, are rotated (``AngularConfig.adaptive``, off by default).

The later critique (Selective Steering, Dang & Ngo, arXiv 2601.19375) is that Angular
Steering's practical implementation does not keep the norm. The replacement above keeps it only for
an exactly orthonormal (b1, b2) and exact arithmetic; the public implementation read builds the
dense ``d×d`` projection in the model's 16-bit dtype and orthogonalises b2 only at run time. Here
the basis is orthonormalised in float64 when the edit is prepared, the edit runs in float32 with
two dot products per token (``c1 = h·b1``, ``c2 = h·b2``; never a ``d×d`` matrix) as
``h' = h + (c1' − c1)·b1 + (c2' − c2)·b2``, with ``(c1', c2')`` the rotated in-plane coordinates,
and is cast back once: norms are kept to the rounding of the dtype (float32, float16 and bfloat16
tested in ``tests/test_rotation_family.py``, which also shows a non-orthonormal plane losing it).

**Strength** (one number; hpredit's matched-cost search needs that): the fraction of the way from
a token's own in-plane angle ``φ = atan2(c2, c1)`` to the target angle ``θ``, along the shorter arc:
``φ' = φ + clip(s, −1, 1)·δ`` with ``δ = wrap(θ − φ) ∈ [−π, π)``. ``s = 0`` is the identity (bit
for bit); ``0 < s < 1`` goes part of the way; ``s ≥ 1`` is exactly the paper's edit (every token's
in-plane part lands at ``θ``; the plane holds no more to turn, so a larger strength does no more);
a negative ``s`` turns the in-plane part away from ``θ`` by ``|s|·|δ|`` (at most ``|δ|``). Every
token's rotation angle ``|clip(s)·δ|`` grows with ``|s|`` up to 1, so the fluency cost does too
(measured on SmolLM2-135M, every layer: KL 0.23 / 0.36 / 0.49 nats/token at 0.25 / 0.5 / 1; the
grid in :data:`hpredit.compare.methods.METHODS`); norms are kept for any ``s``.

Choices the paper leaves open, made here:

- ``target_degrees`` (default 0: the in-plane part turned onto ``b1``, the positive behaviour's
  direction; the paper sweeps θ over 0°–360° for refusal, where its ``b1`` points to refusal).
- Which tokens: every token the attach scope selects (the paper steers every position).
- The plane's data: the completion tokens of the contrastive pairs (the paper: the last prompt
  token of harmful vs harmless instructions), raw block outputs (the paper: the normalised inputs
  of each block's norms); ``b1`` is the plain normalised mean difference, as the issue specifies,
  one plane per layer (the authors' code puts the plane of one chosen layer at every layer).
- The PCA's sign (arbitrary; only ``θ ≠ 0`` depends on it): flipped so that its largest-magnitude
  entry is positive. When the principal component is (numerically) parallel to ``b1`` or zero
  (a single collected layer), ``b2`` is the coordinate axis least aligned with ``b1``, made
  orthogonal to it (:func:`hpredit.geometry.fallback_axis`).
- Layers: every collected layer by default, as the paper steers every layer (with only the 5 best
  layers of SmolLM2 even the full edit costs ~0.1 nats/token, below the costs compared at);
  ``top_k`` keeps the best by validation pair accuracy along ``b1`` instead (as CAA).
- Degenerate tokens: ``h = 0`` or ``h ⟂`` the plane (``c1 = c2 = 0``, ``φ`` undefined) come back
  unchanged (``atan2(0, 0) = 0`` and the update is ``0·b1 + 0·b2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..activations import ActivationStore
from ..architecture import ModelFingerprint
from ..errors import HpreditError
from ..geometry import fallback_axis
from ..hooks import LayerEdit, token_strength
from .additive import mean_difference_fit
from .base import (
    EditorConfig,
    FittedLayersEditor,
    check_artifact_tensors,
    choose_layers,
    fitted_layers_from,
    is_number,
    register_editor,
)

__all__ = ["AngularConfig", "AngularEditor", "orthonormal_plane"]

_TINY = 1e-12


@dataclass
class AngularConfig(EditorConfig):
    """Hyper-parameters of Angular Steering."""

    target_degrees: float = 0.0  #: θ, the target angle from b1 toward b2, in degrees (the paper's unit)
    adaptive: bool = False  #: the paper's Adaptive Angular Steering: rotate only tokens with h·b1 > 0
    #: layers kept by validation pair accuracy (ignored when ``layers`` is given); the default keeps
    #: every collected layer (up to 1024), as the paper steers every layer
    top_k: int = 1024
    layers: list[int] | None = None  #: explicit layers to edit
    val_fraction: float = 0.2  #: groups held out for validation when no pair is marked ``val``
    seed: int = 42

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (
                is_number(self.target_degrees) and -360 <= self.target_degrees <= 360,
                "target_degrees must be an angle in degrees between -360 and 360",
            ),
            (isinstance(self.adaptive, bool), "adaptive must be true or false"),
            *self.layer_choice_checks(),
        ]


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    """Rows of ``v`` made unit; a zero row becomes the first coordinate axis (no direction to keep)."""
    norm = v.norm(dim=-1, keepdim=True)
    axis = torch.zeros_like(v)
    axis[..., 0] = 1.0
    return torch.where(norm > _TINY, v / norm.clamp_min(_TINY), axis)


def orthonormal_plane(b1: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b1, b2)`` rows ``(..., d)`` made an orthonormal pair in float64: ``b1`` normalised, ``b2``
    Gram–Schmidt against it (twice, for rounding) and normalised; where ``b2`` is (nearly) parallel
    to ``b1`` or zero, the fallback axis ⟂ ``b1`` (:func:`~hpredit.geometry.fallback_axis`)."""
    u1 = _unit_rows(b1.double())
    v = b2.double()
    for _ in range(2):
        v = v - (v * u1).sum(-1, keepdim=True) * u1
    rows = u1.reshape(-1, u1.shape[-1])
    fallback = torch.stack([fallback_axis(r) for r in rows]).reshape(u1.shape)
    ok = v.norm(dim=-1, keepdim=True) > 1e-6 * b2.double().norm(dim=-1, keepdim=True).clamp_min(_TINY)
    v = torch.where(ok, v, fallback)
    v = v - (v * u1).sum(-1, keepdim=True) * u1
    return u1, v / v.norm(dim=-1, keepdim=True)


def first_principal_component(directions: torch.Tensor) -> torch.Tensor:
    """The first principal component ``(d,)`` of the rows of ``directions`` (centred, float64), its sign
    fixed so that its largest-magnitude entry is positive; zero when the rows do not vary."""
    x = directions.double()
    x = x - x.mean(0, keepdim=True)
    if x.shape[0] < 2 or float(x.abs().max()) == 0.0:
        return torch.zeros(x.shape[1], dtype=torch.float64)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    pc = vh[0]
    return pc if pc[pc.abs().argmax()] >= 0 else -pc


@register_editor
class AngularEditor(FittedLayersEditor):
    """Angular Steering: each token's component in the plane (b1, b2) turned toward the target angle."""

    method = "angular"
    config_class = AngularConfig

    def __init__(
        self,
        config: AngularConfig,
        layers: list[int],
        model: ModelFingerprint,
        fitted_layers: list[int],
        b1: torch.Tensor,
        b2: torch.Tensor,
        metrics: dict | None = None,
    ):
        super().__init__(config, layers, model, metrics)
        self.fitted_layers = list(fitted_layers)
        self.b1 = b1  # (L_fit, d) unit feature directions
        self.b2 = b2  # (L_fit, d) unit, ⟂ b1

    def plane(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The orthonormal basis ``(b1, b2)`` (float64, ``(d,)`` each) of ``layer``'s plane."""
        r = self.fitted_layers.index(layer)
        return orthonormal_plane(self.b1[r], self.b2[r])

    def layer_edit(self, layer: int, device: torch.device, dtype: torch.dtype = torch.float32) -> LayerEdit:
        b1, b2 = (b.to(device=device, dtype=torch.float32) for b in self.plane(layer))
        target = math.radians(float(self.config.target_degrees))
        adaptive = self.config.adaptive

        def edit(hidden: torch.Tensor, mask: torch.Tensor | None, strength: float | torch.Tensor) -> torch.Tensor:
            mask, s = token_strength(hidden, mask, strength)
            if s is None:
                return hidden
            x = hidden.float()
            c1 = (x * b1).sum(-1)
            c2 = (x * b2).sum(-1)
            if adaptive:  # the paper's selective variant: only tokens aligned with b1
                aligned = c1 > 0
                mask = aligned if mask is None else mask & aligned
            frac = s.squeeze(-1) if isinstance(s, torch.Tensor) else torch.full_like(c1, s)
            delta = torch.remainder(target - torch.atan2(c2, c1) + math.pi, 2 * math.pi) - math.pi
            turn = frac.clamp(-1.0, 1.0) * delta  # the in-plane rotation angle of each token
            cos, sin = torch.cos(turn), torch.sin(turn)
            d1 = (cos - 1) * c1 - sin * c2  # c1' − c1
            d2 = sin * c1 + (cos - 1) * c2  # c2' − c2
            out = (x + d1.unsqueeze(-1) * b1 + d2.unsqueeze(-1) * b2).to(hidden.dtype)
            return out if mask is None else torch.where(mask.unsqueeze(-1), out, hidden)

        return edit

    # ------------------------------------------------------------------ artifact

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"b1": self.b1, "b2": self.b2}

    @classmethod
    def _from_tensors(cls, config, layers, model, metrics, tensors, artifact):
        fitted = fitted_layers_from(artifact, layers)
        b1, b2 = check_unit_tensors(tensors, ("b1", "b2"), (len(fitted), model.hidden_size))
        if float((b1.double() * b2.double()).sum(-1).abs().max()) > 1e-3:
            raise HpreditError("editor artifact: b2 is not orthogonal to b1 (not an angular steering plane)")
        return cls(config, layers, model, fitted, b1, b2, metrics)

    # ------------------------------------------------------------------ training

    @classmethod
    def fit(
        cls, acts: ActivationStore, config: AngularConfig | None = None, progress: bool = True, **overrides: Any
    ) -> AngularEditor:
        """The plane of every collected layer from the training pairs, then the layers to edit.

        ``b1`` per layer is the normalised mean difference (positive − negative); ``b2`` the first
        principal component of all layers' ``b1`` stacked, orthogonalised against each ``b1``.
        Layers are ranked by validation pair accuracy along ``b1`` (the top ``top_k``, or
        ``config.layers``). ``progress`` is accepted for a uniform signature (nothing is trained).
        """
        config = cls.fit_config(acts, config, overrides)
        vectors, accuracy, split = mean_difference_fit(acts, config.val_fraction, config.seed)
        directions = _unit_rows(vectors.double())
        pc = first_principal_component(directions)
        b1, b2 = orthonormal_plane(directions, pc.expand_as(directions))
        layers = choose_layers(accuracy, config.layers, config.top_k)
        metrics = {
            "val_pair_accuracy": {str(k): v for k, v in accuracy.items()},
            "train_token_pairs": len(split.tp),
            "val_token_pairs": len(split.vp),
            "pc_alignment": {str(layer): float(abs(pc @ directions[r])) for r, layer in enumerate(acts.layers)},
        }
        return cls(config, layers, acts.fingerprint, list(acts.layers), b1.float(), b2.float(), metrics)


def check_unit_tensors(
    tensors: dict[str, torch.Tensor], names: tuple[str, ...], shape: tuple[int, int]
) -> tuple[torch.Tensor, ...]:
    """The named tensors, refused unless they are exactly these, each of ``shape``, finite, rows of unit norm."""
    check_artifact_tensors(tensors, dict.fromkeys(names, shape))
    for name in names:
        if float((tensors[name].double().norm(dim=-1) - 1).abs().max()) > 1e-3:
            raise HpreditError(f"editor artifact: the rows of {name} must be unit vectors")
    return tuple(tensors[name] for name in names)
