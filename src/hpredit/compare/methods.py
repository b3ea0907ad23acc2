"""The method registry: how each method is fitted from the activation stores of one split seed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..activations import ActivationStore
from ..editors import CAAEditor, Editor, HPREditor, ITIEditor, NormRestoreEditor
from ..editors.ablation import AblationEditor
from ..editors.angular import AngularEditor
from ..editors.mirror import MirrorEditor, TargetEditor
from ..editors.spherical import SphericalEditor
from ..models import num_attention_heads

__all__ = ["METHODS", "Method", "SeedFits"]


@dataclass
class SeedFits:
    """Fits shared by several methods of one split seed (HPR's, reused by its inference-only ablations)."""

    hpr: HPREditor | None = None

    def base_hpr(self, stores: Mapping[str, ActivationStore]) -> HPREditor:
        if self.hpr is None:
            self.hpr = HPREditor.fit(stores["residual"], progress=False)
        return self.hpr


Fit = Callable[[Mapping[str, ActivationStore], nn.Module, SeedFits], list[Editor]]


@dataclass(frozen=True)
class Method:
    """How to fit one method from collected stores, and the strengths tried on validation."""

    name: str
    site: str | None  #: activation site it fits on (None: no editor)
    fit: Fit | None  #: candidate editors (e.g. ITI's K values)
    strengths: tuple[float, ...] = (1.0,)
    note: str = field(default="")
    #: which group the method belongs to: HPR's paired difference is also reported against the best
    #: of each group (``rotation family``: the norm-keeping or boundary-selective methods since HPR)
    family: str = "baseline"


def _hpr(**overrides) -> Fit:
    def fit(stores, model, shared):
        return [HPREditor.fit(stores["residual"], progress=False, **overrides)]

    return fit


def _hpr_inference_variant(**overrides) -> Fit:
    """An ablation that changes only inference (gate, fixed angle): training is the same as HPR's
    (the probes train independently of the angle predictor), so reuse HPR's fit of this seed."""

    def fit(stores, model, shared):
        base = shared.base_hpr(stores)
        config = dataclasses.replace(base.config, **overrides)
        keep_mlp = config.fixed_angle is None
        return [
            HPREditor(
                config,
                base.layers,
                base.model_fingerprint,
                base.fitted_layers,
                base.probe,
                base.weights if keep_mlp else [],
                base.biases if keep_mlp else [],
                dict(base.metrics),
            )
        ]

    return fit


def _additive(cls) -> Fit:
    def fit(stores, model, shared):
        return [cls.fit(stores["residual"], progress=False)]

    return fit


def _residual(cls: type[Editor], **overrides) -> Fit:
    """One editor of ``cls`` fitted on the residual store with ``overrides`` (mirror, target, ablation, ACE)."""

    def fit(stores, model, shared):
        return [cls.fit(stores["residual"], progress=False, **overrides)]

    return fit


def _iti(stores, model, shared) -> list[Editor]:
    acts = stores["heads"]
    H = num_attention_heads(model)
    k0 = max(1, round(48 * len(acts.layers) * H / 1024))
    return [ITIEditor.fit(acts, num_attention_heads=H, num_heads=k) for k in (k0,)]


METHODS: dict[str, Method] = {
    "none": Method("none", None, None, note="the unedited model", family="unedited"),
    "hpr": Method(
        "hpr",
        "residual",
        _hpr_inference_variant(),
        (0.25, 0.5, 1.0),
        "HPR as published: gated rotation by the predicted angle",
        family="hpr",
    ),
    "hpr-no-gate": Method(
        "hpr-no-gate",
        "residual",
        _hpr_inference_variant(gate=False),
        (0.25, 0.5, 1.0),
        "ablation: every token rotated",
        family="hpr ablation",
    ),
    "hpr-fixed-angle": Method(
        "hpr-fixed-angle",
        "residual",
        _hpr_inference_variant(fixed_angle=0.5),
        (0.125, 0.25, 0.5),
        "ablation: a fixed 0.5 rad (×strength) instead of the angle predictor",
        family="hpr ablation",
    ),
    "hpr-bias": Method(
        "hpr-bias",
        "residual",
        _hpr(probe_bias=True),
        (0.25, 0.5, 1.0),
        "ablation: probe with a bias (affine reflection)",
        family="hpr ablation",
    ),
    "caa": Method("caa", "residual", _additive(CAAEditor), (0.5, 1.0, 2.0), "x + αv, v = mean difference"),
    "caa-norm": Method(
        "caa-norm", "residual", _additive(NormRestoreEditor), (0.5, 1.0, 2.0), "x + αv with the norm restored"
    ),
    "mirror": Method(
        "mirror",
        "residual",
        _residual(MirrorEditor),
        (4.0, 8.0, 12.0),
        "StMP: tokens below a biased probe's boundary moved along ŵ toward their mirror (fraction of the way)",
        family="rotation family",
    ),
    "target": Method(
        "target",
        "residual",
        _residual(TargetEditor),
        (4.0, 8.0, 16.0),
        "StTP: tokens below the boundary moved along ŵ toward the positive mean projection (fraction of the way)",
        family="rotation family",
    ),
    "ablation": Method(
        "ablation",
        "residual",
        _residual(AblationEditor),
        (1.0, 2.0, 2.5),
        "directional ablation of the mean difference (strength: fraction removed; > 1 over-removes)",
        family="rotation family",
    ),
    "ace": Method(
        "ace",
        "residual",
        _residual(AblationEditor, affine=True),
        (1.0, 2.0, 3.0),
        "ACE: projection moved toward the negative mean's + α‖r‖ (α = 1: the positive mean's; fraction of the way)",
        family="rotation family",
    ),
    "angular": Method(
        "angular",
        "residual",
        _residual(AngularEditor),
        (0.0625, 0.25, 1.0),  # SmolLM2, every layer: KL 0.045 / 0.23 / 0.49 (1 is the whole edit: its most)
        "Angular Steering, every layer: the (b1, b2)-plane part turned toward b1 (strength: the fraction of "
        "the way, ≥ 1 lands on it)",
        family="rotation family",
    ),
    "spherical": Method(
        "spherical",
        "residual",
        _residual(SphericalEditor),
        (0.1, 0.2, 0.4),  # SmolLM2, 5 layers: KL 0.057 / 0.23 / 1.05
        "Spherical Steering: slerp toward μ_T by α × the vMF confidence gate of the angle (strength: α)",
        family="rotation family",
    ),
    "iti": Method("iti", "heads", _iti, (0.05, 0.1, 0.25), "ITI: top-K heads shifted by α·σ·v (α = 15 × strength)"),
}
