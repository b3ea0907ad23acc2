"""Spherical Steering (You, Deng & Chen, ICML 2026, arXiv 2602.08169): a gated geodesic rotation.

Sources. The corpus available here holds the paper's abstract and summaries but not its method
section, so its equation numbers could not be checked; the equations below are the ones the paper
describes (a geodesic rotation toward a target direction on the sphere of the activation's own
norm, and a von Mises–Fisher confidence gate scaling the rotation per input) in the exact form of
the authors' public reference (chili-lab/Spherical-Steering, ``spherical_steering.py`` and
``get_prototypes.py``), which was read to pin the details down; no code was copied.

- **Prototypes** (offline, per layer): ``μ_T = (m₊ − m₋)/‖m₊ − m₋‖`` from the means of the
  positive and negative training tokens, and the antipodal ``μ_H = −μ_T``.
- **Confidence gate** (vMF posterior of two classes with a shared concentration κ): with
  ``c = ĥ·μ_T`` (``ĥ = h/‖h‖``), ``(p_T, p_H) = softmax(κ·ĥ·μ_T, κ·ĥ·μ_H)`` and
  ``Δ = p_H − p_T``, which for antipodal prototypes is ``−tanh(κ c)``. A token is steered only when
  ``Δ > β``, by the fraction ``t = α · (Δ − β)/(1 − β)``, clipped to [0, 1].
  Limits (tested): ``κ → ∞`` makes the gate a hard one, ``t = α`` for every token on the negative
  side (``c < 0``) and 0 on the positive side; ``κ → 0`` makes it constant,
  ``t = α·max(0, −β/(1 − β))``; ``β → 1`` steers nothing; ``β = −1`` gives ``t = α·p_H``; a token
  at the prototype (``c = 1``) is never moved, one at ``μ_H`` (``c = −1``) is moved the most.
- **Geodesic rotation** (slerp toward ``μ_T`` on the sphere of radius ``‖h‖``): the angle to the
  prototype ``θ = ∠(h, μ_T)`` becomes ``(1 − t)·θ``; the reference writes it as
  ``h' = ‖h‖ (cos((1 − t)θ) μ_T + sin((1 − t)θ) u)``, ``u = (ĥ − c μ_T)/sin θ``, which divides by
  ``sin θ``. We use the equivalent stable form, ``h`` rotated by ``γ = t·θ`` toward ``μ_T`` inside
  span{h, μ_T}: ``h' = cos γ · h + sin γ · ‖h‖ · e``, ``e`` the unit vector of ``μ_T − c ĥ``
  (:func:`hpredit.geometry.rotate_toward`), with ``θ`` from the atan2 form of
  :func:`~hpredit.geometry.angle_between` (accurate near 0 and π). ``‖h'‖ = ‖h‖`` exactly in exact
  arithmetic, to float32 rounding here; the math is float32, cast back to the model's dtype.

**Strength** = the paper's α, the maximum slerp fraction, scaling the gated fraction:
``t = clip(s · g(h), −1, 1)`` with the gate ``g(h) = max(0, (Δ − β)/(1 − β)) ∈ [0, 1)``. For
``0 ≤ s ≤ 1`` this is the paper's ``t`` exactly (its clip to [0, 1] never binds); ``s = 0`` is the
identity (bit for bit); a larger ``s`` turns every gated token further toward ``μ_T``, up to
reaching it (``t = 1``), so each token's rotation ``t·θ`` and the fluency cost grow with ``s``. A
negative ``s`` turns gated tokens away from ``μ_T`` along the same geodesic, by at most their own
angle ``θ`` (``t ≥ −1``); norms are kept for any ``s``. Measured on SmolLM2-135M (5 layers): KL
0.057 / 0.23 / 1.05 nats/token at 0.1 / 0.2 / 0.4 (the grid in
:data:`hpredit.compare.methods.METHODS`); turning away costs more (1.56 at −0.1).

Choices the paper leaves open, made here:

- Defaults ``κ = 20``, ``β = −0.15``: the authors' published setting for Llama-3.1-8B-Instruct
  (their Qwen-2.5-7B setting is β = 0.4); the strength takes the place of their α (0.7 there).
- Which tokens: every token the attach scope selects (the reference steers the last token while
  generating and the answer tokens when scoring; ``last-prompt-and-generated`` is the former).
- Data: the completion tokens of the training pairs (the reference: the last answer token).
- Layers: the ``top_k`` best by validation pair accuracy along ``μ_T`` (as CAA), several at once
  (the reference edits one layer).
- Degenerate tokens: ``h = 0`` stays 0; ``h ∥ μ_T`` has ``θ = 0`` and does not move; ``h ∥ μ_H``
  (``θ = π``, every geodesic equally short) turns toward the coordinate axis least aligned with
  ``h``, made orthogonal to it: deterministic and finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..activations import ActivationStore
from ..architecture import ModelFingerprint
from ..geometry import angle_between, rotate_toward
from ..hooks import LayerEdit, token_strength
from .additive import mean_difference_fit
from .angular import check_unit_tensors
from .base import (
    EditorConfig,
    FittedLayersEditor,
    choose_layers,
    fitted_layers_from,
    is_number,
    register_editor,
)

__all__ = ["SphericalConfig", "SphericalEditor", "confidence_gate"]


@dataclass
class SphericalConfig(EditorConfig):
    """Hyper-parameters of Spherical Steering."""

    kappa: float = 20.0  #: κ, the vMF concentration of the confidence gate (> 0; larger: a harder gate)
    beta: float = -0.15  #: β, the gate's threshold on Δ = p_H − p_T, in [−1, 1)
    top_k: int = 5  #: layers kept by validation pair accuracy (ignored when ``layers`` is given)
    layers: list[int] | None = None  #: explicit layers to edit
    val_fraction: float = 0.2  #: groups held out for validation when no pair is marked ``val``
    seed: int = 42

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (is_number(self.kappa) and 0 < self.kappa <= 1e6, "kappa must be a number in (0, 1e6]"),
            (is_number(self.beta) and -1 <= self.beta < 1, "beta must be a number in [-1, 1)"),
            *self.layer_choice_checks(),
        ]


def confidence_gate(cos_to_prototype: torch.Tensor, kappa: float, beta: float) -> torch.Tensor:
    """The gate ``g = max(0, (Δ − β)/(1 − β))`` with ``Δ = p_H − p_T = −tanh(κ c)`` (the two-class
    vMF posterior with antipodal prototypes), from ``c = ĥ·μ_T``; in [0, 1)."""
    delta = -torch.tanh(kappa * cos_to_prototype)
    return ((delta - beta) / (1.0 - beta)).clamp_min(0.0)


@register_editor
class SphericalEditor(FittedLayersEditor):
    """Spherical Steering: gated tokens rotated along the geodesic toward the positive prototype μ_T."""

    method = "spherical"
    config_class = SphericalConfig

    def __init__(
        self,
        config: SphericalConfig,
        layers: list[int],
        model: ModelFingerprint,
        fitted_layers: list[int],
        prototypes: torch.Tensor,
        metrics: dict | None = None,
    ):
        super().__init__(config, layers, model, metrics)
        self.fitted_layers = list(fitted_layers)
        self.prototypes = prototypes  # (L_fit, d) unit μ_T per layer (μ_H = −μ_T)

    def prototype(self, layer: int) -> torch.Tensor:
        """The unit positive prototype μ_T ``(d,)`` of ``layer``."""
        return self.prototypes[self.fitted_layers.index(layer)]

    def layer_edit(self, layer: int, device: torch.device, dtype: torch.dtype = torch.float32) -> LayerEdit:
        mu64 = self.prototype(layer).double()
        mu = (mu64 / mu64.norm()).to(device=device, dtype=torch.float32)
        kappa, beta = float(self.config.kappa), float(self.config.beta)

        def edit(hidden: torch.Tensor, mask: torch.Tensor | None, strength: float | torch.Tensor) -> torch.Tensor:
            mask, s = token_strength(hidden, mask, strength)
            if s is None:
                return hidden
            x = hidden.float()
            norm = x.norm(dim=-1)
            c = ((x * mu).sum(-1) / norm.clamp_min(1e-30)).clamp(-1.0, 1.0)
            gate = confidence_gate(c, kappa, beta)
            alpha = s.squeeze(-1) if isinstance(s, torch.Tensor) else torch.full_like(c, s)
            t = (alpha * gate).clamp(-1.0, 1.0)
            out = rotate_toward(x, mu, t * angle_between(x, mu)).to(hidden.dtype)
            return out if mask is None else torch.where(mask.unsqueeze(-1), out, hidden)

        return edit

    # ------------------------------------------------------------------ artifact

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes}

    @classmethod
    def _from_tensors(cls, config, layers, model, metrics, tensors, artifact):
        fitted = fitted_layers_from(artifact, layers)
        (prototypes,) = check_unit_tensors(tensors, ("prototypes",), (len(fitted), model.hidden_size))
        return cls(config, layers, model, fitted, prototypes, metrics)

    # ------------------------------------------------------------------ training

    @classmethod
    def fit(
        cls, acts: ActivationStore, config: SphericalConfig | None = None, progress: bool = True, **overrides: Any
    ) -> SphericalEditor:
        """The prototype μ_T of every collected layer (the normalised mean difference of the training
        token pairs), then the layers to edit: the top ``top_k`` by validation pair accuracy along
        μ_T, or ``config.layers``. Nothing is trained (``progress`` is accepted for a uniform signature).

        ``metrics["val_gate_accuracy"]``: per layer, how often the gate's two-class vMF posterior
        classifies the held-out tokens right (``p_T > p_H`` ⟺ ``ĥ·μ_T > 0`` for positive tokens).
        """
        config = cls.fit_config(acts, config, overrides)
        vectors, accuracy, split = mean_difference_fit(acts, config.val_fraction, config.seed)
        norms = vectors.double().norm(dim=-1, keepdim=True)
        axis = torch.zeros_like(vectors, dtype=torch.float64)
        axis[:, 0] = 1.0
        prototypes = torch.where(norms > 0, vectors.double() / norms.clamp_min(1e-30), axis).float()
        gate_accuracy = {}
        for r, layer in enumerate(acts.layers):
            pos = acts.acts[r, split.vp].float() @ prototypes[r]
            neg = acts.acts[r, split.vn].float() @ prototypes[r]
            gate_accuracy[str(layer)] = float(((pos > 0).float().mean() + (neg < 0).float().mean()) / 2)
        layers = choose_layers(accuracy, config.layers, config.top_k)
        metrics = {
            "val_pair_accuracy": {str(k): v for k, v in accuracy.items()},
            "val_gate_accuracy": gate_accuracy,
            "train_token_pairs": len(split.tp),
            "val_token_pairs": len(split.vp),
            "difference_norm": {str(layer): float(norms[r]) for r, layer in enumerate(acts.layers)},
        }
        return cls(config, layers, acts.fingerprint, list(acts.layers), prototypes, metrics)
