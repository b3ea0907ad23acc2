"""Editors: HPR and the baselines, sharing :class:`~hpredit.editors.base.Editor`."""

from .additive import AdditiveConfig, CAAEditor, NormRestoreEditor
from .base import Editor, load_editor, register_editor
from .hpr import HPRConfig, HPREditor
from .iti import ITIConfig, ITIEditor

__all__ = [
    "AdditiveConfig",
    "CAAEditor",
    "Editor",
    "HPRConfig",
    "HPREditor",
    "ITIConfig",
    "ITIEditor",
    "NormRestoreEditor",
    "load_editor",
    "register_editor",
]
