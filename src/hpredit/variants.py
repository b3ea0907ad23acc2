"""Several edit configurations of one model in one forward pass: the batch widened where they differ.

A :class:`Variant` is one configuration: an editor at a strength (and scope), or the unedited model.
:func:`attach_variants` attaches ``K`` variants at once. Every decoder block below the first block
any of them edits computes the same thing under all of them, so those blocks run once per text; at
the first edited block the batch is widened to ``K`` copies, variant-major (row ``k·n + b`` is input
row ``b`` under variant ``k``), and from there on each variant's rows get that variant's edits.
The model's outputs (logits, hidden states) then have ``K·n`` rows: :meth:`VariantHandle.split`
gives one ``(n, …)`` block per variant.

The block inputs that carry a batch dimension (attention masks, position ids, rotary embeddings)
are widened the same way at each block above the split; a KV cache built under the handle holds
``n`` rows in the blocks below it and ``K·n`` above (:func:`select_cache_rows` selects rows of
such a cache). Each variant's rows are edited by the very edit functions ``Editor.attach`` uses,
with the variant's strength as a number, so a variant's numbers equal its own attached pass up to
float32 rounding of the wider matrix products.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .architecture import attention_output, backbone, decoder_layers, execution_device
from .checks import DEFAULT_STRENGTH, check_count, check_scope, check_strength
from .editors.base import Editor
from .errors import HpreditError
from .hooks import EditObserver, LayerEdit, refresh_compiled_graphs, untuple

__all__ = [
    "MAX_VARIANTS",
    "Variant",
    "VariantHandle",
    "attach_variants",
    "observers_for",
    "plan_passes",
    "select_cache_rows",
]

#: The default bound on variants widened into one pass: memory (logits, KV cache of the blocks above
#: the split) grows with it. 16 variants of SmolLM2-135M score TruthfulQA MC in about 6 GB.
MAX_VARIANTS = 16


@dataclass(frozen=True)
class Variant:
    """One configuration of the model: ``editor`` at ``strength`` over ``scope`` (None: unedited)."""

    editor: Editor | None = None
    strength: float = DEFAULT_STRENGTH
    scope: str = "all"

    def __post_init__(self) -> None:
        if self.editor is not None and not isinstance(self.editor, Editor):
            raise HpreditError(f"a variant's editor must be an Editor or None, got {type(self.editor).__name__}")
        object.__setattr__(self, "strength", check_strength(self.strength))
        check_scope(self.scope)

    @property
    def edits(self) -> bool:
        """Whether this variant changes anything (an editor at a strength other than 0)."""
        return self.editor is not None and self.strength != 0

    @property
    def shared_blocks(self) -> int | None:
        """How many decoder blocks (from the first) this variant computes as the unedited model does:
        those below the block whose output it edits first, or, for an edit of attention heads, below
        the block whose heads it edits first. None: it edits nothing."""
        if not self.edits:
            return None
        assert self.editor is not None
        first = min(self.editor.layers)
        return first if self.editor.site == "heads" else first + 1

    @property
    def label(self) -> str:
        return "unedited" if self.editor is None else f"{self.editor.method} at strength {self.strength:g}"

    def attach(self, model: nn.Module, strict: bool = True, observe: EditObserver | None = None):
        """This variant alone, attached the usual way (a no-op context unedited)."""
        if self.editor is None:
            return _Nothing()
        return self.editor.attach(model, strength=self.strength, scope=self.scope, strict=strict, observe=observe)


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def _widened(value: Any, base: int, k: int) -> Any:
    """``value`` with every batch-sized tensor (``ndim ≥ 2``, ``base`` rows) repeated ``k`` times,
    variant-major; tuples and lists (rotary ``(cos, sin)``) element by element; others as they are."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == base:
            return value.repeat(k, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_widened(v, base, k) for v in value)
    return value


@dataclass
class _Edit:
    """One variant's edit of one layer."""

    variant: int
    fn: LayerEdit
    strength: float


