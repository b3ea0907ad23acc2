"""Householder Pseudo-Rotation (Pham & Nguyen, EMNLP 2024): the editor and its training.

Per layer: a bias-free probe ``w`` (hyperplane through the origin) and an angle predictor
``θ(x) = π·sigmoid(MLP(x))``. Tokens on the negative side (``w·x < 0``) are rotated by ``α·θ(x)``
toward their reflection across the hyperplane; the norm is kept exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..activations import ActivationStore
from ..errors import HpreditError
from ..geometry import angle_between, fallback_axis, pseudo_rotate, pseudo_rotate_coefficients, rotate_toward
from ..hooks import LayerEdit
from ..models import ModelFingerprint
from .base import Editor, fitted_layers_from, register_editor, train_val_masks

__all__ = ["HPRConfig", "HPREditor"]


@dataclass
class HPRConfig:
    """Hyper-parameters of HPR; the defaults are the reference implementation's."""

    angle_depth: int = 4  #: linear layers of the angle MLP: d → d/2 → d/4 → d/8 → 1 for 4
    lr: float = 5e-4
    weight_decay: float = 0.0
    epochs: int = 5
    warmup_ratio: float = 0.05
    batch_size: int = 16  #: token pairs per step
    seed: int = 42
    top_k: int = 5  #: layers kept by validation probe accuracy (ignored when ``layers`` is given)
    layers: list[int] | None = None  #: explicit layers to edit
    val_fraction: float = 0.2  #: groups held out for validation when no pair is marked ``val``
    angle_layers: str = "selected"  #: fit angle predictors for the ``selected`` layers or ``all``
    # Ablations (all off for HPR as published):
    gate: bool = True  #: False: rotate every token, not only those on the negative side
    fixed_angle: float | None = None  #: a constant angle (radians) instead of the angle predictor
    probe_bias: bool = False  #: give the probe a bias: the "reflection" becomes affine (norm not kept)

    def validate(self, where: str = "HPRConfig") -> None:
        checks = [
            (isinstance(self.angle_depth, int) and self.angle_depth >= 1, "angle_depth must be an integer ≥ 1"),
            (isinstance(self.lr, (int, float)) and self.lr > 0, "lr must be > 0"),
            (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, "weight_decay must be ≥ 0"),
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be an integer ≥ 1"),
            (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size must be an integer ≥ 1"),
            (isinstance(self.seed, int), "seed must be an integer"),
            (isinstance(self.top_k, int) and self.top_k >= 1, "top_k must be an integer ≥ 1"),
            (self.layers is None or (isinstance(self.layers, list) and self.layers and all(isinstance(i, int) for i in self.layers)),
             "layers must be a non-empty list of integers or null"),
            (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (self.angle_layers in ("selected", "all"), "angle_layers must be 'selected' or 'all'"),
            (isinstance(self.gate, bool), "gate must be true or false"),
            (self.fixed_angle is None or (isinstance(self.fixed_angle, (int, float)) and 0 <= self.fixed_angle <= math.pi),
             "fixed_angle must be null or an angle in [0, π]"),
            (isinstance(self.probe_bias, bool), "probe_bias must be true or false"),
        ]
        for ok, message in checks:
            if not ok:
                raise HpreditError(f"{where}: {message}")

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
class HPREditor(Editor):
    """HPR editor: per-layer probe + angle predictor; see :meth:`fit` and :meth:`attach`."""

    method = "hpr"
    config_class = HPRConfig

    def __init__(self, config: HPRConfig, layers: list[int], model: ModelFingerprint, fitted_layers: list[int],
                 probe: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                 metrics: dict | None = None, probe_bias: torch.Tensor | None = None):
        super().__init__(config, layers, model, metrics)
        self.fitted_layers = list(fitted_layers)
        self.probe = probe  # (L_fit, d)
        self.weights = weights  # [(L_fit, out, in)], empty with a fixed angle
        self.biases = biases  # [(L_fit, out)]
        self.probe_bias = probe_bias  # (L_fit,) only for the probe-bias ablation

    # ------------------------------------------------------------------ inference

    def available_layers(self) -> list[int]:
        return self.fitted_layers

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
        out = _mlp(flat, [w[r : r + 1].to(x.device) for w in self.weights], [b[r : r + 1].to(x.device) for b in self.biases])
        return math.pi * torch.sigmoid(out).reshape(x.shape[:-1])

    def edit(self, layer: int, x: torch.Tensor, strength: float = 1.0, mask: torch.Tensor | None = None,
             fast: bool = True) -> torch.Tensor:
        """Edit activations ``x`` (..., d) of ``layer`` as attach() does (``fast=False``: the reference path)."""
        return self.layer_edit(layer, x.device, x.dtype, fast=fast)(x, mask, strength)

    def layer_edit(self, layer: int, device: torch.device, dtype: torch.dtype = torch.float32,
                   fast: bool = True) -> LayerEdit:
        """The edit of one layer for activations of ``dtype`` on ``device``.

        ``fast`` (default): every constant prepared here once, the angle MLP in the activations'
        dtype, the rotation as ``a·x + b·ŵ + c·u`` from two float32 reductions (see
        :func:`~hpredit.geometry.pseudo_rotate_coefficients`), no host sync and no data-dependent
        Python branch. ``fast=False``: the reference — everything in float32 through
        :func:`~hpredit.geometry.pseudo_rotate`. Both agree to the rounding of ``dtype`` (tested).
        The probe-bias ablation always takes the reference path.
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

        def edit(hidden: torch.Tensor, mask: torch.Tensor | None, strength: float) -> torch.Tensor:
            x = hidden.float()
            score = x @ w if bias is None else x @ w + bias
            gate = score < 0 if cfg.gate else torch.ones_like(score, dtype=torch.bool)  # p(x) < 0.5
            if mask is not None:
                gate = gate & mask
            if cfg.fixed_angle is not None:
                theta = torch.full_like(score, float(cfg.fixed_angle))
            else:
                theta = math.pi * torch.sigmoid(_mlp(x.reshape(1, -1, x.shape[-1]), weights, biases)).reshape(x.shape[:-1])
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
        basis = torch.stack([w_hat, fallback_axis(w_hat)])  # (2, d) float32
        mlp_dtype = dtype if dtype.is_floating_point else torch.float32
        layers = [(m[r].to(device=device, dtype=mlp_dtype).t().contiguous(), b[r].to(device=device, dtype=mlp_dtype))
                  for m, b in zip(self.weights, self.biases)]
        gated, fixed = self.config.gate, self.config.fixed_angle
        one = torch.ones((), device=device)
        zero = torch.zeros((), device=device)

        def edit(hidden: torch.Tensor, mask: torch.Tensor | None, strength: float | torch.Tensor) -> torch.Tensor:
            d = hidden.shape[-1]
            h = hidden.reshape(-1, d)
            x = h.float()  # (n, d)
            if isinstance(strength, torch.Tensor):  # per token, broadcastable to hidden.shape[:-1]
                strength = strength.to(torch.float32).expand(hidden.shape[:-1]).reshape(-1)
            score = x @ w_hat  # (n,)
            sq_norm = torch.linalg.vecdot(x, x)
            if fixed is None:
                z = h.to(mlp_dtype)
                for j, (wt, b) in enumerate(layers):
                    z = torch.addmm(b, z, wt)
                    if j < len(layers) - 1:
                        z = F.gelu(z)
                gamma = (strength * math.pi) * torch.sigmoid(z.reshape(-1).float())
            else:
                gamma = strength * float(fixed)
            a, b, c = pseudo_rotate_coefficients(score, sq_norm, gamma)
            gate = score < 0 if gated else None
            if mask is not None:
                m = mask.reshape(-1)
                gate = m if gate is None else gate & m
            if gate is not None:  # untouched rows: a = 1, b = c = 0, so they come back bit for bit
                a, b, c = torch.where(gate, a, one), torch.where(gate, b, zero), torch.where(gate, c, zero)
            out = torch.addmm(x * a.unsqueeze(-1), torch.stack([b, c], dim=-1), basis)
            return out.to(hidden.dtype).reshape(hidden.shape)

        return edit

    # ------------------------------------------------------------------ artifact

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"probe": self.probe}
        if self.probe_bias is not None:
            out["probe_bias"] = self.probe_bias
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"angle.{j}.weight"] = w
            out[f"angle.{j}.bias"] = b
        return out

    def extra_config(self) -> dict:
        return {"fitted_layers": self.fitted_layers}

    @classmethod
    def _from_tensors(cls, config, layers, model, metrics, tensors, extra):
        where = "editor artifact"
        fitted = fitted_layers_from(extra, layers)
        d, n = model.hidden_size, len(fitted)
        widths = config.mlp_widths(d) if config.fixed_angle is None else [d]
        expected = {"probe": (n, d)}
        if config.probe_bias:
            expected["probe_bias"] = (n,)
        for j in range(len(widths) - 1):
            expected[f"angle.{j}.weight"] = (n, widths[j + 1], widths[j])
            expected[f"angle.{j}.bias"] = (n, widths[j + 1])
        if set(tensors) != set(expected):
            raise HpreditError(f"{where}: tensors {sorted(tensors)} do not match the config (expected {sorted(expected)})")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise HpreditError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
            if not torch.isfinite(tensors[name]).all():
                raise HpreditError(f"{where}: tensor {name} contains NaN or inf")
        depth = len(widths) - 1
        return cls(config, layers, model, fitted, tensors["probe"],
                   [tensors[f"angle.{j}.weight"] for j in range(depth)],
                   [tensors[f"angle.{j}.bias"] for j in range(depth)], metrics, tensors.get("probe_bias"))

    def select_layers(self, layers: list[int]) -> HPREditor:
        """A copy of this editor that edits ``layers`` (any of the fitted ones)."""
        unknown = [i for i in layers if i not in self.fitted_layers]
        if unknown or not layers:
            raise HpreditError(f"cannot select layers {layers}: fitted layers are {self.fitted_layers}")
        return HPREditor(self.config, sorted(layers), self.model_fingerprint, self.fitted_layers,
                         self.probe, self.weights, self.biases, dict(self.metrics), self.probe_bias)

    # ------------------------------------------------------------------ training

    @classmethod
    def fit(cls, acts: ActivationStore, config: HPRConfig | None = None, progress: bool = True, **overrides) -> HPREditor:
        """Train probes and angle predictors on collected activations, then pick the layers.

        Pairs marked ``val`` in ``acts`` validate; without them ``config.val_fraction`` of the
        groups (questions) is held out, seeded. Loss = mean over layers of BCE(probe) + MSE(angle);
        all layers train together in batched tensor ops, and each layer keeps the epoch with its
        best validation probe accuracy. The top-k layers (or ``config.layers``) are active.

        The probe and angle terms share no parameters, so training runs in two batched phases that
        give exactly the joint result: probes for every layer (cheap), then angle predictors only
        for the chosen layers (or all, with ``config.angle_layers="all"``), replaying the same
        batches, learning-rate schedule and per-layer best epochs.
        """
        config = dataclasses.replace(config or HPRConfig(), **overrides)
        config.validate()
        train_mask, val_mask = train_val_masks(acts, config.val_fraction, config.seed)
        if config.layers is not None:
            missing = [i for i in config.layers if i not in acts.layers]
            if missing:
                raise HpreditError(f"layers {missing} were not collected (collected: {acts.layers})")
        gen = torch.Generator().manual_seed(config.seed)
        L, d = len(acts.layers), acts.hidden_size
        X = acts.acts  # (L, N, d) 16-bit; rows gathered per step
        tp, tn = acts.token_pairs(train_mask)
        vp, vn = acts.token_pairs(val_mask)
        if len(tp) == 0:
            raise HpreditError("no training token pairs: every completion is empty")
        if len(vp) == 0:
            vp, vn = tp, tn  # too few groups to hold any out: select on training accuracy

        widths = config.mlp_widths(d)
        bound = 1 / math.sqrt(d)
        probe = (torch.rand(L, d, generator=gen) * 2 - 1) * bound
        pbias = torch.zeros(L)  # trained only for the probe-bias ablation
        weights, biases = [], []
        for j in range(len(widths) - 1):
            b = 1 / math.sqrt(widths[j])
            weights.append((torch.rand(L, widths[j + 1], widths[j], generator=gen) * 2 - 1) * b)
            biases.append((torch.rand(L, widths[j + 1], generator=gen) * 2 - 1) * b)
        orders = [torch.randperm(len(tp), generator=gen) for _ in range(config.epochs)]
        steps = math.ceil(len(tp) / config.batch_size) * config.epochs

        # Phase 1: probes of all layers. Each layer's loss is divided by L as in the joint mean.
        ones = torch.ones(config.batch_size)

        def probe_loss(z: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, params) -> torch.Tensor:
            n = len(idx)
            y = torch.cat([ones[:n], torch.zeros(n)]).expand(z.shape[0], -1)
            logits = torch.einsum("lnd,ld->ln", z, params[0])
            if config.probe_bias:
                logits = logits + params[1].unsqueeze(1)
            return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1).sum() / L

        acc_history: list[torch.Tensor] = []
        best_probe, best_pbias = probe.clone(), pbias.clone()
        best_acc = torch.full((L,), -1.0)

        def after_probe_epoch(epoch: int, params) -> str:
            nonlocal best_acc
            b = params[1].detach() if config.probe_bias else None
            acc = _probe_accuracy(X, params[0].detach(), vp, vn, bias=b)
            acc_history.append(acc)
            better = acc > best_acc
            best_probe[better] = params[0].detach()[better]
            if b is not None:
                best_pbias[better] = b[better]
            best_acc = torch.where(better, acc, best_acc)
            return f"val_acc={float(acc.mean()):.3f}"

        probe_params = [probe, pbias] if config.probe_bias else [probe]
        losses_probe = _train(X, torch.arange(L), tp, tn, orders, probe_params, probe_loss, config, steps,
                              after_probe_epoch, progress, f"training probes ({L} layers)")
        best_epoch = torch.stack(acc_history).argmax(0)  # first epoch reaching the best accuracy

        accuracy = {layer: float(best_acc[r]) for r, layer in enumerate(acts.layers)}
        if config.layers is not None:
            layers = sorted(config.layers)
        else:
            ranked = sorted(acts.layers, key=lambda i: (-accuracy[i], i))
            layers = sorted(ranked[: config.top_k])
        fitted = list(acts.layers) if config.angle_layers == "all" else layers
        rows = torch.tensor([acts.layers.index(i) for i in fitted])

        # Phase 2: angle predictors of the fitted layers, same batches and schedule.
        if config.fixed_angle is not None:  # ablation: no angle predictor at all
            weights, biases = [], []
        target = torch.stack([_pair_angles(X[r], tp, tn) for r in rows.tolist()])  # (k, M)
        mlp_w = [w[rows].clone() for w in weights]
        mlp_b = [b[rows].clone() for b in biases]
        best_w = [w.clone() for w in mlp_w]
        best_b = [b.clone() for b in mlp_b]
        epoch_of = best_epoch[rows]

        def angle_loss(z: torch.Tensor, idx: torch.Tensor, _rows, params) -> torch.Tensor:
            n = len(idx)
            depth = len(params) // 2
            theta = math.pi * torch.sigmoid(_mlp(z, params[:depth], params[depth:]))
            tgt = torch.cat([torch.zeros(z.shape[0], n), target[:, idx]], dim=1)
            return ((theta - tgt) ** 2).mean(1).sum() / L

        def after_angle_epoch(epoch: int, params) -> str:
            keep = epoch_of == epoch
            depth = len(params) // 2
            for bw, p in zip(best_w + best_b, params[:depth] + params[depth:]):
                bw[keep] = p.detach()[keep]
            return ""

        losses_angle = [0.0] * config.epochs
        if mlp_w:
            losses_angle = _train(X, rows, tp, tn, orders, [*mlp_w, *mlp_b], angle_loss, config, steps,
                                  after_angle_epoch, progress, f"training angle predictors ({len(fitted)} layers)")

        n_groups = lambda m: int(torch.unique(acts.groups[m]).numel())  # noqa: E731
        metrics = {
            "val_probe_accuracy": {str(k): v for k, v in accuracy.items()},
            "best_epoch": {str(layer): int(best_epoch[r]) + 1 for r, layer in enumerate(acts.layers)},
            "validation": "val split" if any(s == "val" for s in acts.splits) else f"held-out {config.val_fraction:.0%} of groups",
            "train_token_pairs": len(tp),
            "val_token_pairs": len(vp),
            "train_groups": n_groups(train_mask),
            "val_groups": n_groups(val_mask),
            "history": [
                {"epoch": e + 1, "probe_loss": losses_probe[e], "angle_loss": losses_angle[e],
                 "val_probe_accuracy_mean": float(acc_history[e].mean())}
                for e in range(config.epochs)
            ],
        }
        return cls(config, layers, acts.fingerprint, fitted, best_probe[rows], best_w, best_b, metrics,
                   best_pbias[rows] if config.probe_bias else None)


def _train(X, rows, tp, tn, orders, params, loss_fn, config: HPRConfig, total: int, after_epoch, progress: bool,
           desc: str) -> list[float]:
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
    losses = []
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress)
    for epoch, order in enumerate(orders):
        running = torch.zeros(())
        n_steps = 0
        for s in range(0, len(order), config.batch_size):
            idx = order[s : s + config.batch_size]
            z = torch.cat([Xr[:, tp[idx]], Xr[:, tn[idx]]], dim=1).float()  # (k, 2B, d)
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


def _pair_angles(x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """∠(negative, positive) per token pair, the angle target of the negative tokens."""
    return torch.cat([
        angle_between(x[neg[i : i + chunk]].float(), x[pos[i : i + chunk]].float()) for i in range(0, len(pos), chunk)
    ]) if len(pos) else torch.zeros(0)


@torch.no_grad()
def _probe_accuracy(X: torch.Tensor, probe: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, chunk: int = 8192,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-layer probe accuracy: positives on ``w·x (+ b) > 0``, negatives on ``< 0``."""
    correct = torch.zeros(X.shape[0])
    b = torch.zeros(X.shape[0]) if bias is None else bias
    for i in range(0, len(pos), chunk):
        p = torch.einsum("lnd,ld->ln", X[:, pos[i : i + chunk]].float(), probe) + b[:, None]
        n = torch.einsum("lnd,ld->ln", X[:, neg[i : i + chunk]].float(), probe) + b[:, None]
        correct += (p > 0).sum(1) + (n < 0).sum(1)
    return correct / (2 * len(pos))
