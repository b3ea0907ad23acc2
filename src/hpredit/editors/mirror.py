"""Steer-to-Mirror-Projection (``mirror``) and Steer-to-Target-Projection (``target``).

Source: Herbster, Zborowski, Tosato, Gidel & Tosato, "Activation Steering for Aligned Open-ended
Generation without Sacrificing Coherence", arXiv 2604.08169 (2026). Only the paper's abstract could
be read from this project's reference corpus, not its method section, so the equations below are
this module's own reading of the abstract and of the issue that asked for the method, not a
transcription of numbered equations: "two projection-aware methods, Steer-to-Target-Projection
(StTP) and Steer-to-Mirror-Projection (StMP), that use a logistic regression decision boundary to
selectively intervene only on tokens whose activations fall below distributional thresholds".

Per layer, a logistic-regression probe **with a bias**, ``P(x) = sigmoid(w·x + b)``, trained on the
positive (label 1) and negative (label 0) completion tokens exactly as HPR trains its probe (the
same training code, :func:`hpredit.editors.hpr._fit_probes`, with ``probe_bias=True``). With
``ŵ = w/‖w‖``, a token's projection is ``p(x) = ŵ·x`` and the decision boundary ``P(x) = 0.5`` is
the projection ``τ = −b/‖w‖``. Only tokens below it (``p(x) < τ``, i.e. ``P(x) < 0.5``) are moved,
along ``ŵ`` only (every component orthogonal to ``ŵ`` is kept)::

    mirror:  x' = x + s · (m(x) − p(x)) · ŵ,   m(x) = 2τ − p(x)   (the mirror of p across τ)
    target:  x' = x + s · (t − p(x)) · ŵ,      t = mean of ŵ·x over the positive training tokens

so ``p(x') = p(x) + s·(goal − p(x))``: the strength ``s`` is **the fraction of the way from the
token's projection to its goal** (its mirror image, or the target). ``s = 1``: the paper's edit
(the token lands on its mirror image across the boundary, or on the target); ``s = 0.5`` for
``mirror``: onto the boundary; ``s > 1``: past the goal; ``s < 0``: away from it (further onto the
negative side). Every strength is finite (no division by anything that depends on the token), and
the fluency cost grows with ``|s|`` (the displacement is linear in ``s``).

Choices the abstract leaves open, made here:

- **The threshold** ("distributional thresholds"): the probe's decision boundary ``P(x) = 0.5``,
  HPR's gating rule (``P(x) < 0.5``), so that ``mirror`` and HPR differ in the probe's bias and in
  the move, not in the rule that picks the tokens. (A threshold set from the distribution of
  projections, e.g. a percentile of the positive tokens', is the alternative the abstract's word
  may mean; it is not implemented.) A token exactly on the boundary (``p = τ``) is not moved
  (``P = 0.5`` is not below 0.5); its mirror image is itself anyway.
- **The target** of ``target``: the mean projection of the positive training tokens (where the
  positive class sits along ``ŵ``), per layer. If it lies below ``τ`` (a probe worse than chance)
  the gated tokens move down; fitting does not refuse it.
- **The direction** of the move: ``ŵ``, the probe's normal (not a mean difference), so "the mirror
  of the projection" is the affine reflection across the boundary hyperplane,
  ``x − 2 (w·x + b)/‖w‖² · w`` at ``s = 1``: the point toward whose direction HPR's probe-bias
  ablation rotates (keeping ``‖x‖``, it lands on it only when ``b = 0``).
- **Layers**: probes are trained for every collected layer; the ``top_k`` with the best validation
  probe accuracy are edited (as HPR).

What it keeps: every token with ``P(x) ≥ 0.5`` (bit for bit) and every component orthogonal to ``ŵ``.
The norm is **not** kept in general: the reflection across a boundary that misses the origin
(``b ≠ 0``) is affine, and the token moves along a straight line, not an arc, so for ``s ≠ 1`` it
ends off the sphere of radius ``‖x‖`` even when ``b = 0``. Only
with ``b = 0`` and ``s = 1`` (then the edit is the linear Householder reflection ``x − 2(ŵ·x)ŵ``) is
``‖x'‖ = ‖x‖`` exactly; tests check that case in float32, float16 and bfloat16. ``target`` keeps no norm.

How ``mirror`` differs from HPR and from ``hpr-fixed-angle`` (both bias-free, norm-keeping):

- HPR rotates a gated token by ``s·θ(x)`` inside span{x, ŵ}, ``θ(x)`` from a learned angle MLP,
  along the arc of radius ``‖x‖``; the probe has no bias, so the boundary passes through the origin.
  ``mirror`` has no angle predictor: the distance moved is fixed by the token's own projection,
  ``2s·(τ − p(x))``, along the straight line parallel to ``ŵ``; its boundary has a bias.
  At ``b = 0``, ``s = 1`` both end on the Householder mirror ``Hx`` when HPR's predicted angle is
  exactly ``∠(x, Hx)``; for any other strength or angle their end points differ (chord vs arc).
- ``hpr-fixed-angle`` rotates every gated token by the same angle ``s·γ₀`` (0.5 rad in ``compare``),
  whatever its distance to the boundary: a token just below the boundary and one far below move
  by the same angle, and neither lands on its mirror image except by chance. ``mirror`` moves each
  token by twice its own distance to the boundary (times ``s``), so every gated token lands on
  its own mirror image at ``s = 1``, and the norm changes.

Cost per token and layer: one dot product and one scaled addition, O(d), in float32 (cast back to
the activations' dtype; float16 results are clamped to float16's finite range, so that extreme
strengths never make an infinity). Parameters per layer: ``w`` (d), ``b`` and ``t`` (2 scalars).
Measured strength → KL on SmolLM2, and the grids ``compare`` starts from: docs/methods.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..activations import ActivationStore
from ..architecture import ModelFingerprint
from ..errors import HpreditError
from ..hooks import LayerEdit, token_strength
from ..models import check_device
from .base import (
    FittedLayersEditor,
    TokenPairs,
    check_artifact_tensors,
    choose_layers,
    fitted_layers_from,
    register_editor,
)
from .hpr import HPRConfig, ProbeTrainingConfig, _fit_metrics, _fit_probes, _initial_parameters

__all__ = ["MirrorConfig", "MirrorEditor", "TargetEditor", "finite_in"]


def finite_in(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out`` (float32) cast to ``dtype``; for float16, clamped to its finite range first (float16
    overflows at 65504; bfloat16 and float32 share float32's range)."""
    if dtype == torch.float16:
        big = torch.finfo(torch.float16).max
        out = out.clamp(-big, big)
    return out.to(dtype)


