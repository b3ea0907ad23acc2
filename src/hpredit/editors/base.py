"""The small interface every editor shares: per-layer edits, attach, save and load.

An editor is an *estimator* (``fit``) plus a *transform* per layer (``layer_edit``); selection of
layers and the token scope/gating are shared machinery. Artifacts are a directory with
``config.json`` and ``editor.safetensors`` (never pickle), written atomically.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..artifacts import atomic_directory, read_json, sha256_file
from ..errors import HpreditError
from ..hooks import EditHandle, LayerEdit
from ..models import ModelFingerprint, decoder_layers, execution_device, fingerprint

__all__ = ["ARTIFACT_FORMAT_VERSION", "Editor", "load_editor", "register_editor", "train_val_masks"]

ARTIFACT_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "editor.safetensors"
_REGISTRY: dict[str, type[Editor]] = {}


def register_editor(cls: type[Editor]) -> type[Editor]:
    """Class decorator: make ``cls`` loadable by :func:`load_editor` under ``cls.method``."""
    _REGISTRY[cls.method] = cls
    return cls


class Editor(ABC):
    """Base class of all editors. Subclasses set ``method`` and ``config_class``, implement
    ``fit``, ``tensors``, ``_from_tensors`` and ``layer_edit``."""

    method: ClassVar[str]
    config_class: ClassVar[type]
    #: where the edit applies: ``residual`` (block outputs) or ``heads`` (attention output projection input)
    site: ClassVar[str] = "residual"

    def __init__(self, config: Any, layers: list[int], model: ModelFingerprint, metrics: dict | None = None):
        self.config = config
        self.layers = list(layers)
        self.model_fingerprint = model
        self.metrics = metrics or {}

    # ----------------------------------------------------------------- per-method parts

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """All learned tensors, by name, for ``editor.safetensors``."""

    @classmethod
    @abstractmethod
    def _from_tensors(cls, config: Any, layers: list[int], model: ModelFingerprint, metrics: dict,
                      tensors: dict[str, torch.Tensor], extra: dict) -> Editor:
        """Rebuild from saved tensors; raise :class:`HpreditError` if they do not fit the config."""

    @abstractmethod
    def layer_edit(self, layer: int, device: torch.device, dtype: torch.dtype = torch.float32) -> LayerEdit:
        """The edit function for one model layer, its parameters prepared once for activations of
        ``dtype`` on ``device``."""

    def extra_config(self) -> dict:
        """Method-specific entries for ``config.json`` (besides the dataclass config)."""
        return {}

    # ----------------------------------------------------------------- attach

    def check_model(self, model: nn.Module, strict: bool = True, layers_path: str | None = None) -> None:
        """Raise if ``model`` is not the kind of model this editor was fitted on.

        Architecture, hidden size and layer count must match; with ``strict`` the model name must
        match too (compared by its last path component, so a local copy of a hub model matches).
        """
        problems = self.model_fingerprint.mismatches(fingerprint(model, layers_path), check_name=strict)
        if problems:
            raise HpreditError(
                "editor does not match this model: " + "; ".join(problems)
                + (" (pass strict=False / --no-strict to ignore the name)" if strict and len(problems) == 1
                   and problems[0].startswith("name") else "")
            )

    def attach(
        self,
        model: nn.Module,
        strength: float = 1.0,
        scope: str = "all",
        strict: bool = True,
        layers: list[int] | None = None,
        layers_path: str | None = None,
    ) -> EditHandle:
        """Attach to ``model``: returns a handle (use ``with`` or call ``.remove()``).

        ``strength`` scales the edit (α); ``scope`` picks the token positions (see
        :data:`hpredit.hooks.SCOPES`); ``layers`` overrides the editor's active layers. The model's
        weights are never modified.
        """
        self.check_model(model, strict=strict, layers_path=layers_path)
        active = self.layers if layers is None else list(layers)
        unknown = [i for i in active if i not in self.available_layers()]
        if unknown:
            raise HpreditError(f"editor has no module for layer(s) {unknown}: fitted layers are {self.available_layers()}")
        _, blocks = decoder_layers(model, layers_path)
        edits = {}
        for i in active:  # each edit's constants on its own block's device and dtype (device maps, offload)
            dtype = next(blocks[i].parameters()).dtype
            edits[i] = self.layer_edit(i, execution_device(blocks[i]), dtype)
        return EditHandle(model, edits, strength=strength, scope=scope, layers_path=layers_path, site=self.site)

    def available_layers(self) -> list[int]:
        return self.layers

    # ----------------------------------------------------------------- artifact

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``editor.safetensors`` to ``directory`` atomically."""
        from .. import __version__

        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}, tmp / WEIGHTS_NAME)
            config = {
                "format": "hpredit-editor",
                "format_version": ARTIFACT_FORMAT_VERSION,
                "method": self.method,
                "hpredit_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "config": dataclasses.asdict(self.config),
                "layers": self.layers,
                "model": self.model_fingerprint.to_dict(),
                "metrics": self.metrics,
                **self.extra_config(),
                "weights_sha256": sha256_file(tmp / WEIGHTS_NAME),
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Editor:
        """Load and validate an artifact written by :meth:`save_pretrained` (no code is run)."""
        editor = load_editor(directory)
        if cls is not Editor and not isinstance(editor, cls):
            raise HpreditError(f"{directory} holds a {editor.method!r} editor, not {cls.method!r}")
        return editor


def train_val_masks(acts, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair masks ``(train, val)``: the ``val`` split if any pair has it, else ``val_fraction`` of
    the groups (questions) held out with ``seed``; never cuts through a group."""
    is_val = acts.split_mask("val")
    if is_val.any():
        train = acts.split_mask("train") | torch.tensor([s is None for s in acts.splits])
        if not train.any():
            raise HpreditError("activations have validation pairs but no training pairs")
        return train, is_val
    groups = torch.unique(acts.groups)
    if len(groups) < 2:
        return torch.ones(len(acts.groups), dtype=torch.bool), torch.zeros(len(acts.groups), dtype=torch.bool)
    perm = groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))]
    n_val = max(1, round(val_fraction * len(groups)))
    val = torch.isin(acts.groups, perm[:n_val])
    return ~val, val


def fitted_layers_from(extra: dict, layers: list[int]) -> list[int]:
    """The artifact's ``fitted_layers`` (a list of ints containing every active layer), or a clear error."""
    fitted = extra.get("fitted_layers")
    if not isinstance(fitted, list) or not all(isinstance(i, int) for i in fitted):
        raise HpreditError("editor artifact: 'fitted_layers' must be a list of integers")
    if any(i not in fitted for i in layers):
        raise HpreditError(f"editor artifact: layers {layers} are not all among fitted_layers {fitted}")
    return fitted


def _config_from_dict(config_class: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise HpreditError(f"{where}: 'config' must be an object")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise HpreditError(f"{where}: unknown config field(s) {unknown}")
    try:
        config = config_class(**d)
    except (TypeError, ValueError) as e:
        raise HpreditError(f"{where}: invalid config ({e})") from None
    if hasattr(config, "validate"):
        config.validate(where)
    return config


def load_editor(directory: str | os.PathLike) -> Editor:
    """Load any editor artifact, dispatching on its ``method``; every failure is one clear error."""
    directory = Path(directory)
    where = str(directory)
    if not directory.is_dir():
        raise HpreditError(f"editor artifact {directory} does not exist (expected a directory from save_pretrained)")
    cfg = read_json(directory / CONFIG_NAME, "editor artifact")
    if cfg.get("format") != "hpredit-editor":
        raise HpreditError(f"{where}: config.json is not an hpredit editor config")
    if cfg.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise HpreditError(
            f"{where}: format version {cfg.get('format_version')!r} is not supported (this hpredit reads {ARTIFACT_FORMAT_VERSION})"
        )
    method = cfg.get("method")
    if method not in _REGISTRY:
        raise HpreditError(f"{where}: unknown editor method {method!r} (known: {', '.join(sorted(_REGISTRY))})")
    klass = _REGISTRY[method]
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise HpreditError(f"{where}: {WEIGHTS_NAME} is missing")
    if sha256_file(weights) != cfg.get("weights_sha256"):
        raise HpreditError(
            f"{where}: {WEIGHTS_NAME} does not match the checksum in config.json (truncated or edited after saving)"
        )
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise HpreditError(f"{where}: cannot read {WEIGHTS_NAME} ({e})") from None
    try:
        model = ModelFingerprint.from_dict(cfg["model"])
        layers = [int(i) for i in cfg["layers"]]
    except (KeyError, TypeError, ValueError) as e:
        raise HpreditError(f"{where}: config.json has a bad or missing 'model'/'layers' entry ({e})") from None
    bad = [i for i in layers if not 0 <= i < model.num_layers]
    if bad or len(set(layers)) != len(layers):
        raise HpreditError(f"{where}: layers {layers} are invalid for a model with {model.num_layers} layers")
    config = _config_from_dict(klass.config_class, cfg.get("config"), where)
    metrics = cfg.get("metrics") or {}
    return klass._from_tensors(config, layers, model, metrics, tensors, cfg)
