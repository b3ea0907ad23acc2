"""Scoring continuations on a shared prefix's KV cache, and batched greedy generation — for any task.

:func:`score_continuations` gives the summed log-probability of each continuation after its
context. With ``cached=True`` the token prefix shared by all contexts runs once; each context's own
tokens run once on top of its KV cache (a group of contexts in one right-padded batch); the
continuations run in right-padded batches on top of their context's cache rows. No token is run
twice. ``cached=False`` scores each full text in a plain forward pass instead (the reference); the
two agree up to float rounding.

Tokenisation boundary: scores use the tokens of ``context + continuation``; a continuation's
tokens start where they first differ from the context's tokens. When the tokenizer merges across
the boundary (the context's tokens are not a prefix of the full text's), the merged token is scored
as part of the continuation, conditioned on the context tokens before it, in both paths; such
continuations are counted in ``merged``.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from .. import distributed
from ..checks import check_count
from ..errors import HpreditError
from ..hooks import EditObserver
from ..models import backbone, decoder_layers, max_positions, pad_token_id, text_config
from ..prefix import PrefixCache, cache_kwarg, common_prefix_length, grouped_kv_on_cpu, pad_right
from ..variants import (
    MAX_VARIANTS,
    Variant,
    VariantHandle,
    attach_variants,
    observers_for,
    plan_passes,
    select_cache_rows,
)

__all__ = ["ContinuationScores", "encode_continuations", "generate_texts", "score_continuations", "score_variants"]


@dataclass(frozen=True)
class _Encoded:
    """One context and its continuations as token ids: ``full[i]`` is context + continuation i,
    whose own tokens start at ``starts[i]``."""

    context: list[int]
    full: list[list[int]]
    starts: list[int]


def _input_ids(tok, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tok(texts)["input_ids"]]


def encode_continuations(tok, items: Sequence[tuple[str, Sequence[str]]]) -> list[_Encoded]:
    """Tokenise ``(context, continuations)`` items; a continuation is scored from the first token
    where ``context + continuation`` differs from ``context`` (see the module docstring)."""
    contexts = [c for c, _ in items]
    fulls = [c + x for c, conts in items for x in conts]
    ctx_ids = _input_ids(tok, contexts) if contexts else []
    full_ids = _input_ids(tok, fulls) if fulls else []
    out, k = [], 0
    for (context, conts), ctx in zip(items, ctx_ids):
        if not conts:
            raise HpreditError(f"no continuations to score after context {context[-40:]!r}")
        full = full_ids[k : k + len(conts)]
        k += len(conts)
        starts = [common_prefix_length([ctx, f]) for f in full]
        for cont, f, s in zip(conts, full, starts):
            if s == 0:
                raise HpreditError(f"context {context[-40:]!r} has no tokens before continuation {cont!r}")
            if s >= len(f):
                raise HpreditError(f"continuation {cont!r} has no tokens of its own after {context[-40:]!r}")
        out.append(_Encoded(ctx, full, starts))
    return out


@dataclass
class ContinuationScores:
    """Summed log-probabilities per item and continuation, and how many merged at the boundary."""

    scores: list[list[float]]
    merged: int = 0
    tokens: int = 0  #: continuation tokens scored


def _row_scores(logits: torch.Tensor, targets: torch.Tensor, first: list[int], lengths: list[int]) -> list[float]:
    """Per row, the sum of ``log p(targets[r, t])`` over input positions ``first[r] <= t < lengths[r]``.

    ``logits`` (batch, seq, vocab) are the model's outputs at each input position and ``targets``
    (batch, seq) the tokens that follow them. The log-softmax is taken in float32.
    """
    logits = logits.float()
    targets = targets.to(logits.device)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    pos = torch.arange(targets.shape[1], device=logits.device)[None, :]
    first_t = torch.tensor(first, device=logits.device)[:, None]
    length_t = torch.tensor(lengths, device=logits.device)[:, None]
    keep = (pos >= first_t) & (pos < length_t)
    return torch.where(keep, picked, 0.0).sum(dim=1).double().tolist()


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _gaps_are_exact(model: nn.Module, longest: int) -> bool:
    """Whether padding *between* a cached prefix and new tokens is exact for ``model``: it must take
    ``position_ids``, and attend globally (or through sliding windows longer than ``longest``)."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return False
    config = text_config(model)
    kinds = set(getattr(config, "layer_types", None) or [])
    if kinds - {"full_attention", "sliding_attention"}:
        return False
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in kinds or (window is not None and getattr(config, "use_sliding_window", True))
    return not sliding or (isinstance(window, int) and window > longest)


