"""hpredit: activation editing for Hugging Face causal LMs, centred on Householder Pseudo-Rotation."""

from . import data, geometry, pipeline, results
from ._version import __version__
from .activations import ActivationStore, collect_activations
from .data import ContrastivePair, ContrastivePairs
from .editors import Editor, HPRConfig, HPREditor, attach_editors, load_editor
from .errors import HpreditError
from .evaluation import evaluate
from .evaluation.job import EvalConfig
from .hooks import SCOPES, EditHandle
from .models import DEFAULT_MODEL, decoder_layers, fingerprint, load_model
from .pipeline import FitConfig, GenerateConfig, RunConfig, run
from .results import load_result
from .variants import Variant, attach_variants

__all__ = [
    "DEFAULT_MODEL",
    "SCOPES",
    "ActivationStore",
    "ContrastivePair",
    "ContrastivePairs",
    "EditHandle",
    "EvalConfig",
    "Editor",
    "FitConfig",
    "GenerateConfig",
    "HPRConfig",
    "HPREditor",
    "HpreditError",
    "RunConfig",
    "Variant",
    "__version__",
    "attach_editors",
    "attach_variants",
    "collect_activations",
    "data",
    "decoder_layers",
    "evaluate",
    "fingerprint",
    "geometry",
    "load_editor",
    "load_model",
    "load_result",
    "pipeline",
    "results",
    "run",
]
