"""Side effects of an edit on text unrelated to the target behaviour: fluency cost and norm drift.

The neutral text is the model's own unedited greedy continuation of a fixed set of everyday prompts
(nothing about truthfulness), so it is in-distribution for the unedited model and the same for
every method. Fluency cost = mean per-token KL(unedited ‖ edited) of the next-token distributions
over those texts, and the edited model's perplexity on them. Norm drift = per layer, the mean ratio
‖h_edited‖ / ‖h_unedited‖ of block outputs on the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..hooks import record
from ..models import decoder_layers, pad_token_id
from ..prefix import grouped_kv_on_cpu
from ..variants import MAX_VARIANTS, Variant, attach_variants, plan_passes

__all__ = [
    "NEUTRAL_PROMPTS",
    "EditProfile",
    "NeutralText",
    "fluency_cost",
    "fluency_costs",
    "neutral_text",
    "norm_drift",
]

#: Everyday openings with nothing to do with truthfulness, bias or refusal.
NEUTRAL_PROMPTS = (
    "The recipe for a simple loaf of bread starts with",
    "On a quiet Sunday morning, the village market",
    "The train pulled into the station and",
    "To repot a houseplant, you first",
    "The history of the bicycle begins in",
    "Autumn leaves change colour because",
    "The old lighthouse keeper wrote in his diary that",
    "A good way to learn a new language is",
    "The football match was delayed because",
    "In the small kitchen, the kettle",
    "The museum's new exhibition features",
    "Writing a clear email to a colleague means",
    "The river winds through the valley, past",
    "Before a long hike, it helps to",
    "The orchestra tuned their instruments while",
    "My grandmother's garden was full of",
)


@dataclass
class NeutralText:
    """Token ids ``(batch, seq)`` with ``mask``, and the unedited log-probabilities ``(batch, seq, vocab)``
    of the continuation tokens (``scored``: positions whose next token is part of the continuation)."""

    ids: torch.Tensor
    mask: torch.Tensor
    scored: torch.Tensor
    logprobs: torch.Tensor


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with grouped_kv_on_cpu():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _log_probs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(_logits(model, ids, mask).float(), dim=-1)


@torch.no_grad()
def neutral_text(
    model: nn.Module, tok: PreTrainedTokenizerBase, max_new_tokens: int = 48, prompts: Sequence[str] = NEUTRAL_PROMPTS
) -> NeutralText:
    """Greedy unedited continuations of ``prompts`` (left-padded batch) and their log-probabilities."""
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True).to(next(model.parameters()).device)
    finally:
        tok.padding_side = side
    generate = cast(Any, model).generate
    out = generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id(tok))
    n = enc["input_ids"].shape[1]
    gen_mask = torch.ones_like(out[:, n:])
    if tok.eos_token_id is not None:  # stop counting after the first end-of-sequence token
        eos = (out[:, n:] == tok.eos_token_id).int().cumsum(1)
        gen_mask = ((eos - (out[:, n:] == tok.eos_token_id).int()) == 0).long()
    mask = torch.cat([enc["attention_mask"], gen_mask], dim=1)
    scored = torch.zeros_like(mask, dtype=torch.bool)
    scored[:, n - 1 : -1] = gen_mask.bool()  # position t predicts token t+1
    return NeutralText(out, mask, scored, _log_probs(model, out, mask))


@torch.no_grad()
def fluency_cost(model: nn.Module, text: NeutralText) -> dict[str, float]:
    """KL(unedited ‖ current) per continuation token, and perplexities, with whatever is attached now."""
    return _cost(_log_probs(model, text.ids, text.mask), text)


@torch.no_grad()
def fluency_costs(
    model: nn.Module,
    text: NeutralText,
    variants: Sequence[Variant],
    max_variants: int = MAX_VARIANTS,
    strict: bool = True,
) -> list[dict[str, float]]:
    """:func:`fluency_cost` under each of ``variants`` (scope ``all``; one result each, in order), in
    one widened pass per ``max_variants`` of them (:func:`hpredit.variants.attach_variants`): the
    blocks below the first edited one run once. Equal to one attached pass each up to float32 rounding."""
    variants = list(variants)
    out: list = [None] * len(variants)
    for chunk in plan_passes(variants, max_variants):
        with attach_variants(model, [variants[k] for k in chunk], strict) as handle:
            parts = handle.split(_logits(model, text.ids, text.mask))
        for k, part in zip(chunk, parts):
            out[k] = _cost(F.log_softmax(part.float(), dim=-1), text)
        del parts
    return out


def _cost(lp: torch.Tensor, text: NeutralText) -> dict[str, float]:
    """The fluency cost of log-probabilities ``lp`` ``(batch, seq, vocab)`` of ``text``'s tokens."""
    ref = text.logprobs
    kl = (ref.exp() * (ref - lp)).sum(-1)[text.scored]
    nxt = text.ids[:, 1:]
    nll = -lp[:, :-1].gather(-1, nxt.unsqueeze(-1)).squeeze(-1)[text.scored[:, :-1]]
    nll_ref = -ref[:, :-1].gather(-1, nxt.unsqueeze(-1)).squeeze(-1)[text.scored[:, :-1]]
    return {
        "kl": float(kl.mean()),
        "ppl": float(nll.mean().exp()),
        "ppl_unedited": float(nll_ref.mean().exp()),
        "tokens": int(text.scored.sum()),
    }


