"""Additive baselines on the residual stream: CAA (mean difference) and its norm-restoring variant.

CAA (Rimsky et al. 2024): ``v = mean(positive) − mean(negative)`` per layer, ``x' = x + α v``.
Norm restore: ``x' = (x + α v) · ‖x‖ / ‖x + α v‖`` — isolates "keep the norm" from "rotate in the
probe's plane". Both fit on the same :class:`~hpredit.activations.ActivationStore` as HPR.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..activations import ActivationStore
from ..architecture import ModelFingerprint
from ..errors import HpreditError
from ..hooks import LayerEdit, token_strength
from .base import (
    EditorConfig,
    FittedLayersEditor,
    TokenPairs,
    choose_layers,
    fitted_layers_from,
    register_editor,
)

__all__ = ["AdditiveConfig", "CAAEditor", "NormRestoreEditor", "mean_difference_fit"]


@dataclass
class AdditiveConfig(EditorConfig):
    """Hyper-parameters of the additive editors."""

    top_k: int = 5  #: layers kept by validation pair accuracy (ignored when ``layers`` is given)
    layers: list[int] | None = None  #: explicit layers to edit
    val_fraction: float = 0.2  #: groups held out for validation when no pair is marked ``val``
    seed: int = 42

    def checks(self) -> list[tuple[bool, str]]:
        return self.layer_choice_checks()


def mean_difference_fit(
    acts: ActivationStore, val_fraction: float, seed: int
) -> tuple[torch.Tensor, dict[int, float], TokenPairs]:
    """Per collected layer, the mean difference ``mean(positive) − mean(negative)`` of the training
    token pairs ``(L, d)`` (float32), the validation pair accuracy along it (the fraction of
    held-out token pairs whose positive token projects further than its negative one: CAA's rule)
    and the split used."""
    split = TokenPairs.of(acts, val_fraction, seed)
    tp, tn, vp, vn = split.tp, split.tn, split.vp, split.vn
    vectors = torch.stack(
        [acts.acts[r, tp].float().mean(0) - acts.acts[r, tn].float().mean(0) for r in range(len(acts.layers))]
    )
    accuracy = {}
    for r, layer in enumerate(acts.layers):
        diff = acts.acts[r, vp].float() - acts.acts[r, vn].float()
        accuracy[layer] = float(((diff @ vectors[r]) > 0).float().mean())
    return vectors, accuracy, split


class _AdditiveEditor(FittedLayersEditor):
    """Shared fitting, storage and selection; subclasses choose the transform."""

    config_class = AdditiveConfig
    restore_norm: ClassVar[bool] = False

    def __init__(
        self,
        config: AdditiveConfig,
        layers: list[int],
        model: ModelFingerprint,
        fitted_layers: list[int],
        vectors: torch.Tensor,
        metrics: dict | None = None,
    ):
        super().__init__(config, layers, model, metrics)
        self.fitted_layers = list(fitted_layers)
        self.vectors = vectors  # (L_fit, d)

    def vector(self, layer: int) -> torch.Tensor:
        """The steering vector ``(d,)`` of ``layer``."""
        return self.vectors[self.fitted_layers.index(layer)]

    def layer_edit(self, layer: int, device: torch.device, dtype: torch.dtype = torch.float32) -> LayerEdit:
        v = self.vector(layer).to(device=device, dtype=torch.float32)
        restore = self.restore_norm

        def edit(hidden: torch.Tensor, mask: torch.Tensor | None, strength: float | torch.Tensor) -> torch.Tensor:
            mask, s = token_strength(hidden, mask, strength)
            if s is None:
                return hidden
            x = hidden.float()
            out = x + s * v
            if restore:
                out = out * (x.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            out = out.to(hidden.dtype)
            return out if mask is None else torch.where(mask.unsqueeze(-1), out, hidden)

        return edit

    def edit(
        self, layer: int, x: torch.Tensor, strength: float | torch.Tensor = 1.0, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Edit activations ``x`` (..., d) of ``layer`` as attach() does."""
        return self.layer_edit(layer, x.device)(x, mask, strength)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vectors": self.vectors}

    @classmethod
    def _from_tensors(cls, config, layers, model, metrics, tensors, artifact):
        fitted = fitted_layers_from(artifact, layers)
        expected = (len(fitted), model.hidden_size)
        if set(tensors) != {"vectors"} or tuple(tensors["vectors"].shape) != expected:
            raise HpreditError(f"editor artifact: expected one tensor 'vectors' of shape {expected}")
        if not torch.isfinite(tensors["vectors"]).all():
            raise HpreditError("editor artifact: tensor vectors contains NaN or inf")
        return cls(config, layers, model, fitted, tensors["vectors"], metrics)

    @classmethod
    def fit(
        cls, acts: ActivationStore, config: AdditiveConfig | None = None, progress: bool = True, **overrides
    ) -> _AdditiveEditor:
        """Mean difference of the positive and negative completion tokens per layer, on train pairs.

        Layers are ranked by validation pair accuracy: the fraction of aligned token pairs whose
        positive token projects further along ``v`` than its negative one.
        """
        config = cls.fit_config(acts, config, overrides)
        vectors, accuracy, split = mean_difference_fit(acts, config.val_fraction, config.seed)
        tp, vp = split.tp, split.vp
        layers = choose_layers(accuracy, config.layers, config.top_k)
        metrics = {
            "val_pair_accuracy": {str(k): v for k, v in accuracy.items()},
            "train_token_pairs": len(tp),
            "val_token_pairs": len(vp),
            "vector_norm": {str(layer): float(vectors[r].norm()) for r, layer in enumerate(acts.layers)},
        }
        return cls(config, layers, acts.fingerprint, list(acts.layers), vectors, metrics)


@register_editor
class CAAEditor(_AdditiveEditor):
    """Contrastive Activation Addition: ``x' = x + α v`` with ``v`` the mean difference."""

    method = "caa"


@register_editor
class NormRestoreEditor(_AdditiveEditor):
    """Addition with the norm put back: ``x' = (x + α v)·‖x‖/‖x + α v‖``."""

    method = "caa-norm"
    restore_norm = True
