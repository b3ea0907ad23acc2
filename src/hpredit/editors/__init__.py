"""Editors: HPR and the baselines, sharing :class:`~hpredit.editors.base.Editor`."""

from .ablation import AblationConfig, AblationEditor
from .additive import AdditiveConfig, CAAEditor, NormRestoreEditor
from .angular import AngularConfig, AngularEditor
from .base import Editor, attach_editors, load_editor, register_editor
from .hpr import HPRConfig, HPREditor
from .iti import ITIConfig, ITIEditor
from .mirror import MirrorConfig, MirrorEditor, TargetEditor
from .spherical import SphericalConfig, SphericalEditor

__all__ = [
    "AblationConfig",
    "AblationEditor",
    "AdditiveConfig",
    "AngularConfig",
    "AngularEditor",
    "CAAEditor",
    "Editor",
    "HPRConfig",
    "HPREditor",
    "ITIConfig",
    "ITIEditor",
    "MirrorConfig",
    "MirrorEditor",
    "NormRestoreEditor",
    "SphericalConfig",
    "SphericalEditor",
    "TargetEditor",
    "attach_editors",
    "load_editor",
    "register_editor",
]