@torch.no_grad()
def norm_drift(model: nn.Module, text: NeutralText, attach) -> dict[str, dict[int, float]]:
    """Norm ratios of block outputs on the neutral tokens (means over tokens):

    - ``drift``: per layer, ‖h‖ in the edited run / ‖h‖ in the unedited run (edits upstream count);
    - ``at_edit``: per layer, ‖h‖ right after the editor's hook / right before it, in the edited run:
      what the edit itself does to the norm (1 for a norm-keeping edit; 1 at unedited layers).

    ``attach``: a zero-argument callable returning the attached handle (``lambda: ed.attach(m, ...)``).
    """
    n = len(decoder_layers(model)[1])
    pos = (text.mask.cumsum(1) - 1).clamp_min(0)
    live = text.mask.bool()

    def norms(t: torch.Tensor) -> torch.Tensor:
        return t.float().norm(dim=-1)

    def run() -> None:
        model(input_ids=text.ids, attention_mask=text.mask, position_ids=pos)

    with record(model, transform=norms) as base:
        run()
    with attach():  # the editor's hooks go first in line; one put before them sees the block's own output
        with record(model, transform=norms) as after, record(model, transform=norms, prepend=True) as before:
            run()
    ratio = lambda a, b: float((a[live] / b[live].clamp_min(1e-12)).mean())  # noqa: E731
    return {
        "drift": {i: ratio(after[i], base[i]) for i in range(n)},
        "at_edit": {i: ratio(after[i], before[i]) for i in range(n)},
    }


class _Moments:
    """Count, sum and sum of squares of a stream of values (float64), and the largest magnitude."""

    def __init__(self) -> None:
        self.n, self.sum, self.sumsq, self.max_abs = 0, 0.0, 0.0, 0.0

    def add(self, values: torch.Tensor) -> None:
        if values.numel():
            self.n += values.numel()
            self.sum += float(values.sum())
            self.sumsq += float((values * values).sum())
            self.max_abs = max(self.max_abs, float(values.abs().max()))

    def merged(self, other: _Moments) -> _Moments:
        out = _Moments()
        out.n, out.sum, out.sumsq = self.n + other.n, self.sum + other.sum, self.sumsq + other.sumsq
        out.max_abs = max(self.max_abs, other.max_abs)
        return out

    def to_dict(self) -> dict[str, float | None]:
        if not self.n:
            return {"mean": None, "std": None, "max_abs": None}
        mean = self.sum / self.n
        return {"mean": mean, "std": max(self.sumsq / self.n - mean * mean, 0.0) ** 0.5, "max_abs": self.max_abs}


@dataclass
class _LayerProfile:
    tokens: int = 0
    angle: _Moments = field(default_factory=_Moments)  #: degrees between h and h', edited tokens
    delta: _Moments = field(default_factory=_Moments)  #: ‖h' − h‖ / ‖h‖, edited tokens
    norm: _Moments = field(default_factory=_Moments)  #: ‖h'‖ / ‖h‖ − 1, edited tokens

    def merged(self, other: _LayerProfile) -> _LayerProfile:
        return _LayerProfile(
            self.tokens + other.tokens,
            self.angle.merged(other.angle),
            self.delta.merged(other.delta),
            self.norm.merged(other.norm),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "edited": self.angle.n / self.tokens if self.tokens else None,
            "angle_deg": self.angle.to_dict(),
            "delta_rel": self.delta.to_dict(),
            "norm_change": self.norm.to_dict(),
        }


class EditProfile:
    """What an edit does, per edited layer, on the tokens it saw: the fraction of (unpadded) tokens it
    changed and, over those, the angle it turned them by (degrees, mean and spread), the size of the
    change relative to the activation ‖h' − h‖ / ‖h‖ (for an additive edit: the added vector's norm),
    and the norm change ‖h'‖ / ‖h‖ − 1 (0 for a norm-keeping edit).

    Pass it as ``observe=`` to :meth:`~hpredit.editors.Editor.attach`; :meth:`summary` gives the
    numbers. A token counts as changed when ‖h' − h‖ > tol·‖h‖ with tol = max(1e-5, the dtype's
    machine epsilon): above the rounding of an edit that leaves a token alone, below any real edit.
    Computed in float64 (the angle as atan2 of the orthogonal and parallel parts, exact near 0).
    """

    def __init__(self) -> None:
        self.layers: dict[int, _LayerProfile] = {}

    @torch.no_grad()
    def __call__(
        self, layer: int, before: torch.Tensor, after: torch.Tensor, attention: torch.Tensor | None = None
    ) -> None:
        b, a = before.detach().double(), after.detach().double()
        nb = b.norm(dim=-1)
        delta = (a - b).norm(dim=-1)
        live = torch.ones_like(nb, dtype=torch.bool) if attention is None else attention.to(nb.device).bool()
        tol = max(1e-5, torch.finfo(before.dtype).eps)
        edited = live & (delta > tol * nb)
        unit = b / nb.clamp_min(1e-300).unsqueeze(-1)
        along = (a * unit).sum(-1)
        across = (a - along.unsqueeze(-1) * unit).norm(dim=-1)
        angle = torch.rad2deg(torch.atan2(across, along))
        prof = self.layers.setdefault(layer, _LayerProfile())
        prof.tokens += int(live.sum())
        safe = nb[edited].clamp_min(1e-300)
        prof.angle.add(angle[edited])
        prof.delta.add(delta[edited] / safe)
        prof.norm.add(a.norm(dim=-1)[edited] / safe - 1)

    def summary(self) -> dict[str, Any]:
        """``{"layers": {"15": profile, …}, "all": profile}``; a profile is ``tokens``, ``edited`` (the
        fraction changed) and ``angle_deg``, ``delta_rel``, ``norm_change`` (each mean, std and
        largest magnitude over the changed tokens); ``all`` pools every edited layer's tokens."""
        pooled = _LayerProfile()
        for prof in self.layers.values():
            pooled = pooled.merged(prof)
        return {
            "layers": {str(i): self.layers[i].to_dict() for i in sorted(self.layers)},
            "all": pooled.to_dict(),
        }
