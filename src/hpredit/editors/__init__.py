"""Editors: HPR and (later) the baselines, sharing :class:`~hpredit.editors.base.Editor`."""

from .base import Editor, load_editor, register_editor
from .hpr import HPRConfig, HPREditor

__all__ = ["Editor", "HPRConfig", "HPREditor", "load_editor", "register_editor"]
