"""Inference-Time Intervention (Li et al. 2023): shift the most truth-predictive attention heads.

Per attention head (the input of the attention output projection, split into heads): a logistic
probe on the last completion token of each text; the top-K heads by validation accuracy are shifted
by ``α · σ · v`` with ``v`` the unit mass-mean direction (mean positive − mean negative) and ``σ``
the standard deviation of the activations along ``v``. ``strength`` multiplies the configured α.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..activations import ActivationStore
from ..architecture import ModelFingerprint
from ..errors import HpreditError
from ..hooks import LayerEdit, token_strength
from ..models import check_device
from .base import Editor, EditorConfig, is_int, is_number, register_editor, train_val_masks

__all__ = ["ITIConfig", "ITIEditor"]


@dataclass
class ITIConfig(EditorConfig):
    """Hyper-parameters of ITI. ``num_heads`` defaults to 48 heads per 1024 (the paper's 48 of
    LLaMA-7B's 1024), scaled to the model's head count."""

    num_heads: int | None = None  #: K, the number of heads shifted
    alpha: float = 15.0  #: α of the paper; ``attach(strength=s)`` shifts by ``s·α·σ·v``
    probe_steps: int = 300  #: full-batch Adam steps of the per-head logistic probes
    probe_lr: float = 0.01
    val_fraction: float = 0.2  #: groups held out for validation when no pair is marked ``val``
    seed: int = 42

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (
                self.num_heads is None or (is_int(self.num_heads) and self.num_heads >= 1),
                "num_heads must be null or an integer ≥ 1",
            ),
            (is_number(self.alpha), "alpha must be a number"),
            (is_int(self.probe_steps) and self.probe_steps >= 1, "probe_steps must be an integer ≥ 1"),
            (is_number(self.probe_lr) and self.probe_lr > 0, "probe_lr must be > 0"),
            (is_number(self.val_fraction) and 0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (is_int(self.seed), "seed must be an integer"),
        ]


@register_editor
class ITIEditor(Editor):
    """ITI: per-head shifts at the attention output projection's input (``site = "heads"``)."""

    method = "iti"
    config_class = ITIConfig
    site = "heads"
    metrics_by_layer = False

    def __init__(
        self,
        config: ITIConfig,
        layers: list[int],
        model: ModelFingerprint,
        heads: list[tuple[int, int]],
        directions: torch.Tensor,
        sigma: torch.Tensor,
        num_attention_heads: int,
        metrics: dict | None = None,
    ):
        super().__init__(config, layers, model, metrics)
        self.num_attention_heads = int(num_attention_heads)
        self.heads = sorted((int(a), int(b)) for a, b in heads)  # (layer, head) shifted
        self.directions = directions  # (K, head_dim) unit mass-mean directions of the shifted heads
        self.sigma = sigma  # (K,)

    @property
    def head_dim(self) -> int:
        return self.directions.shape[-1]

    def shift(self, layer: int, width: int) -> torch.Tensor:
        """The shift ``(width,)`` added at ``layer`` for strength 1: α·σ·v in each selected head's slice."""
        out = torch.zeros(width)
        hd = self.head_dim
        for k, (lay, head) in enumerate(self.heads):
            if lay == layer:
                out[head * hd : (head + 1) * hd] = self.config.alpha * self.sigma[k] * self.directions[k]
        return out

    def layer_edit(self, layer: int, device: torch.device, dtype: torch.dtype = torch.float32) -> LayerEdit:
        cached: dict[int, torch.Tensor] = {}

        def edit(hidden: torch.Tensor, mask: torch.Tensor | None, strength: float | torch.Tensor) -> torch.Tensor:
            width = hidden.shape[-1]
            if width != self.num_attention_heads * self.head_dim:
                expected = self.num_attention_heads * self.head_dim
                raise HpreditError(
                    f"ITI editor expects {self.num_attention_heads} heads of {self.head_dim} "
                    f"(width {expected}) at layer {layer}, got width {width}"
                )
            if width not in cached:
                cached[width] = self.shift(layer, width).to(device=hidden.device, dtype=torch.float32)
            mask, s = token_strength(hidden, mask, strength)
            if s is None:
                return hidden
            out = (hidden.float() + s * cached[width]).to(hidden.dtype)
            return out if mask is None else torch.where(mask.unsqueeze(-1), out, hidden)

        return edit

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"directions": self.directions, "sigma": self.sigma}

    def extra_config(self) -> dict:
        return {"heads": [list(h) for h in self.heads], "num_attention_heads": self.num_attention_heads}

    @classmethod
    def _from_tensors(cls, config, layers, model, metrics, tensors, artifact):
        heads = artifact.get("heads")
        if (
            not isinstance(heads, list)
            or not heads
            or not all(isinstance(h, list) and len(h) == 2 and all(is_int(i) for i in h) for h in heads)
        ):
            raise HpreditError("editor artifact: 'heads' must be a non-empty list of [layer, head] pairs")
        if sorted({h[0] for h in heads}) != sorted(layers):
            raise HpreditError("editor artifact: 'layers' must be the layers of the shifted heads")
        if set(tensors) != {"directions", "sigma"}:
            raise HpreditError("editor artifact: expected tensors 'directions' and 'sigma'")
        d, s = tensors["directions"], tensors["sigma"]
        if d.dim() != 2 or d.shape[0] != len(heads) or tuple(s.shape) != (len(heads),):
            raise HpreditError(
                f"editor artifact: directions {tuple(d.shape)} / sigma {tuple(s.shape)} do not match {len(heads)} heads"
            )
        n_heads = artifact.get("num_attention_heads")
        if not isinstance(n_heads, int) or any(not 0 <= h[1] < n_heads for h in heads):
            raise HpreditError("editor artifact: 'num_attention_heads' missing or a head index out of range")
        if not (torch.isfinite(d).all() and torch.isfinite(s).all()):
            raise HpreditError("editor artifact: NaN or inf in directions/sigma")
        return cls(config, layers, model, [tuple(h) for h in heads], d, s, n_heads, metrics)

    @classmethod
    def fit(
        cls,
        acts: ActivationStore,
        config: ITIConfig | None = None,
        num_attention_heads: int | None = None,
        progress: bool = True,
        device: str | torch.device | None = None,
        **overrides,
    ) -> ITIEditor:
        """Fit on head activations (``collect_activations(..., site="heads")``).

        ``num_attention_heads`` (``hpredit.models.num_attention_heads(model)``) splits the
        ``(…, heads·head_dim)`` activations into heads. Probes: one logistic regression per head on
        standardised last-token activations, full-batch Adam, all heads at once, on ``device``
        (default: the CPU; the initial weights are drawn on the CPU, so every device starts alike).
        """
        config = cls.fit_config(acts, config, overrides)
        H = num_attention_heads
        if H is None:
            raise HpreditError("ITIEditor.fit needs num_attention_heads (hpredit.models.num_attention_heads(model))")
        L, width = len(acts.layers), acts.acts.shape[-1]
        if width % H:
            raise HpreditError(f"activation width {width} is not divisible by {H} heads")
        train, val = train_val_masks(acts, config.val_fraction, config.seed)
        tr_idx, tr_y = _labelled_texts(acts, train)
        va_idx, va_y = _labelled_texts(acts, val) if val.any() else (tr_idx, tr_y)
        dev = check_device(device) if device is not None else torch.device("cpu")
        xt, xv = _head_features(acts, tr_idx, H).to(dev), _head_features(acts, va_idx, H).to(dev)
        tr_y, va_y = tr_y.to(dev), va_y.to(dev)
        probe = _HeadProbes.train(xt, tr_y, config.seed, config.probe_lr, config.probe_steps)
        accuracy = probe.accuracy(xv, va_y)  # (L*H,)
        order = _best_heads(accuracy, config.num_heads, L * H)
        heads, directions, sigma = _mass_mean_shifts(xt, tr_y.bool(), order, acts.layers, H)
        ranked = sorted(zip(heads, directions, sigma), key=lambda t: t[0])
        metrics = {
            "val_probe_accuracy": {f"{acts.layers[i // H]}.{i % H}": float(accuracy[i]) for i in range(L * H)},
            "train_texts": len(tr_idx),
            "val_texts": len(va_idx),
        }
        return cls(
            config,
            sorted({h[0] for h in heads}),
            acts.fingerprint,
            [t[0] for t in ranked],
            torch.stack([t[1] for t in ranked]).cpu(),
            torch.stack([t[2] for t in ranked]).cpu(),
            H,
            metrics,
        )


