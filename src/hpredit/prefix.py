"""Running many continuations on top of one shared prefix's KV cache.

Used wherever texts share a long prompt (the TruthfulQA primer and question): the prefix is
computed once and each batch of continuations attends to it, right-padded, with positions
continuing after the prefix. Results equal a full forward pass of each text up to float rounding.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["PrefixCache", "cache_kwarg", "common_prefix_length", "grouped_kv_on_cpu", "pad_right"]

#: ``enable_gqa`` of ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch 2.5 and later).
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@contextmanager
def grouped_kv_on_cpu() -> Iterator[None]:
    """Within the block, transformers' SDPA attention gives grouped KV heads (GQA) to PyTorch as
    they are (``enable_gqa``) on CPU tensors even with a mask, instead of first copying each KV
    head once per query head (``repeat_kv``), which it does whenever a mask is given. The result
    is bitwise the same; the copy is most of the attention time when many rows attend to a long
    cached prefix. On other devices transformers' own rule stands (with a mask, CUDA's GQA kernel
    falls back to the slow path). A no-op where transformers or PyTorch lack the hook."""
    module = sys.modules.get("transformers.integrations.sdpa_attention")
    original = getattr(module, "use_gqa_in_sdpa", None)
    if module is None or original is None or not _SDPA_GQA:
        yield
        return

    def use_gqa(attention_mask, key: torch.Tensor, value: torch.Tensor) -> bool:
        if key.device.type == "cpu" and key.shape[-1] == value.shape[-1]:
            return True
        return original(attention_mask, key, value)

    module.use_gqa_in_sdpa = use_gqa  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.use_gqa_in_sdpa = original  # type: ignore[attr-defined]


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token sequences."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as a right-padded batch: ``(ids, mask)``, both ``(batch, longest)``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[r, : len(seq)] = 1
    return ids, mask


def cache_kwarg(module: nn.Module) -> str:
    """The keyword ``module.forward`` takes its KV cache by: ``cache`` (newer transformers) or ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class PrefixCache:
    """The KV cache of a token prefix (batch 1) for ``module`` (a causal LM or its backbone).

    ``extend(ids)`` returns a new PrefixCache with more tokens; ``run(ids, mask)`` runs a
    right-padded batch of continuations on top and returns the module's output.
    """

    def __init__(self, module: nn.Module, ids: Sequence[int] = (), _cache=None, _length: int = 0):
        self.module = module
        self.key = cache_kwarg(module)
        self.cache = _cache
        self.length = _length
        self.device = next(module.parameters()).device
        if ids:
            extended = self.extend(ids)
            self.cache, self.length = extended.cache, extended.length

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache):
        kwargs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "use_cache": True}
        if cache is not None:
            kwargs[self.key] = cache
        return self.module(**kwargs)

    def _copy(self, batch: int):
        if self.cache is None:
            return None
        cache = copy.deepcopy(self.cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache

    def extend(self, ids: Sequence[int]) -> PrefixCache:
        """A new prefix: this one followed by ``ids`` (this one is left untouched)."""
        if not ids:
            return self
        t = torch.tensor([list(ids)], dtype=torch.long)
        mask = torch.ones((1, self.length + len(ids)), dtype=torch.long)
        out = self._forward(t, mask, self._copy(1))
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        return PrefixCache(self.module, (), cache, self.length + len(ids))

    def run(self, ids: torch.Tensor, mask: torch.Tensor):
        """Run continuations ``ids`` (batch, seq), right-padded with ``mask`` (batch, seq), after
        the prefix; the prefix cache is copied, never modified."""
        full_mask = torch.cat([torch.ones((ids.shape[0], self.length), dtype=mask.dtype), mask], dim=1)
        return self._forward(ids, full_mask, self._copy(ids.shape[0]))
