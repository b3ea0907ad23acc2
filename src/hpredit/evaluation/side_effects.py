"""Side effects of an edit on text unrelated to the target behaviour: fluency cost and norm drift.

The neutral text is the model's own unedited greedy continuation of a fixed set of everyday prompts
(nothing about truthfulness), so it is in-distribution for the unedited model and the same for
every method. Fluency cost = mean per-token KL(unedited ‖ edited) of the next-token distributions
over those texts, and the edited model's perplexity on them. Norm drift = per layer, the mean ratio
‖h_edited‖ / ‖h_unedited‖ of block outputs on the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..hooks import record
from ..models import decoder_layers, pad_token_id

__all__ = ["NEUTRAL_PROMPTS", "NeutralText", "fluency_cost", "neutral_text", "norm_drift"]

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


def _log_probs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    return F.log_softmax(logits, dim=-1)


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
    lp = _log_probs(model, text.ids, text.mask)
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
