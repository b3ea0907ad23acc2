"""Attaching an editor to a model: forward hooks, token scopes, padding and the KV cache.

A handle owns all state for one attachment (no module-level state), so two models, or two
batches, never share it. ``remove()`` restores the model exactly: hooks gone, ``generate``
unpatched, weights never touched.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .architecture import attention_output, backbone, decoder_layers
from .checks import SCOPES, check_layers, check_scope, check_strength
from .errors import HpreditError
from .geometry import broadcast_strength

__all__ = [
    "SCOPES",
    "EditHandle",
    "EditObserver",
    "LayerEdit",
    "StopForward",
    "broadcast_strength",
    "check_scope",
    "record",
    "refresh_compiled_graphs",
    "token_strength",
    "untuple",
]

#: ``edit(hidden (batch, seq, d), mask (batch, seq) bool or None, strength) -> hidden``, built once
#: per attach. ``strength``: a number, or a tensor of per-token strengths broadcastable to
#: ``hidden.shape[:-1]`` (``(batch, seq)``, or ``(n,)`` for flattened tokens ``(n, d)``); a token
#: with strength 0 (or outside ``mask``) comes back bit for bit.
LayerEdit = Callable[[torch.Tensor, "torch.Tensor | None", "float | torch.Tensor"], torch.Tensor]

#: ``observe(layer, before (batch, seq, d), after (batch, seq, d), attention (batch, seq) or None)``:
#: called after each edit of an attached handle (e.g. to profile it); ``attention`` marks the call's
#: real tokens (1) and padding (0) where the model was given a mask.
EditObserver = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


def token_strength(
    hidden: torch.Tensor, mask: torch.Tensor | None, strength: float | torch.Tensor
) -> tuple[torch.Tensor | None, float | torch.Tensor | None]:
    """For additive edits: ``(mask, s)`` with per-token strengths folded into the mask (``s`` then
    ``(..., 1)`` float32, zero tokens masked out); ``s`` is None when nothing is to be edited."""
    if not isinstance(strength, torch.Tensor):
        return mask, (None if strength == 0 else float(strength))
    lead = hidden.shape[:-1]
    s = broadcast_strength(strength, lead, hidden.device)
    nonzero = s != 0
    mask = nonzero if mask is None else mask.broadcast_to(lead) & nonzero
    return mask, s.unsqueeze(-1)


#: Where :func:`record` reads: block outputs, or the input of each attention output projection
#: (the concatenated per-head outputs; ``heads`` is the same site under the editors' name).
RECORD_SITES = ("residual", "attn_in", "heads")


def untuple(output: Any) -> torch.Tensor:
    """The hidden states of a module's output: ``output[0]`` for a tuple, else the output itself."""
    return output[0] if isinstance(output, tuple) else output


class StopForward(Exception):
    """Raised by :func:`record` with ``stop=True`` once the last recorded block has run."""


def _output_hook(out: dict[int, Any], i: int, keep: Callable[[torch.Tensor], Any]):
    """A forward hook that stores its module's output, through ``keep``, as ``out[i]`` (block ``i``'s output)."""

    def hook(_module, _args, output):
        out[i] = keep(untuple(output))

    return hook


def _input_hook(out: dict[int, Any], i: int, keep: Callable[[torch.Tensor], Any]):
    """A forward pre-hook that stores its module's input, through ``keep``, as ``out[i]`` (block ``i``'s heads)."""

    def hook(_module, args):
        out[i] = keep(args[0])

    return hook


def _stop_hook(_module, _args, _output):
    """A forward hook that ends the forward (:class:`StopForward`): the blocks above it never run."""
    raise StopForward