# --------------------------------------------------------------------------- the steps of ITIEditor.fit


def _labelled_texts(acts: ActivationStore, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The texts of the pairs in ``mask``: positives (label 1), then negatives that are no positive (0)."""
    pos = torch.unique(acts.pairs[mask, 0])
    neg = torch.unique(acts.pairs[mask, 1])
    neg = neg[~torch.isin(neg, pos)]
    idx = torch.cat([pos, neg])
    return idx, torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])


def _head_features(acts: ActivationStore, idx: torch.Tensor, H: int) -> torch.Tensor:
    """Each text's last completion token, per head of every collected layer: ``(L*H, n, head_dim)``."""
    L, width = len(acts.layers), acts.acts.shape[-1]
    last = acts.offsets[1:] - 1  # the last completion token of each text
    x = acts.acts[:, last[idx]].float().reshape(L, len(idx), H, width // H)
    return x.permute(0, 2, 1, 3).reshape(L * H, len(idx), width // H)


@dataclass
class _HeadProbes:
    """One logistic regression per head on standardised features, all heads at once."""

    w: torch.Tensor  #: (L*H, head_dim)
    b: torch.Tensor  #: (L*H,)
    mu: torch.Tensor
    sd: torch.Tensor

    @classmethod
    def train(cls, xt: torch.Tensor, y: torch.Tensor, seed: int, lr: float, steps: int) -> _HeadProbes:
        """Full-batch Adam; the initial weights are drawn on the CPU, so every device starts alike."""
        dev, (n_heads, _, hd) = xt.device, xt.shape
        mu, sd = xt.mean(1, keepdim=True), xt.std(1, keepdim=True).clamp_min(1e-6)
        gen = torch.Generator().manual_seed(seed)
        w = (torch.randn(n_heads, hd, generator=gen) * 0.01).to(dev).requires_grad_(True)
        b = torch.zeros(n_heads, device=dev, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=lr)
        zt = (xt - mu) / sd
        for _ in range(steps):
            logits = torch.einsum("hnd,hd->hn", zt, w) + b[:, None]
            loss = F.binary_cross_entropy_with_logits(logits, y.expand_as(logits))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return cls(w, b, mu, sd)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each head's accuracy on ``x`` ``(L*H, n, head_dim)`` with labels ``y``: ``(L*H,)``."""
        pred = (torch.einsum("hnd,hd->hn", (x - self.mu) / self.sd, self.w) + self.b[:, None]) > 0
        return (pred == y.bool()).float().mean(1)


def _best_heads(accuracy: torch.Tensor, num_heads: int | None, n_heads: int) -> list[int]:
    """The ``num_heads`` heads of best probe accuracy (default: 48 per 1024 heads, at least 1)."""
    if num_heads is not None and num_heads > n_heads:
        raise HpreditError(f"num_heads {num_heads} is more than the {n_heads} heads of the collected layers")
    K = min(num_heads or max(1, round(48 * n_heads / 1024)), n_heads)
    return sorted(range(n_heads), key=lambda i: (-float(accuracy[i]), i))[:K]


def _mass_mean_shifts(
    xt: torch.Tensor, positive: torch.Tensor, order: list[int], layers: list[int], H: int
) -> tuple[list[tuple[int, int]], list[torch.Tensor], list[torch.Tensor]]:
    """Per chosen head: ``(layer, head)``, the unit mass-mean direction (positive − negative mean)
    and the standard deviation of the training activations along it."""
    directions, sigma, heads = [], [], []
    for i in order:
        v = xt[i, positive].mean(0) - xt[i, ~positive].mean(0)
        v = v / v.norm().clamp_min(1e-12)
        directions.append(v)
        sigma.append((xt[i] @ v).std())
        heads.append((layers[i // H], i % H))
    return heads, directions, sigma
