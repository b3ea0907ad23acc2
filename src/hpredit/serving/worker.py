"""hpredit's vLLM worker extension (``--worker-extension-cls``): what the front door asks of each
worker through ``collective_rpc``, by method name: load or unload an editor at runtime, read the
per-editor counters. Cheap to import (vLLM resolves it in every worker process)."""

from __future__ import annotations

from typing import Any

__all__ = ["EditorWorker", "WORKER_EXTENSION"]


class EditorWorker:
    """Mixed into vLLM's worker class: methods named ``hpredit_*`` (vLLM refuses names that clash)."""

    model_runner: Any

    def _hpredit_model(self) -> Any:
        model = self.model_runner.get_model()
        if not hasattr(model, "hpr_load"):
            raise RuntimeError("hpredit: this engine does not serve an hpredit model")
        return model

    def hpredit_load(self, name: str, path: str, content: str) -> None:
        """Load the editor at ``path`` (a local directory, checked by the front door) as ``name``."""
        self._hpredit_model().hpr_load(name, path, content)

    def hpredit_unload(self, name: str) -> None:
        self._hpredit_model().hpr_unload(name)

    def hpredit_stats(self) -> dict[str, dict[str, int]]:
        """Editor name → counter → value (:class:`~hpredit.serving.params.EditorStats`)."""
        from .plugin import SETTINGS, STATS  # imports vLLM: only in a worker, when asked

        self._hpredit_model()
        return STATS.report(SETTINGS[-1])


#: the ``--worker-extension-cls`` value
WORKER_EXTENSION = f"{__name__}.{EditorWorker.__name__}"