@contextlib.contextmanager
def record(
    model: nn.Module,
    layers: Sequence[int] | None = None,
    site: str = "residual",
    layers_path: str | None = None,
    transform: Callable[[torch.Tensor], Any] | None = None,
    prepend: bool = False,
    stop: bool = False,
) -> Iterator[dict[int, Any]]:
    """Record activations of ``layers`` (default: every block) during the forwards run inside the block.

    Yields a dict ``{layer: tensor}`` that each forward overwrites: the block output
    (``site="residual"``, ``(batch, seq, d)``) or the input of the attention output projection
    (``site="attn_in"``/``"heads"``, ``(batch, seq, heads·head_dim)``), passed through ``transform``
    when given (e.g. a norm, to keep less). ``prepend`` puts the hooks first in line (before hooks
    installed earlier, such as an attached editor's). With ``stop`` the forward raises
    :class:`StopForward` after the last recorded block (the caller catches it), so the blocks above
    never run. The hooks are removed in ``finally``, whatever happens inside the block.

    Example:
        >>> with record(model, [0, 2]) as acts:
        ...     _ = model(ids)
        >>> sorted(acts), acts[2].shape == (*ids.shape, model.config.hidden_size)
        ([0, 2], True)
    """
    if site not in RECORD_SITES:
        raise HpreditError(f"unknown record site {site!r}: use residual or attn_in")
    _, blocks = decoder_layers(model, layers_path)
    chosen = check_layers(layers, len(blocks)) or list(range(len(blocks)))
    keep = transform or (lambda t: t)
    out: dict[int, Any] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for i in chosen:
            if site == "residual":
                handles.append(blocks[i].register_forward_hook(_output_hook(out, i, keep), prepend=prepend))
            else:
                proj = attention_output(blocks[i])
                handles.append(proj.register_forward_pre_hook(_input_hook(out, i, keep), prepend=prepend))
        if stop and chosen:
            handles.append(blocks[max(chosen)].register_forward_hook(_stop_hook))
        yield out
    finally:
        for h in handles:
            h.remove()


def refresh_compiled_graphs() -> None:
    """Make ``torch.compile`` see hooks come and go, so an attach or detach never runs a stale graph.

    By default dynamo does not guard on ``nn.Module`` hooks (``torch._dynamo.config.
    skip_nnmodule_hook_guards``): a model compiled before an editor is attached would keep running
    its unedited graph, and one compiled while attached its edited graph after ``remove()``. The
    first attach in a process therefore turns those guards on (a cheap check of the hook dicts per
    call) and drops the graphs compiled so far, which lack them (``torch._dynamo.reset()``); from
    then on an attach or detach just recompiles, or reuses the matching graph. Nothing happens in a
    process where nothing imported dynamo (nothing was compiled).
    """
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and dynamo.config.skip_nnmodule_hook_guards:
        dynamo.config.skip_nnmodule_hook_guards = False
        dynamo.reset()


