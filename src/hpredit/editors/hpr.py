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
from ..geometry import angle_between, pseudo_rotate
from ..hooks import LayerEdit
from ..models import ModelFingerprint
from .base import Editor, register_editor

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
                 metrics: dict | None = None):
        super().__init__(config, layers, model, metrics)
        self.fitted_layers = list(fitted_layers)
        self.probe = probe  # (L_fit, d)
        self.weights = weights  # [(L_fit, out, in)]
        self.biases = biases  # [(L_fit, out)]

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
        r = self._row(layer)
        flat = x.float().reshape(1, -1, x.shape[-1])
        out = _mlp(flat, [w[r : r + 1].to(x.device) for w in self.weights], [b[r : r + 1].to(x.device) for b in self.biases])
        return math.pi * torch.sigmoid(out).reshape(x.shape[:-1])

    def edit(self, layer: int, x: torch.Tensor, strength: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Edit activations ``x`` (..., d) of ``layer`` as attach() does (math in float32)."""
        return self.layer_edit(layer, x.device)(x, mask, strength)

    def layer_edit(self, layer: int, device: torch.device) -> LayerEdit:
        r = self._row(layer)
        w = self.probe[r].to(device=device, dtype=torch.float32)
        weights = [m[r : r + 1].to(device=device, dtype=torch.float32) for m in self.weights]
        biases = [b[r : r + 1].to(device=device, dtype=torch.float32) for b in self.biases]

        def edit(hidden: torch.Tensor, mask: torch.Tensor | None, strength: float) -> torch.Tensor:
            x = hidden.float()
            gate = (x @ w) < 0  # p(x) = sigmoid(w·x) < 0.5: the negative side
            if mask is not None:
                gate = gate & mask
            theta = math.pi * torch.sigmoid(_mlp(x.reshape(1, -1, x.shape[-1]), weights, biases)).reshape(x.shape[:-1])
            rotated = pseudo_rotate(x, w, strength * theta).to(hidden.dtype)
            return torch.where(gate.unsqueeze(-1), rotated, hidden)

        return edit

    # ------------------------------------------------------------------ artifact

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"probe": self.probe}
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"angle.{j}.weight"] = w
            out[f"angle.{j}.bias"] = b
        return out

    def extra_config(self) -> dict:
        return {"fitted_layers": self.fitted_layers}

    @classmethod
    def _from_tensors(cls, config, layers, model, metrics, tensors, extra):
        where = "editor artifact"
        fitted = extra.get("fitted_layers")
        if not isinstance(fitted, list) or not all(isinstance(i, int) for i in fitted):
            raise HpreditError(f"{where}: 'fitted_layers' must be a list of integers")
        if any(i not in fitted for i in layers):
            raise HpreditError(f"{where}: layers {layers} are not all among fitted_layers {fitted}")
        d, n = model.hidden_size, len(fitted)
        widths = config.mlp_widths(d)
        expected = {"probe": (n, d)}
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
                   [tensors[f"angle.{j}.bias"] for j in range(depth)], metrics)

    def select_layers(self, layers: list[int]) -> HPREditor:
        """A copy of this editor that edits ``layers`` (any of the fitted ones)."""
        unknown = [i for i in layers if i not in self.fitted_layers]
        if unknown or not layers:
            raise HpreditError(f"cannot select layers {layers}: fitted layers are {self.fitted_layers}")
        return HPREditor(self.config, sorted(layers), self.model_fingerprint, self.fitted_layers,
                         self.probe, self.weights, self.biases, dict(self.metrics))

    # ------------------------------------------------------------------ training

    @classmethod
    def fit(cls, acts: ActivationStore, config: HPRConfig | None = None, progress: bool = True, **overrides) -> HPREditor:
        """Train probes and angle predictors for every collected layer at once, then pick layers.

        Pairs marked ``val`` in ``acts`` validate; without them ``config.val_fraction`` of the
        groups (questions) is held out, seeded. Loss per layer = BCE(probe) + MSE(angle), averaged
        over layers; all layers train together in batched tensor ops. Each layer keeps the epoch with
        its best validation probe accuracy; the top-k layers (or ``config.layers``) are active.
        """
        config = dataclasses.replace(config or HPRConfig(), **overrides)
        config.validate()
        train_mask, val_mask = _train_val_masks(acts, config)
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
        target = torch.stack([_pair_angles(X[r], tp, tn) for r in range(L)])  # (L, M)

        widths = config.mlp_widths(d)
        bound = 1 / math.sqrt(d)
        probe = (torch.rand(L, d, generator=gen) * 2 - 1) * bound
        weights, biases = [], []
        for j in range(len(widths) - 1):
            b = 1 / math.sqrt(widths[j])
            weights.append((torch.rand(L, widths[j + 1], widths[j], generator=gen) * 2 - 1) * b)
            biases.append((torch.rand(L, widths[j + 1], generator=gen) * 2 - 1) * b)
        params = [probe, *weights, *biases]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(len(tp) / config.batch_size)
        total = steps_per_epoch * config.epochs
        warmup = int(config.warmup_ratio * total)

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        best_acc = torch.full((L,), -1.0)
        best = [p.detach().clone() for p in params]
        history = []
        bar = tqdm(total=total, desc=f"training HPR ({L} layers)", unit="step", disable=not progress)
        for epoch in range(config.epochs):
            order = torch.randperm(len(tp), generator=gen)
            epoch_loss = 0.0
            for s in range(steps_per_epoch):
                idx = order[s * config.batch_size : (s + 1) * config.batch_size]
                z = torch.cat([X[:, tp[idx]], X[:, tn[idx]]], dim=1).float()  # (L, 2B, d)
                y = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))]).expand(L, -1)
                logits = torch.einsum("lnd,ld->ln", z, probe)
                probe_loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)
                theta = math.pi * torch.sigmoid(_mlp(z, weights, biases))
                tgt = torch.cat([torch.zeros(L, len(idx)), target[:, idx]], dim=1)
                angle_loss = ((theta - tgt) ** 2).mean(1)
                loss = (probe_loss + angle_loss).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                epoch_loss += loss.item()
                bar.update(1)
            acc = _probe_accuracy(X, probe.detach(), vp, vn) if len(vp) else _probe_accuracy(X, probe.detach(), tp, tn)
            better = acc > best_acc
            for b, p in zip(best, params):
                b[better] = p.detach()[better]
            best_acc = torch.where(better, acc, best_acc)
            history.append({"epoch": epoch + 1, "loss": epoch_loss / steps_per_epoch,
                            "val_probe_accuracy_mean": float(acc.mean())})
            bar.set_postfix(loss=f"{epoch_loss / steps_per_epoch:.4f}", val_acc=f"{float(acc.mean()):.3f}")
        bar.close()

        accuracy = {layer: float(best_acc[r]) for r, layer in enumerate(acts.layers)}
        if config.layers is not None:
            layers = sorted(config.layers)
        else:
            ranked = sorted(acts.layers, key=lambda i: (-accuracy[i], i))
            layers = sorted(ranked[: config.top_k])
        n_groups = lambda m: int(torch.unique(acts.groups[m]).numel())  # noqa: E731
        metrics = {
            "val_probe_accuracy": {str(k): v for k, v in accuracy.items()},
            "validation": "val split" if any(s == "val" for s in acts.splits) else f"held-out {config.val_fraction:.0%} of groups",
            "train_token_pairs": len(tp),
            "val_token_pairs": len(vp),
            "train_groups": n_groups(train_mask),
            "val_groups": n_groups(val_mask),
            "history": history,
        }
        n_w = len(weights)
        return cls(config, layers, acts.fingerprint, list(acts.layers), best[0], best[1 : 1 + n_w], best[1 + n_w :], metrics)


def _train_val_masks(acts: ActivationStore, config: HPRConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs to train and to validate on: the ``val`` split if present, else held-out groups."""
    is_val = acts.split_mask("val")
    if is_val.any():
        train = acts.split_mask("train") | torch.tensor([s is None for s in acts.splits])
        if not train.any():
            raise HpreditError("activations have validation pairs but no training pairs")
        return train, is_val
    groups = torch.unique(acts.groups)
    if len(groups) < 2:
        return torch.ones(len(acts.groups), dtype=torch.bool), torch.zeros(len(acts.groups), dtype=torch.bool)
    perm = groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(config.seed))]
    n_val = max(1, round(config.val_fraction * len(groups)))
    val = torch.isin(acts.groups, perm[:n_val])
    return ~val, val


def _pair_angles(x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """∠(negative, positive) per token pair, the angle target of the negative tokens."""
    return torch.cat([
        angle_between(x[neg[i : i + chunk]].float(), x[pos[i : i + chunk]].float()) for i in range(0, len(pos), chunk)
    ]) if len(pos) else torch.zeros(0)


@torch.no_grad()
def _probe_accuracy(X: torch.Tensor, probe: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Per-layer accuracy of the bias-free probe: positives on ``w·x > 0``, negatives on ``< 0``."""
    correct = torch.zeros(X.shape[0])
    for i in range(0, len(pos), chunk):
        p = torch.einsum("lnd,ld->ln", X[:, pos[i : i + chunk]].float(), probe)
        n = torch.einsum("lnd,ld->ln", X[:, neg[i : i + chunk]].float(), probe)
        correct += (p > 0).sum(1) + (n < 0).sum(1)
    return correct / (2 * len(pos))