class VariantHandle:
    """Variants attached to a model (see the module docstring). Use as a context manager."""

    def __init__(
        self,
        model: nn.Module,
        variants: Sequence[Variant],
        strict: bool = True,
        layers_path: str | None = None,
        observers: Sequence[EditObserver | None] | None = None,
    ) -> None:
        self.model, self.variants = model, list(variants)
        self.width = len(self.variants)
        self.base: int | None = None  #: rows of the current forward before widening
        self._attention: torch.Tensor | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._patched_generate = False
        self._observers = list(observers) if observers is not None else [None] * self.width
        path, self._blocks = decoder_layers(model, layers_path)
        residual, heads = self._edits(strict, layers_path)
        self.split_at = self._split_block(residual, heads)
        try:
            self._install(residual, heads, backbone(model, path))
        except BaseException:
            self.remove()
            raise

    # ----------------------------------------------------------------- setup

    def _edits(self, strict: bool, layers_path: str | None) -> tuple[dict[int, list[_Edit]], dict[int, list[_Edit]]]:
        """Per layer, the variants' edits: at block outputs (``residual``) and at the attention output
        projection's input (``heads``); each editor's edit function built once per layer."""
        residual: dict[int, list[_Edit]] = {}
        heads: dict[int, list[_Edit]] = {}
        built: dict[tuple[int, int], LayerEdit] = {}
        for k, v in enumerate(self.variants):
            if not v.edits:
                continue
            assert v.editor is not None  # v.edits
            v.editor.check_model(self.model, strict=strict, layers_path=layers_path)
            for i in v.editor.layers:
                key = (id(v.editor), i)
                if key not in built:
                    block = self._blocks[i]
                    built[key] = v.editor.layer_edit(i, execution_device(block), next(block.parameters()).dtype)
                site = heads if v.editor.site == "heads" else residual
                site.setdefault(i, []).append(_Edit(k, built[key], v.strength))
        return residual, heads

    @staticmethod
    def _split_block(residual: dict, heads: dict) -> int | None:
        """The block whose output is widened (−1: widen the first block's input); None: nothing edits."""
        firsts = [i for i in residual] + [i - 1 for i in heads]
        return min(firsts) if firsts else None

    def _install(self, residual: dict, heads: dict, model_body: nn.Module) -> None:
        w = self.split_at
        if w is None:
            return
        # the call's 2-d attention mask, for the observers
        self._hooks.append(model_body.register_forward_pre_hook(self._call_hook, with_kwargs=True))
        if w < 0:
            self._hooks.append(self._blocks[0].register_forward_pre_hook(self._widen_input, with_kwargs=True))
        else:
            hook = functools.partial(self._widen_output, residual.get(w, []), w)
            self._hooks.append(self._blocks[w].register_forward_hook(hook, prepend=True))
        for i in range(w + 1, len(self._blocks)):
            self._hooks.append(self._blocks[i].register_forward_pre_hook(self._widen_kwargs, with_kwargs=True))
            if i in residual:
                hook = functools.partial(self._edit_output, residual[i], i)
                self._hooks.append(self._blocks[i].register_forward_hook(hook, prepend=True))
            if i in heads:
                proj = attention_output(self._blocks[i])
                pre = functools.partial(self._edit_heads, heads[i], i)
                self._hooks.append(proj.register_forward_pre_hook(pre, prepend=True))
        if "generate" in dir(self.model) and self.width > 1:
            self.model.generate = self._no_generate  # type: ignore[assignment]
            self._patched_generate = True
        refresh_compiled_graphs()

    # ----------------------------------------------------------------- hooks

    def _no_generate(self, *args, **kwargs):
        raise HpreditError(
            "several variants in one pass widen the batch, which generate() cannot follow: "
            "generate under each variant in turn (Variant.attach)"
        )

    def _call_hook(self, _module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._attention = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _apply(self, edits: list[_Edit], layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``(K·n, seq, d)`` with each variant's block of rows edited by its edits of ``layer``."""
        n = hidden.shape[0] // self.width
        blocks = list(hidden.split(n))
        for e in edits:
            before = blocks[e.variant]
            blocks[e.variant] = e.fn(before, None, e.strength)
            observe = self._observers[e.variant]
            if observe is not None:
                attention = self._attention
                if attention is not None:
                    attention = attention[:, -hidden.shape[1] :] if attention.shape[0] == n else None
                observe(layer, before, blocks[e.variant], attention)
        return torch.cat(blocks) if edits else hidden

    def _widen_output(self, edits: list[_Edit], layer: int, _module, _args, output):
        hidden = untuple(output)
        self.base = hidden.shape[0]
        wide = self._apply(edits, layer, hidden.repeat(self.width, *([1] * (hidden.dim() - 1))))
        return (wide, *output[1:]) if isinstance(output, tuple) else wide

    def _widen_input(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.base = hidden.shape[0]
        args = tuple(_widened(a, self.base, self.width) for a in args)
        kwargs = {key: _widened(v, self.base, self.width) for key, v in kwargs.items()}
        return args, kwargs

    def _widen_kwargs(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        base = self.base
        if base is None or not isinstance(hidden, torch.Tensor) or hidden.shape[0] != base * self.width:
            return None
        args = (args[0], *(_widened(a, base, self.width) for a in args[1:])) if args else args
        kwargs = {key: v if key == "hidden_states" else _widened(v, base, self.width) for key, v in kwargs.items()}
        return args, kwargs

    def _edit_output(self, edits: list[_Edit], layer: int, _module, _args, output):
        edited = self._apply(edits, layer, untuple(output))
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    def _edit_heads(self, edits: list[_Edit], layer: int, _module, args):
        return (self._apply(edits, layer, args[0]), *args[1:])

    # ----------------------------------------------------------------- use

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        """A widened output ``(K·n, …)`` as one ``(n, …)`` tensor per variant (a model output that was
        not widened, nothing being edited, is the same tensor for every variant)."""
        if self.width == 1 or not self._hooks:
            return [t] * self.width
        return list(t.split(t.shape[0] // self.width))

    @property
    def widens(self) -> bool:
        """Whether forwards under the handle return ``K·n`` rows (else ``n``, all variants alike)."""
        return bool(self._hooks) and self.width > 1

    def remove(self) -> None:
        """Detach every hook and restore ``generate``. Safe to call twice."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._patched_generate:
            del self.model.generate
            self._patched_generate = False
        refresh_compiled_graphs()

    def __enter__(self) -> VariantHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def plan_passes(variants: Sequence[Variant], max_variants: int = MAX_VARIANTS) -> list[list[int]]:
    """Indices of ``variants`` grouped into widened passes of at most ``max_variants``.

    A pass shares the blocks below its lowest-editing variant, so variants are grouped by how many
    blocks they leave unedited (:attr:`Variant.shared_blocks`): lowest first, a group joins the
    pass before it whole when widening it from that pass's lower split costs fewer blocks than
    running its own shared blocks again (``k·(s − s_pass) ≤ s`` for ``k`` variants sharing ``s``
    blocks) and the pass has room. Variants that edit nothing go with the highest split, where they cost
    the least. Each index appears once; within a pass, in the order given.
    """
    check_count(max_variants, "max_variants")
    groups: dict[int, list[int]] = {}
    idle = [i for i, v in enumerate(variants) if v.shared_blocks is None]
    for i, v in enumerate(variants):
        if v.shared_blocks is not None:
            groups.setdefault(v.shared_blocks, []).append(i)
    if not groups:
        return [idle[i : i + max_variants] for i in range(0, len(idle), max_variants)]
    groups[max(groups)] = sorted(groups[max(groups)] + idle)
    passes: list[tuple[int, list[int]]] = []  # (shared blocks of the pass, indices)
    for shared in sorted(groups):
        members = groups[shared]
        if passes:
            low, current = passes[-1]
            if len(current) + len(members) <= max_variants and len(members) * (shared - low) <= shared:
                current += members
                continue
        passes += [(shared, members[i : i + max_variants]) for i in range(0, len(members), max_variants)]
    return [sorted(p) for _, p in passes]


def observers_for(observers: Sequence[EditObserver | None] | None, count: int) -> list[EditObserver | None]:
    """One observer (or None) per variant: ``observers`` as a list, or ``count`` Nones; refused when
    the counts differ."""
    watch: list[EditObserver | None] = list(observers) if observers is not None else [None] * count
    if len(watch) != count:
        raise HpreditError(f"{len(watch)} observers for {count} variants: give one per variant")
    return watch


def attach_variants(
    model: nn.Module,
    variants: Sequence[Variant],
    strict: bool = True,
    layers_path: str | None = None,
    observers: Sequence[EditObserver | None] | None = None,
) -> VariantHandle:
    """Attach ``variants`` (see the module docstring) for forward passes: each variant's rows are
    ``handle.split(output)[k]``. Every variant's scope must be ``all`` (the widened pass scores
    whole texts; generation goes variant by variant); ``observers``: one per variant (or None).

    Example:
        >>> with attach_variants(model, [Variant(), Variant(editor, 0.5)]) as h:
        ...     unedited, edited = h.split(model(ids).logits)
    """
    check_count(len(variants), "variants")
    for v in variants:
        if not isinstance(v, Variant):
            raise HpreditError(f"expected Variant objects, got {type(v).__name__}")
        if v.scope != "all" and len(variants) > 1:
            raise HpreditError(
                f"several variants in one pass edit every token: scope must be 'all', got {v.scope!r} "
                "(run other scopes one variant at a time)"
            )
    return VariantHandle(model, variants, strict, layers_path, observers_for(observers, len(variants)))


def _cache_layers(cache) -> list | None:
    """The per-block layers of a KV cache (the self-attention cache of an encoder-decoder one)."""
    inner = getattr(cache, "self_attention_cache", cache)
    layers = getattr(inner, "layers", None)
    return layers if isinstance(layers, list) else None


def select_cache_rows(cache, rows: torch.Tensor, base: int):
    """A cache holding rows ``rows`` ``(m,)`` of a cache of ``base`` rows, which is left as it is.

    Blocks that hold ``K·base`` rows (above the split of :func:`attach_variants`, variant-major) keep
    rows ``rows`` of each variant (``K·m`` rows, variant-major). The selected rows are new tensors.
    """
    layers = _cache_layers(cache)
    if layers is None:
        new = copy.deepcopy(cache)
        new.batch_select_indices(rows)
        return new
    new = copy.copy(cache)
    inner = getattr(new, "self_attention_cache", None)
    target = new
    if inner is not None:
        target = copy.copy(inner)
        new.self_attention_cache = target
    target.layers = []
    for layer in layers:
        layer = copy.copy(layer)
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() > 0 and keys.shape[0] not in (0, base):
            k = keys.shape[0] // base
            offsets = torch.arange(k, device=rows.device)[:, None] * base
            layer.batch_select_indices((offsets + rows[None, :]).flatten())
        else:
            layer.batch_select_indices(rows)
        target.layers.append(layer)
    return new