def _last_real_index(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Index of the last attended position per row ``(batch,)`` (length-1 without a mask)."""
    if mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    mask = mask[:, :length].to(device)
    pos = torch.arange(mask.shape[1], device=device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.full_like(pos, -1)).amax(dim=1)


@dataclass
class _ScopeState:
    """Where the prompt ends, per row, in absolute (padded) positions; set per generate() or prompt."""

    scope: str
    prompt_len: int = 0
    last_prompt: torch.Tensor | None = None  # (batch,)
    in_generate: bool = False
    past_len: int = 0
    mask: torch.Tensor | None = None  # (batch, seq) for the current forward call
    mask_ready: bool = False
    call_attention: torch.Tensor | None = field(default=None, repr=False)

    def start_prompt(self, attention_mask: torch.Tensor | None, batch: int, length: int, device) -> None:
        self.prompt_len = length
        self.last_prompt = _last_real_index(attention_mask, batch, length, device)

    def begin_call(self, attention_mask, past_len: int) -> None:
        self.past_len = past_len
        self.call_attention = attention_mask
        self.mask_ready = False

    def edit_mask(self, batch: int, seq: int, device) -> torch.Tensor | None:
        if self.scope == "all":
            return None
        if self.mask_ready:
            return self.mask
        if not self.in_generate and self.past_len == 0:
            # A fresh forward pass outside generate(): this call is the prompt.
            self.start_prompt(self.call_attention, batch, seq, device)
        if self.last_prompt is None:
            self.start_prompt(None, batch, self.prompt_len or seq, device)
        elif self.last_prompt.shape[0] != batch:
            n = self.last_prompt.shape[0]
            if batch % n == 0:  # generate() expanded each prompt (beams, num_return_sequences)
                self.last_prompt = self.last_prompt.repeat_interleave(batch // n)
            else:
                self.start_prompt(None, batch, self.prompt_len or seq, device)
        pos = torch.arange(self.past_len, self.past_len + seq, device=device)
        mask = (pos >= self.prompt_len).expand(batch, seq)
        if self.scope == "last-prompt-and-generated":
            assert self.last_prompt is not None  # set above
            mask = mask | (pos[None, :] == self.last_prompt.to(device)[:, None])
        self.mask, self.mask_ready = mask, True
        return mask


def _past_length(kwargs: dict, seq: int) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None:
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            return int(cache[0][0].shape[-2])
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] > seq:
        return mask.shape[1] - seq
    return 0


def _input_length(args: tuple, kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        v = kwargs.get(key)
        if isinstance(v, torch.Tensor):
            return v.shape[1]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[1]
    return None


class EditHandle:
    """An editor attached to a model. Use as a context manager or call :meth:`remove`."""

    def __init__(
        self,
        model: nn.Module,
        edits: dict[int, LayerEdit],
        strength: float = 1.0,
        scope: str = "all",
        layers_path: str | None = None,
        site: str = "residual",
        observe: EditObserver | None = None,
    ) -> None:
        self.model = model
        self._observe = observe
        self.strength = check_strength(strength)
        self.scope = check_scope(scope)
        self._state = _ScopeState(self.scope)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._patched_generate = False
        path, blocks = decoder_layers(model, layers_path)
        try:
            for layer, fn in edits.items():
                if site == "residual":  # the block's output; first in line, so that hooks others
                    # installed earlier (transformers' output_hidden_states capture) see the edit
                    hook = self._layer_hook(self._observed(layer, fn))
                    self._hooks.append(blocks[layer].register_forward_hook(hook, prepend=True))
                elif site == "heads":  # the input of the attention output projection
                    proj = attention_output(blocks[layer])
                    hook = self._input_hook(self._observed(layer, fn))
                    self._hooks.append(proj.register_forward_pre_hook(hook, prepend=True))
                else:
                    raise HpreditError(f"unknown edit site {site!r}: use residual or heads")
            if self.scope != "all" or observe is not None:  # positions matter only for the other scopes
                # (and read the cache length, which a compiled graph would specialise on); an observer
                # needs the call's attention mask
                self._hooks.append(backbone(model, path).register_forward_pre_hook(self._call_hook, with_kwargs=True))
            if "generate" in dir(model) and callable(model.generate):
                self._wrap_generate()
            refresh_compiled_graphs()
        except BaseException:
            self.remove()
            raise

    # -------------------------------------------------------------- hooks

    def _call_hook(self, _module, args, kwargs):
        seq = _input_length(args, kwargs)
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._state.begin_call(mask, _past_length(kwargs, seq or 0))

    def _observed(self, layer: int, fn: LayerEdit) -> LayerEdit:
        """``fn``, reporting each call's input and output to the observer (if any)."""
        observe, state = self._observe, self._state
        if observe is None:
            return fn

        def edit(hidden, mask, strength):
            edited = fn(hidden, mask, strength)
            attention = state.call_attention
            if attention is not None:  # with a KV cache the mask covers the past too: this call's columns
                attention = attention[:, -hidden.shape[1] :] if attention.shape[0] == hidden.shape[0] else None
            observe(layer, hidden, edited, attention)
            return edited

        return edit

    def _layer_hook(self, fn: LayerEdit):
        state, strength = self._state, self.strength

        def hook(_module, _args, output):
            hidden = untuple(output)
            mask = state.edit_mask(hidden.shape[0], hidden.shape[1], hidden.device)
            edited = fn(hidden, mask, strength)
            if isinstance(output, tuple):
                return (edited, *output[1:])
            return edited

        return hook

    def _input_hook(self, fn: LayerEdit):
        state, strength = self._state, self.strength

        def hook(_module, args):
            hidden = args[0]
            mask = state.edit_mask(hidden.shape[0], hidden.shape[1], hidden.device)
            return (fn(hidden, mask, strength), *args[1:])

        return hook

    def _wrap_generate(self) -> None:
        original: Callable[..., Any] = self.model.generate  # type: ignore[assignment]
        state = self._state

        @functools.wraps(original)
        def generate(*args, **kwargs):
            ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            if isinstance(ids, torch.Tensor):
                mask = kwargs.get("attention_mask")
                state.start_prompt(mask, ids.shape[0], ids.shape[1], ids.device)
            state.in_generate = True
            try:
                return original(*args, **kwargs)
            finally:
                state.in_generate = False

        self.model.generate = generate  # type: ignore[assignment]
        self._patched_generate = True

    # -------------------------------------------------------------- lifetime

    def remove(self) -> None:
        """Detach: remove every hook and restore ``generate``. Safe to call twice."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        refresh_compiled_graphs()
        if self._patched_generate:
            try:
                del self.model.generate
            except AttributeError:
                pass
            self._patched_generate = False

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
