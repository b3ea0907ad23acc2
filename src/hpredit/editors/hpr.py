"""Householder Pseudo-Rotation (Pham & Nguyen, EMNLP 2024): the editor and its training.

Per layer: a bias-free probe ``w`` (hyperplane through the origin) and an angle predictor
``θ(x) = π·sigmoid(MLP(x))``. Tokens on the negative side (``w·x < 0``) are rotated by ``α·θ(x)``
toward their reflection across the hyperplane; the norm is kept exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..activations import ActivationStore
from ..architecture import ModelFingerprint
from ..errors import HpreditError
from ..geometry import angle_between, fallback_axis, pseudo_rotate, rotate_toward
from ..hooks import LayerEdit, broadcast_strength
from ..kernels import hpr_edit
from ..models import check_device
from .base import (
    EditorConfig,
    FittedLayersEditor,
    TokenPairs,
    choose_layers,
    fitted_layers_from,
    is_int,
    is_number,
    register_editor,
)

__all__ = ["HPRConfig", "HPREditor"]


@dataclass
class ProbeTrainingConfig(EditorConfig):
    """What every editor that trains a probe per layer shares: the optimiser and schedule (the HPR
    reference implementation's defaults) and the choice of layers."""

    lr: float = 5e-4
    weight_decay: float = 0.0
    epochs: int = 5
    warmup_ratio: float = 0.05
    batch_size: int = 16  #: token pairs per step
    seed: int = 42
    top_k: int = 5  #: layers kept by validation probe accuracy (ignored when ``layers`` is given)
    layers: list[int] | None = None  #: explicit layers to edit
    val_fraction: float = 0.2  #: groups held out for validation when no pair is marked ``val``

    def checks(self) -> list[tuple[bool, str]]:
        return self.probe_training_checks()

    def probe_training_checks(self) -> list[tuple[bool, str]]:
        return [
            (is_number(self.lr) and self.lr > 0, "lr must be > 0"),
            (is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be ≥ 0"),
            (is_int(self.epochs) and self.epochs >= 1, "epochs must be an integer ≥ 1"),
            (is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (is_int(self.batch_size) and self.batch_size >= 1, "batch_size must be an integer ≥ 1"),
            *self.layer_choice_checks(),
        ]


@dataclass
class HPRConfig(ProbeTrainingConfig):
    """Hyper-parameters of HPR; the defaults are the reference implementation's."""

    angle_depth: int = 4  #: linear layers of the angle MLP: d → d/2 → d/4 → d/8 → 1 for 4
    angle_layers: str = "selected"  #: fit angle predictors for the ``selected`` layers or ``all``
    # Ablations (all off for HPR as published):
    gate: bool = True  #: False: rotate every token, not only those on the negative side
    fixed_angle: float | None = None  #: a constant angle (radians) instead of the angle predictor
    probe_bias: bool = False  #: give the probe a bias: the "reflection" becomes affine (norm not kept)

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (is_int(self.angle_depth) and self.angle_depth >= 1, "angle_depth must be an integer ≥ 1"),
            *self.probe_training_checks(),
            (self.angle_layers in ("selected", "all"), "angle_layers must be 'selected' or 'all'"),
            (isinstance(self.gate, bool), "gate must be true or false"),
            (
                self.fixed_angle is None or (is_number(self.fixed_angle) and 0 <= self.fixed_angle <= math.pi),
                "fixed_angle must be null or an angle in [0, π]",
            ),
            (isinstance(self.probe_bias, bool), "probe_bias must be true or false"),
        ]

    def mlp_widths(self, d: int) -> list[int]:
        """Widths ``[d, d/2, …, 1]`` of the angle predictor."""
        widths = [d]
        for _ in range(self.angle_depth - 1):
            widths.append(max(1, widths[-1] // 2))
        return widths + [1]


def _mlp(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """Batched per-layer MLP: ``x`` (L, n, d) with ``weights[j]`` (L, out, in) → (L, n)."""
    for j, (w, b) in enumerate(zip(weights, biases)):
        x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
        if j < len(weights) - 1:
            x = F.gelu(x)
    return x.squeeze(-1)


@register_editor
class HPREditor(FittedLayersEditor):
    """HPR editor: per-layer probe + angle predictor; see :meth:`fit` and :meth:`attach`."""

    method = "hpr"
    config_class = HPRConfig
    #: the fast path's row-wise step: ``auto`` (Triton kernel on CUDA when available), ``triton`` or
    #: ``torch`` (see :data:`hpredit.kernels.BACKENDS`); set per instance to compare them
    kernel_backend: str = "auto"
    #: the fast path's hidden angle-MLP layers for 16-bit activations: ``auto`` (float16 on CUDA:
    #: bfloat16's speed, ~1.4× the reference's error at the worst token; float32 elsewhere),
    #: ``float16``, ``float32`` or ``model`` (the activations' dtype: ~10× the error in bfloat16);
    #: see :data:`hpredit.kernels.PRECISIONS`
    mlp_precision: str = "auto"

    def __init__(
        self,
        config: HPRConfig,
        layers: list[int],
        model: ModelFingerprint,
        fitted_layers: list[int],
        probe: torch.Tensor,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor],
        metrics: dict | None = None,
        probe_bias: torch.Tensor | None = None,
    ):
        super().__init__(config, layers, model, metrics)
        self.fitted_layers = list(fitted_layers)
        self.probe = probe  # (L_fit, d)
        self.weights = weights  # [(L_fit, out, in)], empty with a fixed angle
        self.biases = biases  # [(L_fit, out)]
        self.probe_bias = probe_bias  # (L_fit,) only for the probe-bias ablation

    # ------------------------------------------------------------------ inference

    @property
    def probe_accuracy(self) -> dict[int, float]:
        """Validation probe accuracy per fitted layer."""
        return {int(k): v for k, v in self.metrics.get("val_probe_accuracy", {}).items()}

    def _row(self, layer: int) -> int:
        return self.fitted_layers.index(layer)

    def angle(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Predicted angle θ(x) ∈ (0, π) for activations ``x`` (..., d) at ``layer``."""
        if self.config.fixed_angle is not None:
            return torch.full(x.shape[:-1], float(self.config.fixed_angle), device=x.device)
        r = self._row(layer)
        flat = x.float().reshape(1, -1, x.shape[-1])
        weights = [w[r : r + 1].to(x.device) for w in self.weights]
        out = _mlp(flat, weights, [b[r : r + 1].to(x.device) for b in self.biases])
        return math.pi * torch.sigmoid(out).reshape(x.shape[:-1])

    def edit(
        self,
        layer: int,
        x: torch.Tensor,
        strength: float | torch.Tensor = 1.0,
        mask: torch.Tensor | None = None,
        fast: bool = True,
    ) -> torch.Tensor:
        """Edit activations ``x`` (..., d) of ``layer`` as attach() does (``fast=False``: the reference path)."""
        return self.layer_edit(layer, x.device, x.dtype, fast=fast)(x, mask, strength)

    def layer_edit(
        self, layer: int, device: torch.device, dtype: torch.dtype = torch.float32, fast: bool = True
    ) -> LayerEdit:
        """The edit of one layer for activations of ``dtype`` on ``device``.

        ``fast`` (default): the fused edit of :func:`hpredit.kernels.hpr_edit` — every constant
        prepared here once, the angle MLP in float16 on CUDA (:attr:`mlp_precision`), the rotation as
        ``a·x + b·ŵ + c·u`` from two float32 reductions (see
        :func:`~hpredit.geometry.pseudo_rotate_coefficients`) in one Triton kernel on a GPU, no
        host sync and no data-dependent Python branch; under ``torch.compile`` that kernel stays one
        custom op. ``fast=False``: the reference — everything in float32 through
        :func:`~hpredit.geometry.pseudo_rotate`. Both agree to the rounding of ``dtype`` (tested).
        The probe-bias ablation always takes the reference path. ``strength`` may be a number or
        per-token strengths broadcastable to ``hidden.shape[:-1]``.
        """
        if fast and self.probe_bias is None:
            return self._fast_edit(layer, device, dtype)
        return self._reference_edit(layer, device)

    def _reference_edit(self, layer: int, device: torch.device) -> LayerEdit:
        r = self._row(layer)
        w = self.probe[r].to(device=device, dtype=torch.float32)
        weights = [m[r : r + 1].to(device=device, dtype=torch.float32) for m in self.weights]
        biases = [b[r : r + 1].to(device=device, dtype=torch.float32) for b in self.biases]
        cfg = self.config
        bias = None if self.probe_bias is None else float(self.probe_bias[r])

        def edit(hidden: torch.Tensor, mask: torch.Tensor | None, strength: float | torch.Tensor) -> torch.Tensor:
            x = hidden.float()
            score = x @ w if bias is None else x @ w + bias
            gate = score < 0 if cfg.gate else torch.ones_like(score, dtype=torch.bool)  # p(x) < 0.5
            if mask is not None:
                gate = gate & mask
            if isinstance(strength, torch.Tensor):  # per token; strength 0 leaves the token as it is
                strength = broadcast_strength(strength, x.shape[:-1], x.device)
                gate = gate & (strength != 0)
            if cfg.fixed_angle is not None:
                theta = torch.full_like(score, float(cfg.fixed_angle))
            else:
                z = _mlp(x.reshape(1, -1, x.shape[-1]), weights, biases)
                theta = math.pi * torch.sigmoid(z).reshape(x.shape[:-1])
            if bias is None:
                rotated = pseudo_rotate(x, w, strength * theta)
            else:  # toward the affine mirror image x − 2 (w·x + b)/‖w‖² w
                target = x - (2 * score / (w @ w)).unsqueeze(-1) * w
                rotated = rotate_toward(x, target, strength * theta)
            return torch.where(gate.unsqueeze(-1), rotated.to(hidden.dtype), hidden)

        return edit

    def _fast_edit(self, layer: int, device: torch.device, dtype: torch.dtype) -> LayerEdit:
        r = self._row(layer)
        w = self.probe[r].to(device=device, dtype=torch.float32)
        w_hat = w / w.norm().clamp_min(1e-12)
        return hpr_edit(
            w_hat,
            fallback_axis(w_hat),
            [m[r] for m in self.weights],
            [b[r] for b in self.biases],
            fixed_angle=self.config.fixed_angle,
            gated=self.config.gate,
            dtype=dtype,
            backend=self.kernel_backend,
            precision=self.mlp_precision,
        )

    # ------------------------------------------------------------------ artifact

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"probe": self.probe}
        if self.probe_bias is not None:
            out["probe_bias"] = self.probe_bias
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"angle.{j}.weight"] = w
            out[f"angle.{j}.bias"] = b
        return out

    @classmethod
    def _from_tensors(cls, config, layers, model, metrics, tensors, artifact):
        where = "editor artifact"
        fitted = fitted_layers_from(artifact, layers)
        d, n = model.hidden_size, len(fitted)
        widths = config.mlp_widths(d) if config.fixed_angle is None else [d]
        expected = {"probe": (n, d)}
        if config.probe_bias:
            expected["probe_bias"] = (n,)
        for j in range(len(widths) - 1):
            expected[f"angle.{j}.weight"] = (n, widths[j + 1], widths[j])
            expected[f"angle.{j}.bias"] = (n, widths[j + 1])
        if set(tensors) != set(expected):
            raise HpreditError(
                f"{where}: tensors {sorted(tensors)} do not match the config (expected {sorted(expected)})"
            )
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise HpreditError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
            if not torch.isfinite(tensors[name]).all():
                raise HpreditError(f"{where}: tensor {name} contains NaN or inf")
        depth = len(widths) - 1
        return cls(
            config,
            layers,
            model,
            fitted,
            tensors["probe"],
            [tensors[f"angle.{j}.weight"] for j in range(depth)],
            [tensors[f"angle.{j}.bias"] for j in range(depth)],
            metrics,
            tensors.get("probe_bias"),
        )

    def select_layers(self, layers: list[int]) -> HPREditor:
        """A copy of this editor that edits ``layers`` (any of the fitted ones)."""
        unknown = [i for i in layers if i not in self.fitted_layers]
        if unknown or not layers:
            raise HpreditError(f"cannot select layers {layers}: fitted layers are {self.fitted_layers}")
        return HPREditor(
            self.config,
            sorted(layers),
            self.model_fingerprint,
            self.fitted_layers,
            self.probe,
            self.weights,
            self.biases,
            dict(self.metrics),
            self.probe_bias,
        )

    # ------------------------------------------------------------------ training

    @classmethod
    def fit(
        cls,
        acts: ActivationStore,
        config: HPRConfig | None = None,
        progress: bool = True,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> HPREditor:
        """Train probes and angle predictors on collected activations, then pick the layers.

        Pairs marked ``val`` in ``acts`` validate; without them ``config.val_fraction`` of the
        groups (questions) is held out, seeded. Loss = mean over layers of BCE(probe) + MSE(angle);
        all layers train together in batched tensor ops, and each layer keeps the epoch with its
        best validation probe accuracy. The top-k layers (or ``config.layers``) are active.

        Probe and angle terms share no parameters, so two batched phases give exactly the joint result: all
        layers' probes (cheap), then angle predictors for the chosen layers (all with ``angle_layers="all"``),
        replaying the same batches, learning-rate schedule and per-layer best epochs.

        Args:
            acts: residual activations from :func:`~hpredit.collect_activations`.
            config: hyper-parameters (default: the reference implementation's, :class:`HPRConfig`).
            progress: show progress bars.
            device: where to train (default: the CPU); e.g. ``"cuda"``. The store stays where it is
                and each step's token pairs are copied over; the initial parameters and batch orders
                are drawn on the CPU, so every device starts from the same values.
            **overrides: fields of ``config`` to change, e.g. ``epochs=2`` or ``layers=[10, 12]``.

        Returns:
            The fitted editor; ``metrics`` holds the validation probe accuracy per layer, the best
            epochs and the loss history.

        Example:
            >>> editor = HPREditor.fit(store, epochs=1, angle_depth=2, top_k=2, progress=False)
            >>> len(editor.layers), sorted(editor.probe_accuracy) == store.layers
            (2, True)
        """
        config = cls.fit_config(acts, config, overrides)
        pairs = TokenPairs.of(acts, config.val_fraction, config.seed)
        start = _start_on(device, acts, pairs, config)
        probes = _fit_probes(acts.acts, pairs, start, config, progress)
        accuracy = {layer: float(probes.accuracy[r]) for r, layer in enumerate(acts.layers)}
        layers = choose_layers(accuracy, config.layers, config.top_k)
        fitted, rows = _angle_layers(acts.layers, layers, config)
        weights, biases, angle_losses = _fit_angle_predictors(
            acts.acts, pairs, start, rows, probes.best_epoch, config, progress
        )
        metrics = _fit_metrics(acts, config, pairs, accuracy, probes, angle_losses)
        return cls(
            config,
            layers,
            acts.fingerprint,
            fitted,
            probes.probe[rows].cpu(),
            [w.cpu() for w in weights],
            [b.cpu() for b in biases],
            metrics,
            probes.bias[rows].cpu() if config.probe_bias else None,
        )


# --------------------------------------------------------------------------- training stages


@dataclass
class _Start:
    """Initial parameters of every layer and the per-epoch batch orders, all from one seeded generator."""

    probe: torch.Tensor  # (L, d)
    bias: torch.Tensor  # (L,), trained only for the probe-bias ablation
    weights: list[torch.Tensor]  # angle MLP, [(L, out, in)]
    biases: list[torch.Tensor]  # [(L, out)]
    orders: list[torch.Tensor]  # one permutation of the training token pairs per epoch
    steps: int  # optimiser steps over all epochs

    def to(self, device: torch.device) -> None:
        """Move the parameters (not the batch orders, which index the CPU store) to ``device``."""
        self.probe, self.bias = self.probe.to(device), self.bias.to(device)
        self.weights = [w.to(device) for w in self.weights]
        self.biases = [b.to(device) for b in self.biases]


def _initial_parameters(L: int, d: int, n_pairs: int, config: HPRConfig) -> _Start:
    """PyTorch's default ``nn.Linear`` initialisation (uniform ±1/√fan_in), drawn in a fixed order."""
    gen = torch.Generator().manual_seed(config.seed)
    widths = config.mlp_widths(d)
    bound = 1 / math.sqrt(d)
    probe = (torch.rand(L, d, generator=gen) * 2 - 1) * bound
    weights, biases = [], []
    for j in range(len(widths) - 1):
        b = 1 / math.sqrt(widths[j])
        weights.append((torch.rand(L, widths[j + 1], widths[j], generator=gen) * 2 - 1) * b)
        biases.append((torch.rand(L, widths[j + 1], generator=gen) * 2 - 1) * b)
    orders = [torch.randperm(n_pairs, generator=gen) for _ in range(config.epochs)]
    steps = math.ceil(n_pairs / config.batch_size) * config.epochs
    return _Start(probe, torch.zeros(L), weights, biases, orders, steps)


def _start_on(device: str | torch.device | None, acts: ActivationStore, pairs: TokenPairs, config: HPRConfig) -> _Start:
    """The initial parameters (drawn on the CPU, the same on every device), moved to ``device`` (default: the CPU)."""
    start = _initial_parameters(len(acts.layers), acts.hidden_size, len(pairs.tp), config)
    start.to(check_device(device) if device is not None else torch.device("cpu"))
    return start


def _angle_layers(stored: list[int], chosen: list[int], config: HPRConfig) -> tuple[list[int], torch.Tensor]:
    """The layers whose angle predictors are fitted (the chosen ones, or all stored) and their rows in the store."""
    fitted = list(stored) if config.angle_layers == "all" else chosen
    return fitted, torch.tensor([stored.index(i) for i in fitted])


@dataclass
class _Probes:
    """Each layer's probe at its best validation epoch."""

    probe: torch.Tensor  # (L, d)
    bias: torch.Tensor  # (L,)
    accuracy: torch.Tensor  # (L,) best validation accuracy
    best_epoch: torch.Tensor  # (L,) first epoch (0-based) reaching it
    history: list[torch.Tensor]  # validation accuracy (L,) after each epoch
    losses: list[float]  # mean loss per epoch


def _fit_probes(X: torch.Tensor, pairs: TokenPairs, start: _Start, config: HPRConfig, progress: bool) -> _Probes:
    """Phase 1: the probes of every layer; each layer's loss is divided by L as in the joint mean."""
    L = X.shape[0]
    device = start.probe.device
    ones = torch.ones(config.batch_size, device=device)

    def probe_loss(z: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, params) -> torch.Tensor:
        n = len(idx)
        y = torch.cat([ones[:n], torch.zeros(n, device=device)]).expand(z.shape[0], -1)
        logits = torch.einsum("lnd,ld->ln", z, params[0])
        if config.probe_bias:
            logits = logits + params[1].unsqueeze(1)
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1).sum() / L

    history: list[torch.Tensor] = []
    best_probe, best_bias = start.probe.clone(), start.bias.clone()
    best_acc = torch.full((L,), -1.0, device=device)

    def after_epoch(epoch: int, params) -> str:
        nonlocal best_acc
        b = params[1].detach() if config.probe_bias else None
        acc = _probe_accuracy(X, params[0].detach(), pairs.vp, pairs.vn, bias=b)
        history.append(acc)
        better = acc > best_acc
        best_probe[better] = params[0].detach()[better]
        if b is not None:
            best_bias[better] = b[better]
        best_acc = torch.where(better, acc, best_acc)
        return f"val_acc={float(acc.mean()):.3f}"

    params = [start.probe, start.bias] if config.probe_bias else [start.probe]
    losses = _train(
        X,
        torch.arange(L),
        pairs.tp,
        pairs.tn,
        start.orders,
        params,
        probe_loss,
        config,
        start.steps,
        after_epoch,
        progress,
        f"training probes ({L} layers)",
    )
    best_epoch = torch.stack(history).argmax(0)  # first epoch reaching the best accuracy
    return _Probes(best_probe, best_bias, best_acc, best_epoch, history, losses)


def _fit_angle_predictors(
    X: torch.Tensor,
    pairs: TokenPairs,
    start: _Start,
    rows: torch.Tensor,
    best_epoch: torch.Tensor,
    config: HPRConfig,
    progress: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """Phase 2: angle predictors of the layers ``rows``, replaying phase 1's batches and schedule;
    each layer keeps the parameters of its best probe epoch. Returns ``(weights, biases, losses)``."""
    L = X.shape[0]
    if config.fixed_angle is not None:  # ablation: no angle predictor at all
        return [], [], [0.0] * config.epochs
    device = start.probe.device
    target = torch.stack([_pair_angles(X[r], pairs.tp, pairs.tn, device) for r in rows.tolist()])  # (k, M)
    mlp_w = [w[rows].clone() for w in start.weights]
    mlp_b = [b[rows].clone() for b in start.biases]
    best_w = [w.clone() for w in mlp_w]
    best_b = [b.clone() for b in mlp_b]
    epoch_of = best_epoch[rows]

    def angle_loss(z: torch.Tensor, idx: torch.Tensor, _rows, params) -> torch.Tensor:
        n = len(idx)
        depth = len(params) // 2
        theta = math.pi * torch.sigmoid(_mlp(z, params[:depth], params[depth:]))
        tgt = torch.cat([torch.zeros(z.shape[0], n, device=device), target[:, idx.to(device)]], dim=1)
        return ((theta - tgt) ** 2).mean(1).sum() / L

    def after_epoch(epoch: int, params) -> str:
        keep = epoch_of == epoch
        depth = len(params) // 2
        for bw, p in zip(best_w + best_b, params[:depth] + params[depth:]):
            bw[keep] = p.detach()[keep]
        return ""

    losses = [0.0] * config.epochs
    if mlp_w:
        losses = _train(
            X,
            rows,
            pairs.tp,
            pairs.tn,
            start.orders,
            [*mlp_w, *mlp_b],
            angle_loss,
            config,
            start.steps,
            after_epoch,
            progress,
            f"training angle predictors ({len(rows)} layers)",
        )
    return best_w, best_b, losses


def _fit_metrics(
    acts: ActivationStore,
    config: HPRConfig,
    pairs: TokenPairs,
    accuracy: dict[int, float],
    probes: _Probes,
    angle_losses: list[float],
) -> dict:
    """What ``fit`` reports: validation accuracy and best epoch per layer, data sizes, loss history."""
    n_groups = lambda m: int(torch.unique(acts.groups[m]).numel())  # noqa: E731
    held_out = f"held-out {config.val_fraction:.0%} of groups"
    return {
        "val_probe_accuracy": {str(k): v for k, v in accuracy.items()},
        "best_epoch": {str(layer): int(probes.best_epoch[r]) + 1 for r, layer in enumerate(acts.layers)},
        "validation": "val split"
        if any(s == "val" for s in acts.splits)
        else held_out
        if pairs.val_mask.any()
        else "the training pairs (fewer than 2 groups: none held out)",
        "train_token_pairs": len(pairs.tp),
        "val_token_pairs": len(pairs.vp),
        "train_groups": n_groups(pairs.train_mask),
        "val_groups": n_groups(pairs.val_mask),
        "history": [
            {
                "epoch": e + 1,
                "probe_loss": probes.losses[e],
                "angle_loss": angle_losses[e],
                "val_probe_accuracy_mean": float(probes.history[e].mean()),
            }
            for e in range(config.epochs)
        ],
    }


def _train(
    X, rows, tp, tn, orders, params, loss_fn, config: HPRConfig, total: int, after_epoch, progress: bool, desc: str
) -> list[float]:
    """One batched AdamW training loop over token pairs; returns the mean loss per epoch.

    ``X[rows]`` are the layers trained; each step gathers the same token pairs for all of them.
    Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0 (the reference).
    """
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    warmup = int(config.warmup_ratio * total)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    Xr = X[rows] if len(rows) != X.shape[0] else X
    device = params[0].device
    losses = []
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress)
    for epoch, order in enumerate(orders):
        running = torch.zeros((), device=device)
        n_steps = 0
        for s in range(0, len(order), config.batch_size):
            idx = order[s : s + config.batch_size]
            z = torch.cat([Xr[:, tp[idx]], Xr[:, tn[idx]]], dim=1).to(device, non_blocking=True).float()  # (k, 2B, d)
            loss = loss_fn(z, idx, rows, params)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.detach()
            n_steps += 1
            bar.update(1)
        losses.append(float(running) / n_steps)
        note = after_epoch(epoch, params)
        bar.set_postfix_str(f"loss={losses[-1]:.4f} {note}".strip())
    bar.close()
    for p in params:
        p.requires_grad_(False)
    return losses


def _pair_angles(
    x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, device: torch.device | None = None, chunk: int = 65536
) -> torch.Tensor:
    """∠(negative, positive) per token pair, the angle target of the negative tokens (on ``device``)."""
    device = device or x.device
    return (
        torch.cat(
            [
                angle_between(x[neg[i : i + chunk]].to(device).float(), x[pos[i : i + chunk]].to(device).float())
                for i in range(0, len(pos), chunk)
            ]
        )
        if len(pos)
        else torch.zeros(0, device=device)
    )


@torch.no_grad()
def _probe_accuracy(
    X: torch.Tensor,
    probe: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    chunk: int = 8192,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-layer probe accuracy: positives on ``w·x (+ b) > 0``, negatives on ``< 0``."""
    device = probe.device
    correct = torch.zeros(X.shape[0], device=device)
    b = torch.zeros(X.shape[0], device=device) if bias is None else bias
    for i in range(0, len(pos), chunk):
        p = torch.einsum("lnd,ld->ln", X[:, pos[i : i + chunk]].to(device).float(), probe) + b[:, None]
        n = torch.einsum("lnd,ld->ln", X[:, neg[i : i + chunk]].to(device).float(), probe) + b[:, None]
        correct += (p > 0).sum(1) + (n < 0).sum(1)
    return correct / (2 * len(pos))
