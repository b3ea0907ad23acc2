"""Directional ablation (``ablation``) and its affine form ACE (``affine=True``; ``ace`` in ``compare``).

Sources:

- Arditi, Obeso, Syed, Paleka, Panickssery, Gurnee & Nanda, "Refusal in Language Models Is Mediated
  by a Single Direction", NeurIPS 2024 (arXiv 2406.11717): the direction is a difference in means
  of the residual stream on two contrasting sets (§2.3), and *directional ablation* removes each
  activation's component along its unit vector, ``x' = x − r̂ r̂ᵀ x``, at every token (§2.4).
- Marshall, Scherlis & Belrose, "Refusal in LLMs is an Affine Function", arXiv 2411.09003 (2024):
  *affine concept editing* (ACE, §3) ablates the direction relative to a reference point, the mean
  activation of the class without the concept, instead of the origin, then adds the direction back
  with a coefficient: ``x' = x − proj_r(x) + proj_r(μ⁻) + α r``, with ``proj_r(v) = (r̂·v) r̂``.

Only the papers' abstracts and secondary descriptions could be read from this project's reference
corpus, so the section numbers above are from memory of the papers' layout and their equation
numbers could not be checked; the equations are the standard, widely reproduced forms (the
secondary descriptions read agree with them), restated in our notation.

Per layer, from the same :class:`~hpredit.activations.ActivationStore` as CAA (aligned positive /
negative completion tokens of the training pairs): ``μ⁺``, ``μ⁻`` the mean positive and negative
token, ``r = μ⁺ − μ⁻`` (CAA's vector), ``r̂ = r/‖r‖``, ``p(x) = r̂·x``. With strength ``s``::

    ablation:  x' = x + s · (0 − p(x)) · r̂                           (Arditi et al. at s = 1)
    ACE:       x' = x + s · (c − p(x)) · r̂,   c = r̂·μ⁻ + α‖r‖        (Marshall et al. at s = 1)

so ``p(x') = p(x) + s·(goal − p(x))``: the strength is **the fraction of the token's component along
r̂ that is removed** (``ablation``: goal 0) or **the fraction of the way from its projection to the
negative mean's projection plus the added offset α‖r‖** (ACE: goal ``c``). ``s = 1`` is the paper's
edit: the projection becomes exactly 0 (ablation) or ``c`` (ACE; with the default ``α = 1``,
``c = r̂·μ⁺``, the positive mean's projection: every token is set to the positive class's level
along r̂). ``s > 1`` over-removes: ablation at ``s = 2`` is the Householder reflection through the
hyperplane ``r̂·x = 0`` (norm kept), beyond it the component grows again with the opposite sign;
``s < 0`` amplifies the token's own component (ablation) or pushes it away from ``c`` (ACE). Every
strength is finite, and the fluency cost grows with ``|s|`` (the displacement is linear in ``s``):
needed because full ablation (``s = 1``) may cost less than the largest KL target of a matched-cost
search, which then continues into ``s > 1``.

Choices the papers leave open for this setting, made here:

- **Which tokens**: every token in the attach scope (no gate), as Arditi et al. ablate at every
  layer and position; the contrast is hpredit's positive vs negative completion tokens, not the
  papers' harmful vs harmless instruction's last tokens.
- **The sign of r**: positive minus negative (as CAA). Ablation does not depend on it; ACE's
  reference point is the **negative** mean (the class without the behaviour to be induced, as
  harmless prompts are for refusal), and the added ``α r`` points to the positive class.
- **α** (``AblationConfig.alpha``, default 1, ACE only): in units of ``r``; ``α = 0`` is pure affine
  ablation (every token set to the negative mean's level: steering *away* from the positive
  behaviour), ``α = 1`` the positive mean's level.
- **Layers**: the direction is fitted for every collected layer; the ``top_k`` with the best
  validation pair accuracy along ``r`` (the same measure as CAA) are edited, all at once (the
  papers ablate at every layer; ``layers=`` chooses them explicitly).

What it keeps: every component orthogonal to r̂; tokens outside the scope (bit for bit). Neither
form keeps the norm (ablation at ``s = 1`` takes ``‖x‖`` to ``√(‖x‖² − p(x)²)``), except ablation at
``s = 2``.
``affine`` is an inference-time switch: the artifact always holds ``r`` and ``r̂·μ⁻``.

Cost per token and layer: one dot product and one scaled addition, O(d), in float32 (cast back to
the activations' dtype; float16 results clamped to its finite range). Parameters per layer: ``r``
(d) and the scalar ``r̂·μ⁻``. Measured strength → KL on SmolLM2, and the grids ``compare`` starts
from: docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..activations import ActivationStore
from ..architecture import ModelFingerprint
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
from .mirror import finite_in

__all__ = ["AblationConfig", "AblationEditor"]


@dataclass
class AblationConfig(EditorConfig):
    """Hyper-parameters of directional ablation and ACE."""

    top_k: int = 5  #: layers kept by validation pair accuracy (ignored when ``layers`` is given)
    layers: list[int] | None = None  #: explicit layers to edit
    val_fraction: float = 0.2  #: groups held out for validation when no pair is marked ``val``
    seed: int = 42
    affine: bool = False  #: ACE: ablate relative to the negative mean, then add ``alpha·r``
    alpha: float = 1.0  #: ACE's added offset, in units of ``r = μ⁺ − μ⁻`` (1: the positive mean's level)

    def checks(self) -> list[tuple[bool, str]]:
        return [
            *self.layer_choice_checks(),
            (isinstance(self.affine, bool), "affine must be true or false"),
            (is_number(self.alpha) and abs(self.alpha) <= 100, "alpha must be a number between -100 and 100"),
        ]


@register_editor
class AblationEditor(FittedLayersEditor):
    """Directional ablation along the mean difference (``affine=True``: ACE); see the module docs."""

    method = "ablation"
    config_class = AblationConfig

    def __init__(
        self,
        config: AblationConfig,
        layers: list[int],
        model: ModelFingerprint,
        fitted_layers: list[int],
        directions: torch.Tensor,
        reference: torch.Tensor,
        metrics: dict | None = None,
    ):
        super().__init__(config, layers, model, metrics)
        self.fitted_layers = list(fitted_layers)
        self.directions = directions  # (L_fit, d): r = μ⁺ − μ⁻
        self.reference = reference  # (L_fit,): r̂·μ⁻

    def goal(self, layer: int) -> tuple[torch.Tensor, float]:
        """``(r̂, c)`` of ``layer`` in float32: the unit direction and the projection the edit moves
        toward (0 for ablation, ``r̂·μ⁻ + α‖r‖`` for ACE)."""
        r = self.fitted_layers.index(layer)
        v = self.directions[r].float()
        norm = v.norm()
        r_hat = v / norm.clamp_min(torch.finfo(torch.float32).tiny)
        c = float(self.reference[r]) + float(self.config.alpha) * float(norm) if self.config.affine else 0.0
        return r_hat, c

    def layer_edit(self, layer: int, device: torch.device, dtype: torch.dtype = torch.float32) -> LayerEdit:
        r_hat, c = self.goal(layer)
        r_hat = r_hat.to(device)

        def edit(hidden: torch.Tensor, mask: torch.Tensor | None, strength: float | torch.Tensor) -> torch.Tensor:
            mask, s = token_strength(hidden, mask, strength)
            if s is None:
                return hidden
            x = hidden.float()
            step = c - x @ r_hat  # goal − p(x)
            out = finite_in(x + (s * step.unsqueeze(-1)) * r_hat, hidden.dtype)
            return out if mask is None else torch.where(mask.unsqueeze(-1), out, hidden)

        return edit

    # ------------------------------------------------------------------ artifact

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"directions": self.directions, "reference": self.reference}

    @classmethod
    def _from_tensors(cls, config, layers, model, metrics, tensors, artifact):
        fitted = fitted_layers_from(artifact, layers)
        n, d = len(fitted), model.hidden_size
        expected = {"directions": (n, d), "reference": (n,)}
        check_artifact_tensors(tensors, expected)
        return cls(config, layers, model, fitted, tensors["directions"], tensors["reference"], metrics)

    # ------------------------------------------------------------------ training

    @classmethod
    def fit(
        cls, acts: ActivationStore, config: AblationConfig | None = None, progress: bool = True, **overrides: Any
    ) -> AblationEditor:
        """Difference in means of the positive and negative completion tokens per layer, on train
        pairs (CAA's vector), and the negative mean's projection on it.

        Layers are ranked by validation pair accuracy (CAA's measure): the fraction of aligned token
        pairs whose positive token projects further along ``r`` than its negative one.

        Example:
            >>> editor = AblationEditor.fit(store, top_k=2, affine=True, progress=False)
            >>> len(editor.layers), editor.config.affine
            (2, True)
        """
        config = cls.fit_config(acts, config, overrides)
        directions, accuracy, split = mean_difference_fit(acts, config.val_fraction, config.seed)
        # a zero r (equal means) gives r̂ = 0: that layer's edit is the identity
        units = directions / directions.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        reference = torch.stack([acts.acts[r, split.tn].float().mean(0) @ units[r] for r in range(len(acts.layers))])
        layers = choose_layers(accuracy, config.layers, config.top_k)
        metrics = {
            "val_pair_accuracy": {str(k): v for k, v in accuracy.items()},
            "train_token_pairs": len(split.tp),
            "val_token_pairs": len(split.vp),
            "direction_norm": {str(layer): float(directions[r].norm()) for r, layer in enumerate(acts.layers)},
        }
        return cls(config, layers, acts.fingerprint, list(acts.layers), directions, reference, metrics)