def _token_chunks(lengths: list[int], budget: int) -> list[list[int]]:
    """Cut row indices, sorted longest first, into chunks whose padded size ≤ ``budget`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[tuple[str, Sequence[str]]],
    cached: bool = True,
    group_size: int = 16,
    batch_tokens: int = 512,
    progress: bool = False,
    layers_path: str | None = None,
) -> ContinuationScores:
    """Summed log-probability of each continuation given its context, for ``(context,
    continuations)`` items.

    ``cached=True``: the token prefix shared by all contexts runs once (on the model's backbone,
    so without logits); then, per group of ``group_size`` items of similar context length, their
    remaining context tokens run once, right-padded, on top of it; then all continuations of the
    group, sorted by length, in right-padded batches of at most ``batch_tokens`` tokens on top of
    their own context's cache rows, through the full causal LM. Each continuation row starts at its
    context's last token, whose logits predict the first continuation token, and stops before the
    continuation's last token, whose logits are not needed. When contexts in a
    group differ in length, the padding between context and continuation is masked out and
    ``position_ids`` continue each context, so the numbers are those of unpadded texts; models for
    which that is not exact (no ``position_ids``, short sliding windows) use groups of one item,
    where each item's continuations share its own cache with no padding in between.

    ``cached=False``: each full text in its own forward pass (the reference). An attached editor
    applies to every forward pass, cached prefixes included.
    """
    return score_variants(model, tok, items, [Variant()], cached, group_size, batch_tokens, progress, layers_path)[0]


@torch.no_grad()
def score_variants(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[tuple[str, Sequence[str]]],
    variants: Sequence[Variant],
    cached: bool = True,
    group_size: int = 16,
    batch_tokens: int = 512,
    progress: bool = False,
    layers_path: str | None = None,
    max_variants: int = MAX_VARIANTS,
    strict: bool = True,
    observers: Sequence[EditObserver | None] | None = None,
) -> list[ContinuationScores]:
    """:func:`score_continuations` under each of ``variants`` (one result each, in order), in one
    pass per ``max_variants`` of them: the blocks below the first edited one run once per text, the
    rest once per variant (:func:`hpredit.variants.attach_variants`). Each variant's scores equal
    its own attached pass up to float32 rounding. ``batch_tokens`` bounds the tokens of one
    forward over all variants' rows (so memory and the logits stay the size of one variant's
    ``batch_tokens``). ``cached=False``: one reference pass per variant.
    ``observers``: one per variant (or None), seeing its edits (``Editor.attach``'s ``observe``).
    """
    if group_size < 1 or batch_tokens < 1:
        raise HpreditError(f"group_size and batch_tokens must be at least 1, got {group_size} and {batch_tokens}")
    check_count(max_variants, "max_variants")
    variants = list(variants)
    watch = observers_for(observers, len(variants))
    encoded = encode_continuations(tok, items)
    if not encoded:
        return [ContinuationScores([], 0, 0) for _ in variants]
    merged = sum(s < len(e.context) for e in encoded for s in e.starts)
    tokens = sum(len(f) - s for e in encoded for f, s in zip(e.full, e.starts))
    passes = plan_passes(variants, max_variants) if cached else [[k] for k in range(len(variants))]
    bar = distributed.progress(len(encoded) * len(passes), "scoring", unit="question", disable=not progress)
    scores: list = [None] * len(variants)
    try:
        with distributed.step("scoring"):
            for chunk in passes:
                if cached:
                    which, seeing = [variants[k] for k in chunk], [watch[k] for k in chunk]
                    with attach_variants(model, which, strict, layers_path, seeing) as handle, grouped_kv_on_cpu():
                        results = _CachedScorer(model, tok, encoded, layers_path, handle).run(
                            group_size, batch_tokens, bar
                        )
                else:
                    with variants[chunk[0]].attach(model, strict, observe=watch[chunk[0]]):
                        results = [None if r is None else [r] for r in _score_uncached(model, encoded, bar)]
                per_item = _from_every_rank(results)
                for j, k in enumerate(chunk):
                    scores[k] = [item[j] for item in per_item]
    finally:
        bar.close()
    return [ContinuationScores(s, merged, tokens) for s in scores]


def _from_every_rank(results: list) -> list:
    """Under data parallelism each rank filled the items of its own work units (the others stay
    ``None``): give every rank all of them. In one process: ``results`` as they are."""
    if not distributed.active():
        return results
    merged = list(results)
    for theirs in distributed.all_gather({k: r for k, r in enumerate(results) if r is not None}):
        for k, r in theirs.items():
            merged[k] = r
    return merged


def _score_uncached(model: nn.Module, encoded: list[_Encoded], bar) -> list[list[float]]:
    """The reference: each full text in its own forward pass."""
    device = next(model.parameters()).device
    results: list = [None] * len(encoded)
    for k, e in enumerate(encoded):
        if not distributed.owns(k):
            continue
        results[k] = []
        for f, s in zip(e.full, e.starts):
            ids = torch.tensor([f], dtype=torch.long)
            logits = model(input_ids=ids[:, :-1].to(device), use_cache=False).logits
            results[k].extend(_row_scores(logits[:, s - 1 :], ids[:, s:], [0], [len(f) - s]))
        bar.update()
    return results


class _CachedScorer:
    """The cached path of :func:`score_continuations`, in three stages: the prefix shared by all
    contexts (once), each group's own context tokens (once per group), the continuation rows."""

    def __init__(self, model: nn.Module, tok, encoded: list[_Encoded], layers_path: str | None, handle: VariantHandle):
        self.model, self.encoded = model, encoded
        self.width = handle.width if handle.widens else 1  # output rows per input row
        self.variants = handle.width
        self.device = next(model.parameters()).device
        path, _ = decoder_layers(model, layers_path)
        # Tokens cached per item: everything before its earliest scored token, less one, so that
        # each continuation row's first position yields the logits of its first scored token.
        self.cached_context = [e.context[: min(e.starts) - 1] for e in encoded]
        self.shared = common_prefix_length(self.cached_context)
        self.root = PrefixCache(backbone(model, path), self.cached_context[0][: self.shared])
        self.longest = (
            max(len(f) for e in encoded for f in e.full) + max(len(h) for h in self.cached_context) - self.shared
        )
        self.cache_key = cache_kwarg(model)
        self.pad_id = pad_token_id(tok)

    def run(self, group_size: int, batch_tokens: int, bar) -> list[list[list[float]]]:
        """Per item, per variant (the handle's, in order), the scores of its continuations."""
        if not _gaps_are_exact(self.model, self.longest):
            group_size = 1
        results: list = [None] * len(self.encoded)  # filled for this rank's groups
        order = sorted(range(len(self.encoded)), key=lambda k: len(self.cached_context[k]))
        for unit, g in enumerate(range(0, len(order), group_size)):
            if not distributed.owns(unit):
                continue
            members = order[g : g + group_size]
            for k, scores in zip(members, self._score_group(members, batch_tokens)):
                results[k] = scores
            bar.update(len(members))
        return results

    def _group_cache(self, members: list[int]):
        """The cache of the group's context tokens on top of the shared prefix, with their mask
        ``(group, width)`` and own lengths ``(group,)``."""
        qlen = torch.tensor([len(self.cached_context[k]) - self.shared for k in members])
        if int(qlen.max()) > 0:
            ids, qmask = pad_right([self.cached_context[k][self.shared :] for k in members], self.pad_id)
            return _cache_of(self.root.run(ids, qmask)), qmask, qlen
        qmask = torch.zeros((len(members), 0), dtype=torch.long)
        cache = copy.deepcopy(self.root.cache)
        if cache is not None:
            cache.batch_repeat_interleave(len(members))
        return cache, qmask, qlen

    def _score_group(self, members: list[int], batch_tokens: int) -> list[list[list[float]]]:
        """Each continuation of the group's items, per item and variant, in token-budgeted chunks on its cache."""
        group_cache, qmask, qlen = self._group_cache(members)
        gaps = bool((qlen != int(qlen.max())).any())
        rows = [(m, j) for m, k in enumerate(members) for j in range(len(self.encoded[k].full))]
        # a row's inputs: the context's last token and the continuation without its last token
        row_tokens = [self.encoded[members[m]].full[j][len(self.cached_context[members[m]]) :] for m, j in rows]
        scores: dict[tuple[int, int, int], float] = {}
        w = self.width
        # the budget counts the rows of every variant: the widened forward's size (and its logits) stays put
        budget = max(1, batch_tokens // w)
        for chunk in _token_chunks([len(t) - 1 for t in row_tokens], budget):
            which = torch.tensor([rows[r][0] for r in chunk])
            ids, amask = pad_right([row_tokens[r][:-1] for r in chunk], self.pad_id)
            targets, _ = pad_right([row_tokens[r][1:] for r in chunk], self.pad_id)
            mask = torch.cat([torch.ones((len(chunk), self.shared), dtype=torch.long), qmask[which], amask], dim=1)
            kwargs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "use_cache": True}
            if group_cache is not None:
                kwargs[self.cache_key] = select_cache_rows(group_cache, which.to(self.device), len(members))
            if gaps:
                start = self.shared + qlen[which]
                kwargs["position_ids"] = (start[:, None] + torch.arange(ids.shape[1])[None, :]).to(self.device)
            first, lengths = [], []
            for r in chunk:
                m, j = rows[r]
                k = members[m]
                first.append(self.encoded[k].starts[j] - len(self.cached_context[k]) - 1)
                lengths.append(len(row_tokens[r]) - 1)
            logits = self.model(**kwargs).logits  # (w·chunk, seq, vocab), variant-major
            values = _row_scores(logits, targets.repeat(w, 1), first * w, lengths * w)
            for v in range(w):
                for r, value in zip(chunk, values[v * len(chunk) : (v + 1) * len(chunk)]):
                    scores[(v, *rows[r])] = value
        # a handle that edits nothing does not widen: its variants share one set of scores
        return [
            [[scores[(min(v, w - 1), m, j)] for j in range(len(self.encoded[k].full))] for v in range(self.variants)]
            for m, k in enumerate(members)
        ]


def _fit_context(max_new_tokens: int, prompt_tokens: int, context: int | None) -> int:
    """``max_new_tokens`` cut so that the longest prompt and its answer fit the model's context
    (said once, as a warning); a prompt that fills the context alone is refused."""
    if context is None or prompt_tokens + max_new_tokens <= context:
        return max_new_tokens
    room = context - prompt_tokens
    if room < 1:
        raise HpreditError(f"a prompt of {prompt_tokens} tokens leaves no room in the model's {context} positions")
    warnings.warn(
        f"max_new_tokens {max_new_tokens}: the longest prompt ({prompt_tokens} tokens) leaves room for "
        f"{room} in the model's {context} positions; generating at most {room}",
        stacklevel=3,
    )
    return room


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 50,
    batch_size: int = 16,
    stop_strings: Sequence[str] | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens dropped), in their order.

    Batched with left padding, prompts grouped by length to keep padding small; a row stops at
    end-of-sequence, at one of ``stop_strings`` or after ``max_new_tokens``.
    """
    if max_new_tokens < 1:
        raise HpreditError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise HpreditError(f"batch_size must be at least 1, got {batch_size}")
    lengths = [len(ids) for ids in _input_ids(tok, list(prompts))] if prompts else []
    max_new_tokens = _fit_context(max_new_tokens, max(lengths, default=0), max_positions(model))
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    eos = getattr(model.generation_config, "eos_token_id", None)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_token_id(tok),
        eos_token_id=eos if eos is not None else tok.eos_token_id,
        stop_strings=list(stop_strings) if stop_strings else None,
    )
    device = next(model.parameters()).device
    texts: list = [None] * len(prompts)  # filled for this rank's batches
    side = tok.padding_side
    tok.padding_side = "left"
    bar = distributed.progress(len(prompts), "generating", unit="prompt", disable=not progress)
    try:
        with distributed.step("generating"):
            _generate_batches(model, tok, prompts, order, batch_size, config, stop_strings, device, texts, bar)
    finally:
        tok.padding_side = side
        bar.close()
    return _from_every_rank(texts)


def _generate_batches(model, tok, prompts, order, batch_size, config, stop_strings, device, texts, bar) -> None:
    """This rank's batches of :func:`generate_texts` (every batch in one process)."""
    for unit, b in enumerate(range(0, len(order), batch_size)):
        if not distributed.owns(unit):
            continue
        batch = order[b : b + batch_size]
        enc = tok([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
        out = cast(Any, model).generate(**enc, generation_config=config, tokenizer=tok if stop_strings else None)
        new = out[:, enc["input_ids"].shape[1] :]
        for i, row in zip(batch, new):
            texts[i] = str(tok.decode(row, skip_special_tokens=True))
        bar.update(len(batch))