@dataclass
class MirrorConfig(ProbeTrainingConfig):
    """Hyper-parameters of ``mirror`` / ``target``: the probe's training (HPR's defaults) and the layers."""

    def probe_config(self) -> HPRConfig:
        """The HPR config that trains this probe: the same optimiser and schedule, with a bias, no angle MLP."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(ProbeTrainingConfig)}
        return HPRConfig(angle_depth=1, fixed_angle=0.0, probe_bias=True, **shared)


class _ProjectionEditor(FittedLayersEditor):
    """Shared probe, fitting and storage of ``mirror`` and ``target``; subclasses choose the goal."""

    config_class = MirrorConfig
    #: ``mirror``: the goal is the mirror image ``2τ − p``; ``target``: the fixed target projection ``t``
    goal: ClassVar[str] = "mirror"

    def __init__(
        self,
        config: MirrorConfig,
        layers: list[int],
        model: ModelFingerprint,
        fitted_layers: list[int],
        probe: torch.Tensor,
        probe_bias: torch.Tensor,
        target: torch.Tensor,
        metrics: dict | None = None,
    ):
        super().__init__(config, layers, model, metrics)
        self.fitted_layers = list(fitted_layers)
        self.probe = probe  # (L_fit, d): w
        self.probe_bias = probe_bias  # (L_fit,): b
        self.target = target  # (L_fit,): t, in projection units along ŵ

    @property
    def probe_accuracy(self) -> dict[int, float]:
        """Validation probe accuracy per fitted layer."""
        return {int(k): v for k, v in self.metrics.get("val_probe_accuracy", {}).items()}

    def boundary(self, layer: int) -> tuple[torch.Tensor, float, float]:
        """``(ŵ, τ, t)`` of ``layer`` in float32: the unit normal, the boundary's projection ``−b/‖w‖``
        and the target projection."""
        r = self.fitted_layers.index(layer)
        w = self.probe[r].float()
        norm = w.norm().clamp_min(torch.finfo(torch.float32).tiny)
        return w / norm, float(-self.probe_bias[r].float() / norm), float(self.target[r])

    def layer_edit(self, layer: int, device: torch.device, dtype: torch.dtype = torch.float32) -> LayerEdit:
        w_hat, tau, target = self.boundary(layer)
        w_hat = w_hat.to(device)
        mirror = self.goal == "mirror"

        def edit(hidden: torch.Tensor, mask: torch.Tensor | None, strength: float | torch.Tensor) -> torch.Tensor:
            mask, s = token_strength(hidden, mask, strength)
            if s is None:
                return hidden
            x = hidden.float()
            p = x @ w_hat  # the projection on the probe's unit normal
            below = p < tau  # P(x) < 0.5
            step = (2 * tau - 2 * p) if mirror else (target - p)  # goal − p
            out = finite_in(x + (s * step.unsqueeze(-1)) * w_hat, hidden.dtype)
            keep = below if mask is None else below & mask
            return torch.where(keep.unsqueeze(-1), out, hidden)

        return edit

    # ------------------------------------------------------------------ artifact

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"probe": self.probe, "probe_bias": self.probe_bias, "target": self.target}

    @classmethod
    def _from_tensors(cls, config, layers, model, metrics, tensors, artifact):
        fitted = fitted_layers_from(artifact, layers)
        n, d = len(fitted), model.hidden_size
        expected = {"probe": (n, d), "probe_bias": (n,), "target": (n,)}
        check_artifact_tensors(tensors, expected)
        if (tensors["probe"].float().norm(dim=-1) == 0).any():
            raise HpreditError("editor artifact: a probe is the zero vector (no boundary to mirror across)")
        return cls(config, layers, model, fitted, tensors["probe"], tensors["probe_bias"], tensors["target"], metrics)

    # ------------------------------------------------------------------ training

    @classmethod
    def fit(
        cls,
        acts: ActivationStore,
        config: MirrorConfig | None = None,
        progress: bool = True,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> _ProjectionEditor:
        """Train a logistic-regression probe with a bias per layer (HPR's probe training with
        ``probe_bias=True``: AdamW, BCE on aligned positive/negative token pairs, each layer's best
        validation epoch), then the target projection ``t`` (mean ``ŵ·x`` of the positive training
        tokens); keep the ``top_k`` layers by validation probe accuracy (or ``config.layers``).

        Example:
            >>> editor = MirrorEditor.fit(store, epochs=1, top_k=2, progress=False)
            >>> len(editor.layers), sorted(editor.probe_accuracy) == store.layers
            (2, True)
        """
        config = cls.fit_config(acts, config, overrides)
        probe_config = config.probe_config()
        pairs = TokenPairs.of(acts, config.val_fraction, config.seed)
        start = _initial_parameters(len(acts.layers), acts.hidden_size, len(pairs.tp), probe_config)
        start.to(check_device(device) if device is not None else torch.device("cpu"))
        probes = _fit_probes(acts.acts, pairs, start, probe_config, progress)
        accuracy = {layer: float(probes.accuracy[r]) for r, layer in enumerate(acts.layers)}
        layers = choose_layers(accuracy, config.layers, config.top_k)
        probe, bias = probes.probe.cpu(), probes.bias.cpu()
        w_hat = probe / probe.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        target = torch.stack(
            [acts.acts[r, pairs.tp].float().mean(0) @ w_hat[r] for r in range(len(acts.layers))]
        )  # the mean of ŵ·x over the positive tokens, as ŵ·(their mean)
        metrics = _fit_metrics(acts, probe_config, pairs, accuracy, probes, [0.0] * config.epochs)
        for entry in metrics["history"]:
            entry.pop("angle_loss")  # no angle predictor here
        metrics["boundary_projection"] = {
            str(layer): float(-bias[r] / probe[r].norm()) for r, layer in enumerate(acts.layers)
        }
        metrics["target_projection"] = {str(layer): float(target[r]) for r, layer in enumerate(acts.layers)}
        return cls(config, layers, acts.fingerprint, list(acts.layers), probe, bias, target, metrics)


@register_editor
class MirrorEditor(_ProjectionEditor):
    """Steer-to-Mirror-Projection: a token below the boundary moves along ``ŵ`` to ``s`` of the way to
    its mirror image, ``x' = x + 2s·(τ − ŵ·x)·ŵ``."""

    method = "mirror"
    goal = "mirror"


@register_editor
class TargetEditor(_ProjectionEditor):
    """Steer-to-Target-Projection: a token below the boundary moves along ``ŵ`` to ``s`` of the way to
    the target projection, ``x' = x + s·(t − ŵ·x)·ŵ``."""

    method = "target"
    goal = "target"
