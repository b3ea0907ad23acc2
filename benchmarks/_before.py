"""The baseline the fused edit is measured against: ``HPREditor._fast_edit`` as of commit 15fad2c.

Kept verbatim (as a function of the editor) so that before/after figures can be measured in one
process, on machines without the git history (the GPU machine gets a copy of the working tree only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hpredit.geometry import fallback_axis, pseudo_rotate_coefficients

REVISION = "15fad2c"


def fast_edit_15fad2c(self, layer: int, device: torch.device, dtype: torch.dtype):
    """The edit of ``layer`` built by 15fad2c's ``HPREditor._fast_edit`` (``self``: an HPREditor)."""
    r = self._row(layer)
    w = self.probe[r].to(device=device, dtype=torch.float32)
    w_hat = w / w.norm().clamp_min(1e-12)
    basis = torch.stack([w_hat, fallback_axis(w_hat)])  # (2, d) float32
    mlp_dtype = dtype if dtype.is_floating_point else torch.float32
    layers = [
        (m[r].to(device=device, dtype=mlp_dtype).t().contiguous(), b[r].to(device=device, dtype=mlp_dtype))
        for m, b in zip(self.weights, self.biases)
    ]
    gated, fixed = self.config.gate, self.config.fixed_angle
    one = torch.ones((), device=device)
    zero = torch.zeros((), device=device)

    def edit(hidden: torch.Tensor, mask: torch.Tensor | None, strength: float) -> torch.Tensor:
        d = hidden.shape[-1]
        h = hidden.reshape(-1, d)
        x = h.float()  # (n, d)
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
