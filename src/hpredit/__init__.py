"""hpredit: activation editing for Hugging Face causal LMs, centred on Householder Pseudo-Rotation."""

__version__ = "0.1.0"

from . import data, geometry  # noqa: E402
from .activations import ActivationStore, collect_activations  # noqa: E402
from .data import ContrastivePair, ContrastivePairs  # noqa: E402
from .editors import Editor, HPRConfig, HPREditor, load_editor  # noqa: E402
from .errors import HpreditError  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .hooks import SCOPES, EditHandle  # noqa: E402
from .models import DEFAULT_MODEL, decoder_layers, fingerprint, load_model  # noqa: E402

__all__ = [
    "DEFAULT_MODEL",
    "SCOPES",
    "ActivationStore",
    "ContrastivePair",
    "ContrastivePairs",
    "EditHandle",
    "Editor",
    "HPRConfig",
    "HPREditor",
    "HpreditError",
    "__version__",
    "collect_activations",
    "data",
    "decoder_layers",
    "evaluate",
    "fingerprint",
    "geometry",
    "load_editor",
    "load_model",
]
