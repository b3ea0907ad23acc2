"""The small interface every editor shares: per-layer edits, attach, save and load.

An editor is an *estimator* (``fit``) plus a *transform* per layer (``layer_edit``); selection of
layers and the token scope/gating are shared machinery. Artifacts are a directory with
``config.json`` and ``editor.safetensors`` (never pickle) and a model card ``README.md``, written
atomically; they load from a local directory or a Hugging Face Hub repo (:mod:`.hub`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar, overload

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..architecture import ModelFingerprint, decoder_layers, execution_device, fingerprint
from ..checks import (
    DEFAULT_STRENGTH,
    MAX_COMBINED_EDITORS,
    check_editor_matches,
    check_scope,
    check_strength,
    layer_list_problem,
    named,
    strength_given,
)
from ..errors import HpreditError
from ..files import atomic_directory, read_json, sha256_file
from ..hooks import EditHandle, EditObserver, LayerEdit
from ..registry import Registry
from .hub import model_card, push_editor, resolve_editor_dir
from .kl_curve import KLCurve

__all__ = [
    "ARTIFACT_FORMAT_VERSION",
    "EDITORS",
    "Editor",
    "EditorConfig",
    "attach_editors",
    "FittedLayersEditor",
    "TokenPairs",
    "choose_layers",
    "configure",
    "load_editor",
    "register_editor",
    "train_val_masks",
]

#: 2: ``config.json`` carries ``config_sha256``, the checksum of every entry that changes what the
#: editor does (:data:`UNCHECKED_ENTRIES` lists the others). 1 (before): only the weights' checksum;
#: such artifacts still load, but their strength → KL curve is not used (nothing vouches for it).
ARTIFACT_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
#: The entries of ``config.json`` outside ``config_sha256``: the envelope (format, version, date),
#: the fingerprint of the model fitted on (checked against the model at attach: it decides which
#: model the editor attaches to, not what the edit does), the validation metrics (reported, never
#: used to edit) and the checksums themselves. Everything else (method, config, layers, the
#: method's own entries, the strength → KL curve) is covered, also any entry a later version adds.
UNCHECKED_ENTRIES = (
    "format",
    "format_version",
    "hpredit_version",
    "created",
    "model",
    "metrics",
    "weights_sha256",
    "config_sha256",
)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "editor.safetensors"
#: the model card: documentation only (not checksummed, never read when loading; older artifacts have none)
CARD_NAME = "README.md"
#: what a Hub repo's snapshot needs of an editor (config.json first: it tells an editor repo)
HUB_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)


# ----------------------------------------------------------------------------- configs
# (the registry of editor methods, EDITORS, follows the Editor class)


def is_int(x: Any) -> bool:
    """A Python integer, not a bool (JSON ``true`` is not a layer) and not a float such as 15.7 or 15.0:
    :func:`hpredit.checks.is_int` without NumPy's integers, so that a config always writes as JSON."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class EditorConfig:
    """Base of the editors' config dataclasses: validated on construction (``__post_init__``), so a
    config that exists is a valid one, whoever built it (``fit`` overrides, ``from_pretrained``).

    Subclasses list their rules in :meth:`checks` as ``(ok, message)`` pairs.
    """

    def __post_init__(self) -> None:
        self.validate()

    def checks(self) -> list[tuple[bool, str]]:
        raise NotImplementedError

    def layer_choice_checks(self) -> list[tuple[bool, str]]:
        """The rules of the fields every residual editor shares: ``top_k``, ``layers``, ``val_fraction``, ``seed``."""
        layers_problem = layer_list_problem(getattr(self, "layers", None), name="layers")
        top_k: Any = getattr(self, "top_k", None)
        val_fraction: Any = getattr(self, "val_fraction", None)
        return [
            (is_int(top_k) and top_k >= 1, "top_k must be an integer ≥ 1"),
            (layers_problem is None, str(layers_problem)),
            (is_number(val_fraction) and 0 < val_fraction < 1, "val_fraction must be in (0, 1)"),
            (is_int(getattr(self, "seed", None)), "seed must be an integer"),
        ]

    def validate(self, where: str | None = None) -> None:
        """Raise one :class:`HpreditError` naming the first rule broken (prefixed by ``where``)."""
        for ok, message in self.checks():
            if not ok:
                raise HpreditError(f"{where or type(self).__name__}: {message}")


C = TypeVar("C", bound=EditorConfig)


def configure(config_class: type[C], config: C | None, overrides: dict[str, Any]) -> C:
    """``config`` (default: ``config_class()``) with ``overrides`` applied, validated; an unknown
    option or a bad value is one :class:`HpreditError`."""
    base = config_class() if config is None else config
    if not isinstance(base, config_class):
        raise HpreditError(f"expected a {config_class.__name__}, got {type(base).__name__}")
    names = {f.name for f in dataclasses.fields(config_class)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise HpreditError(f"{config_class.__name__}: unknown option(s) {unknown} (known: {', '.join(sorted(names))})")
    return dataclasses.replace(base, **overrides)  # type: ignore[type-var]  # __post_init__ validates


def choose_layers(accuracy: dict[int, float], layers: Sequence[int] | None, top_k: int) -> list[int]:
    """The layers to edit: ``layers`` when given, else the ``top_k`` best by validation ``accuracy``
    (ties to the lower layer), sorted. The requests are checked first by :func:`check_layer_request`."""
    if layers is not None:
        return sorted(layers)
    ranked = sorted(accuracy, key=lambda i: (-accuracy[i], i))
    return sorted(ranked[:top_k])


def check_layer_request(
    collected: Sequence[int], layers: Sequence[int] | None, top_k: int, default_top_k: int | None = None
) -> None:
    """Refuse, before training, explicit layers that were not collected and a ``top_k`` larger than
    the collected layers (the default ``top_k`` takes every layer when fewer were collected)."""
    if layers is not None:
        missing = [i for i in layers if i not in collected]
        if missing:
            raise HpreditError(f"layers {missing} were not collected (collected: {list(collected)})")
    elif top_k > len(collected) and top_k != default_top_k:
        raise HpreditError(
            f"top_k {top_k} is more than the {len(collected)} collected layers: "
            f"choose top_k between 1 and {len(collected)}"
        )


class Editor(ABC):
    """Base class of all editors. Subclasses set ``method`` and ``config_class``, implement
    ``fit``, ``tensors``, ``_from_tensors`` and ``layer_edit``."""

    method: ClassVar[str]
    config_class: ClassVar[type]
    #: where the edit applies: ``residual`` (block outputs) or ``heads`` (attention output projection input)
    site: ClassVar[str] = "residual"
    #: whether the metrics' accuracy tables are keyed by layer (``"15"``); ITI keys them by head (``"15.3"``)
    metrics_by_layer: ClassVar[bool] = True

    def __init__(self, config: Any, layers: list[int], model: ModelFingerprint, metrics: dict | None = None):
        self.config = config
        self.layers = list(layers)
        self.model_fingerprint = model
        self.metrics = metrics or {}
        #: the measured strength → KL curve (neutral text, the model fitted on), when a search measured one
        self.kl_curve: KLCurve | None = None
        #: the artifact whose curve was not used: saved before config.json had a checksum covering it
        self.unverified_curve: str | None = None

    # ----------------------------------------------------------------- per-method parts

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """All learned tensors, by name, for ``editor.safetensors``."""

    @classmethod
    @abstractmethod
    def _from_tensors(
        cls,
        config: Any,
        layers: list[int],
        model: ModelFingerprint,
        metrics: dict,
        tensors: dict[str, torch.Tensor],
        artifact: dict,
    ) -> Editor:
        """Rebuild from saved tensors; raise :class:`HpreditError` if they do not fit the config.

        ``artifact`` is the whole ``config.json`` (its method-specific entries, written by
        :meth:`extra_config`, are read from it)."""

    @abstractmethod
    def layer_edit(self, layer: int, device: torch.device, dtype: torch.dtype = torch.float32) -> LayerEdit:
        """The edit function for one model layer, its parameters prepared once for activations of
        ``dtype`` on ``device``."""

    def edit(
        self, layer: int, x: torch.Tensor, strength: float | torch.Tensor = 1.0, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Edit activations ``x`` (..., d) of ``layer`` as attach() does."""
        return self.layer_edit(layer, x.device, x.dtype)(x, mask, strength)

    def extra_config(self) -> dict:
        """Method-specific entries for ``config.json`` (besides the dataclass config)."""
        return {}

    @classmethod
    def fit_config(cls, acts: Any, config: Any, overrides: dict[str, Any]) -> Any:
        """The config a ``fit`` runs with (``config`` plus ``overrides``, validated), after checking
        that ``acts`` can serve it: the editor's site, the requested layers and ``top_k``."""
        config = configure(cls.config_class, config, overrides)
        site = getattr(acts, "site", "residual")
        if site != cls.site:
            raise HpreditError(
                f"{cls.method} fits on {cls.site} activations, got a {site!r} store: "
                f"collect them with site={cls.site!r}"
            )
        if hasattr(config, "top_k"):
            check_layer_request(acts.layers, config.layers, config.top_k, getattr(cls.config_class, "top_k", None))
        check_contrast(acts)
        return config

    @classmethod
    def check_metrics(cls, metrics: Any, where: str) -> dict:
        """The saved ``metrics``, refused unless each accuracy table maps names to numbers."""
        if not isinstance(metrics, dict):
            raise HpreditError(f"{where}: 'metrics' must be an object")
        for key in ("val_probe_accuracy", "val_pair_accuracy"):
            table = metrics.get(key)
            if table is None:
                continue
            if not (isinstance(table, dict) and all(is_number(v) for v in table.values())):
                raise HpreditError(f"{where}: metrics '{key}' must map layers to numbers")
            if cls.metrics_by_layer and not all(isinstance(k, str) and k.isdigit() for k in table):
                raise HpreditError(f"{where}: metrics '{key}' must be keyed by layer numbers such as \"15\"")
        return metrics

    # ----------------------------------------------------------------- attach

    def check_model(self, model: nn.Module, strict: bool = True, layers_path: str | None = None) -> None:
        """Raise if ``model`` is not the kind of model this editor was fitted on.

        Architecture, hidden size and layer count must match; with ``strict`` the model name must
        match too (compared by its last path component, so a local copy of a hub model matches).
        """
        check_editor_matches(self.model_fingerprint, fingerprint(model, layers_path), strict)

    def attach(
        self,
        model: nn.Module,
        strength: float = DEFAULT_STRENGTH,
        scope: str = "all",
        strict: bool = True,
        layers: list[int] | None = None,
        layers_path: str | None = None,
        *,
        kl: float | None = None,
        observe: EditObserver | None = None,
    ) -> EditHandle:
        """Attach to ``model`` through forward hooks; the model's weights are never modified.

        Args:
            model: the model the editor was fitted on (checked by fingerprint: architecture, sizes,
                a weight digest and, with ``strict``, the name).
            strength: scales the edit (α; default 1); 0 leaves every activation as it is.
            scope: which token positions are edited: ``all``, ``last-prompt-and-generated`` or
                ``generated`` (see :data:`hpredit.hooks.SCOPES`).
            strict: also require the model's name to match.
            layers: edit these fitted layers instead of the editor's active ones.
            layers_path: dotted path of the decoder blocks when they cannot be found automatically.
            kl: instead of ``strength``, the fluency cost wanted (KL nats/token on neutral text),
                converted through the editor's measured curve (:meth:`strength_for_kl`).
            observe: called with each edited layer's activations before and after the edit (e.g. an
                :class:`~hpredit.evaluation.side_effects.EditProfile`); costs a little time per call.

        Returns:
            An :class:`~hpredit.hooks.EditHandle`: use it in ``with`` or call ``.remove()``, which
            restores the model exactly.

        Example:
            >>> with editor.attach(model, strength=0.5):
            ...     edited = model(ids).logits
            >>> torch.equal(model(ids).logits, plain)  # detached: the model is as before
            True
        """
        strength = self.resolve_strength(strength, kl)
        self.check_model(model, strict=strict, layers_path=layers_path)
        active = self.layers if layers is None else list(layers)
        unknown = [i for i in active if i not in self.available_layers()]
        if unknown:
            raise HpreditError(
                f"editor has no module for layer(s) {unknown}: fitted layers are {self.available_layers()}"
            )
        _, blocks = decoder_layers(model, layers_path)
        edits = {}
        for i in active:  # each edit's constants on its own block's device and dtype (device maps, offload)
            edits[i] = self.layer_edit(i, execution_device(blocks[i]), next(blocks[i].parameters()).dtype)
        return EditHandle(
            model, edits, strength=strength, scope=scope, layers_path=layers_path, site=self.site, observe=observe
        )

    def available_layers(self) -> list[int]:
        return self.layers

    def strength_for_kl(self, kl: float, name: str | None = None) -> float:
        """The strength whose fluency cost is ``kl`` (nats/token) by this editor's measured strength → KL
        curve (:class:`~hpredit.editors.kl_curve.KLCurve`: the neutral text, the model it was fitted on).

        Raises :class:`HpreditError` when the editor has no curve (fitted before curves were
        recorded, or never searched) or ``kl`` is negative or beyond the measured range. ``name``
        is how the caller spells the value in messages (``--kl``, ``'kl'``).
        """
        name = named(name or "kl")
        if self.kl_curve is None and self.unverified_curve is not None:
            raise HpreditError(
                f"{self.unverified_curve}: its strength → KL curve was saved without a checksum covering it "
                f"(an artifact of an earlier hpredit), so it is not used and {name} cannot be converted: pass a "
                "strength, or measure the curve again (hpredit run records one) and save the editor"
            )
        if self.kl_curve is None:
            raise HpreditError(
                f"this {self.method} editor has no measured strength → KL curve, so {name} cannot be converted: "
                "pass a strength, or refit with hpredit run (which records the curve)"
            )
        return self.kl_curve.strength_for(kl, name)

    def resolve_strength(self, strength: float, kl: float | None, name: str | None = None) -> float:
        """The strength to attach with: ``strength``, or the one ``kl`` converts to; not both (a
        strength other than :data:`~hpredit.checks.DEFAULT_STRENGTH` counts as given)."""
        if kl is None:
            return strength
        if strength_given(strength):
            raise HpreditError(f"give {named('strength')} or {named(name or 'kl')}, not both")
        return self.strength_for_kl(kl, name)

    # ----------------------------------------------------------------- artifact

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the editor as a directory: ``config.json`` (config, layers, model fingerprint,
        metrics, the strength → KL curve, the weights' checksum and ``config_sha256``, the checksum
        of every entry that changes what the editor does), ``editor.safetensors`` and the model card
        ``README.md`` (the Hub's metadata, the curve, the validation metrics, how to load it:
        documentation, outside the checksums), atomically (whole or not at all).

        Args:
            directory: where to write; an existing editor there is replaced whole.

        Returns:
            The directory, as a :class:`~pathlib.Path`.

        Example:
            >>> path = editor.save_pretrained(tmp / "editor")
            >>> sorted(p.name for p in path.iterdir())
            ['README.md', 'config.json', 'editor.safetensors']
        """
        return self._save(Path(directory), None)

    def _save(self, directory: Path, repo_id: str | None) -> Path:
        """:meth:`save_pretrained`, the card saying how to load it from ``repo_id`` when given."""
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
                **({"kl_curve": self.kl_curve.to_json()} if self.kl_curve is not None else {}),
                "weights_sha256": sha256_file(tmp / WEIGHTS_NAME),
            }
            config = json.loads(json.dumps(config))  # as it will be read back (lists, string keys)
            config["config_sha256"] = config_checksum(config)
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
            model_card(self, repo_id).save(tmp / CARD_NAME)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> Editor:
        """Load an artifact written by :meth:`save_pretrained`, from a local directory or a Hugging
        Face Hub repo (:meth:`push_to_hub`), checking everything before use (format, checksum,
        config, layers, tensor shapes; no code is run, nothing is unpickled).

        Args:
            directory: the artifact's directory, or a Hub repo id ``namespace/name`` (when no such
                directory exists): its ``config.json``, ``editor.safetensors`` and ``README.md`` are
                downloaded into the Hub cache (``HF_HUB_CACHE``), or read from it with
                ``HF_HUB_OFFLINE=1``.
            revision: the repo's branch, tag or commit hash (default: ``main``); Hub repos only.
            cache_dir: the Hub cache to use instead of ``HF_HUB_CACHE``.
            token: the Hub token (private or gated repos); default: the logged-in one.
            local_files_only: read the Hub cache only, never download.

        Returns:
            The editor (an instance of this class; ``Editor.from_pretrained`` loads any method).

        Example:
            >>> back = HPREditor.from_pretrained(tmp / "editor")
            >>> back.layers == editor.layers and torch.equal(back.probe, editor.probe)
            True
        """
        editor = load_editor(
            directory, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
        if cls is not Editor and not isinstance(editor, cls):
            raise HpreditError(f"{directory} holds a {editor.method!r} editor, not {cls.method!r}")
        return editor

    def push_to_hub(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload hpredit editor",
    ) -> Any:
        """Upload the editor to the Hugging Face Hub repo ``repo_id`` (``namespace/name``; created if
        missing, ``private`` if asked) as one commit: what :meth:`save_pretrained` writes, the model
        card saying how to load it from ``repo_id``.

        Args:
            repo_id: the model repo.
            revision: the branch to commit to (created from ``main`` if missing); default ``main``.
            private: create the repo private (an existing repo keeps its visibility).
            token: the Hub token; default: the logged-in one (``hf auth login``, ``HF_TOKEN``).
            commit_message: the commit's message.

        Returns:
            ``huggingface_hub``'s ``CommitInfo`` (``.commit_url``, ``.oid``: the commit hash to pin
            with ``from_pretrained(repo_id, revision=...)``).
        """
        return push_editor(
            self._save,
            repo_id,
            revision=revision,
            private=private,
            token=token,
            commit_message=commit_message,
        )


class FittedLayersEditor(Editor):
    """An editor fitted on more layers than it edits (``fitted_layers``; the active ``layers`` a
    subset): any fitted layer can be attached (``attach(layers=…)``) and the artifact records them."""

    fitted_layers: list[int]

    def available_layers(self) -> list[int]:
        return self.fitted_layers

    def extra_config(self) -> dict:
        return {"fitted_layers": self.fitted_layers}


#: The one registry of editor methods: ``method`` → :class:`Editor` subclass (``load_editor`` dispatches on it).
EDITORS: Registry[type[Editor]] = Registry("editor method", Editor, classes=True)

E = TypeVar("E", bound=type[Editor])


@overload
def register_editor(cls: E, *, replace: bool = False) -> E: ...
@overload
def register_editor(cls: None = None, *, replace: bool = False) -> Callable[[E], E]: ...
def register_editor(cls=None, *, replace=False):
    """Class decorator (``@register_editor`` or ``@register_editor(replace=True)``): make ``cls``
    loadable by :func:`load_editor` under ``cls.method``.

    Refused (one :class:`HpreditError`): anything but an :class:`Editor` subclass, a class leaving
    an abstract method unimplemented, an empty ``method``, a ``config_class`` that is not an
    :class:`EditorConfig` class, and a method already registered unless ``replace``.
    """

    def register(klass):
        EDITORS.check_entry(klass)
        config_class = getattr(klass, "config_class", None)
        if not (isinstance(config_class, type) and issubclass(config_class, EditorConfig)):
            raise HpreditError(f"editor {klass.__name__}: config_class must be an EditorConfig subclass")
        return EDITORS.register(getattr(klass, "method", None), klass, replace=replace)

    return register if cls is None else register(cls)


def attach_editors(
    model: nn.Module,
    editors: Sequence[tuple[Editor, float]] | Mapping[Editor, float],
    scope: str = "all",
    strict: bool = True,
    layers_path: str | None = None,
    *,
    observe: EditObserver | None = None,
) -> EditHandle:
    """Attach several editors at once, each at its own strength: ``[(editor, strength), ...]`` (or a
    mapping editor → strength), at most :data:`~hpredit.checks.MAX_COMBINED_EDITORS`, all of one
    site. Where several edit the same layer they apply in the order given, each to the output of the
    one before (``hpredit serve`` applies a request's ``editors`` in its ``--editor`` order: attach
    them in that order to reproduce it). An editor at strength 0 edits nothing. Each editor is
    checked as :meth:`Editor.attach` checks it. One handle: ``with`` or ``.remove()`` detaches all.

    Example:
        >>> with attach_editors(model, [(truthful, 1.0), (polite, 0.5)]):
        ...     out = model.generate(**enc)
    """
    pairs = list(editors.items()) if isinstance(editors, Mapping) else list(editors)
    if not pairs:
        raise HpreditError("attach_editors: give at least one (editor, strength) pair")
    if len(pairs) > MAX_COMBINED_EDITORS:
        raise HpreditError(f"attach_editors: {len(pairs)} editors given, at most {MAX_COMBINED_EDITORS} at once")
    checked: list[tuple[Editor, float]] = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], Editor)):
            raise HpreditError(f"attach_editors: entry {i} must be an (editor, strength) pair, got {pair!r}")
        editor, strength = pair
        checked.append((editor, check_strength(strength, f"the strength of editor {i}")))
    sites = {editor.site for editor, _ in checked}
    if len(sites) > 1:
        raise HpreditError(
            f"attach_editors: the editors edit different sites ({', '.join(sorted(sites))}): attach each"
        )
    check_scope(scope)
    for editor, _ in checked:
        editor.check_model(model, strict=strict, layers_path=layers_path)
    _, blocks = decoder_layers(model, layers_path)
    parts: dict[int, list[tuple[LayerEdit, float]]] = {}
    for editor, strength in checked:
        if strength == 0:
            continue
        for i in editor.layers:
            fn = editor.layer_edit(i, execution_device(blocks[i]), next(blocks[i].parameters()).dtype)
            parts.setdefault(i, []).append((fn, strength))
    edits = {i: _composed(fns) for i, fns in sorted(parts.items())}
    return EditHandle(model, edits, 1.0, scope, layers_path=layers_path, site=sites.pop(), observe=observe)


def _composed(parts: list[tuple[LayerEdit, float]]) -> LayerEdit:
    """One layer's edits in order, each at its strength (times the handle's), each on the one before's output."""

    def edit(hidden: torch.Tensor, mask: torch.Tensor | None, strength: float | torch.Tensor) -> torch.Tensor:
        for fn, s in parts:
            hidden = fn(hidden, mask, strength * s)
        return hidden

    return edit


def residual_methods() -> list[str]:
    """The registered editor methods that edit the residual stream (what ``hpredit serve`` runs)."""
    return [name for name, klass in EDITORS.items() if klass.site == "residual"]


def check_artifact_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse an artifact's tensors unless they are exactly ``expected`` (name → shape), each finite."""
    if set(tensors) != set(expected):
        raise HpreditError(f"editor artifact: tensors {sorted(tensors)} do not match (expected {sorted(expected)})")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise HpreditError(f"editor artifact: tensor {name} has shape {got}, expected {shape}")
        if not torch.isfinite(tensors[name]).all():
            raise HpreditError(f"editor artifact: tensor {name} contains NaN or inf")


def check_contrast(acts: Any) -> int:
    """How many of ``acts``' pairs have the same positive and negative text (up to whitespace).

    Every pair alike is one :class:`HpreditError` (there is nothing to learn); some alike is a
    warning only, and they are kept: TruthfulQA itself lists "Unknown." as both a correct and an
    incorrect answer of two questions (347 and 354), and the published figures include those pairs
    (the JSONL reader and :func:`hpredit.data.check_pairs` refuse such pairs in a user's own data).
    """
    texts, rows = getattr(acts, "texts", None), getattr(acts, "pairs", None)
    if not texts or rows is None or len(rows) == 0:
        return 0
    same = sum(a == b or texts[a][1].split() == texts[b][1].split() for a, b in rows.tolist())
    if same == len(rows):
        raise HpreditError(
            "every pair has the same positive and negative completion (up to whitespace): a pair must "
            "contrast two texts"
        )
    if same:
        warnings.warn(
            f"{same} of {len(rows)} pairs have the same positive and negative completion: they are kept, "
            "and teach nothing",
            stacklevel=4,
        )
    return same


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


@dataclass
class TokenPairs:
    """The pair masks and aligned token rows ``(positive, negative)`` of training and validation."""

    train_mask: torch.Tensor
    val_mask: torch.Tensor
    tp: torch.Tensor
    tn: torch.Tensor
    vp: torch.Tensor
    vn: torch.Tensor

    @classmethod
    def of(cls, acts: Any, val_fraction: float, seed: int) -> TokenPairs:
        """Split ``acts``' pairs with :func:`train_val_masks`; without validation pairs (too few
        groups to hold any out) the training pairs also validate."""
        train_mask, val_mask = train_val_masks(acts, val_fraction, seed)
        tp, tn = acts.token_pairs(train_mask)
        vp, vn = acts.token_pairs(val_mask)
        if len(tp) == 0:
            raise HpreditError("no training token pairs: every completion is empty")
        if len(vp) == 0:
            warnings.warn(
                "the pairs have fewer than 2 groups, so none can be held out: validating on the training "
                "pairs (the recorded accuracies are training accuracies)",
                stacklevel=3,
            )
            vp, vn = tp, tn
        return cls(train_mask, val_mask, tp, tn, vp, vn)


def fitted_layers_from(artifact: dict, layers: list[int]) -> list[int]:
    """The artifact's ``fitted_layers`` (a list of ints containing every active layer), or a clear error."""
    fitted = artifact.get("fitted_layers")
    if not isinstance(fitted, list) or not all(is_int(i) for i in fitted) or len(set(fitted)) != len(fitted):
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
        return config_class(**d)  # validated on construction
    except HpreditError as e:
        raise HpreditError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise HpreditError(f"{where}: invalid config ({e})") from None


def load_editor(
    directory: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Editor:
    """Load any editor artifact, dispatching on its ``method``; every failure is one clear error.

    ``directory``: a local directory, or a Hugging Face Hub repo id (``namespace/name``) when no such
    directory exists, resolved to its snapshot in the Hub cache (downloaded unless ``HF_HUB_OFFLINE``
    or ``local_files_only``) at ``revision``; ``cache_dir`` and ``token`` as in ``huggingface_hub``
    (:meth:`Editor.from_pretrained`)."""
    if isinstance(directory, str) and not directory.strip():  # Path("") would be the current directory
        raise HpreditError("editor artifact: no directory given")
    directory = resolve_editor_dir(
        directory, HUB_FILES, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
    )
    where = str(directory)
    cfg = _artifact_config(directory, where)
    try:
        klass = EDITORS.get(cfg.get("method"))  # type: ignore[arg-type]
    except HpreditError as e:
        raise HpreditError(f"{where}: {e}") from None
    tensors = _artifact_tensors(directory / WEIGHTS_NAME, cfg, where)
    try:
        model = ModelFingerprint.from_dict(cfg["model"])
    except (KeyError, HpreditError) as e:
        raise HpreditError(f"{where}: config.json has a bad or missing 'model' entry ({e})") from None
    layers = _artifact_layers(cfg.get("layers"), model.num_layers, where)
    config = _config_from_dict(klass.config_class, cfg.get("config"), where)
    metrics = klass.check_metrics(cfg.get("metrics") or {}, where)
    legacy = cfg["format_version"] == 1  # before config_sha256: nothing vouches for a curve
    curve = KLCurve.from_json(cfg["kl_curve"], where) if cfg.get("kl_curve") is not None and not legacy else None
    editor = klass._from_tensors(config, layers, model, metrics, tensors, cfg)
    if legacy:
        if cfg.get("kl_curve") is not None:
            editor.unverified_curve = where
    else:
        _check_config_checksum(cfg, where)
    editor.kl_curve = curve
    return editor


def _artifact_config(directory: Path, where: str) -> dict:
    """An artifact's ``config.json``, refused unless it is an hpredit editor config of a readable format."""
    if not directory.is_dir():
        raise HpreditError(f"editor artifact {directory} does not exist (expected a directory from save_pretrained)")
    if not (directory / CONFIG_NAME).is_file():  # named in full: "." or a relative path says little
        raise HpreditError(
            f"editor artifact {directory.resolve()}: {CONFIG_NAME} is missing "
            "(not a directory written by save_pretrained)"
        )
    cfg = read_json(directory / CONFIG_NAME, "editor artifact")
    if cfg.get("format") != "hpredit-editor":
        raise HpreditError(f"{where}: config.json is not an hpredit editor config")
    if cfg.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise HpreditError(
            f"{where}: format version {cfg.get('format_version')!r} is not supported "
            f"(this hpredit reads {' and '.join(map(str, READABLE_FORMAT_VERSIONS))})"
        )
    return cfg


def _artifact_tensors(weights: Path, cfg: dict, where: str) -> dict[str, torch.Tensor]:
    """The weights file's tensors, after its checksum in ``config.json`` is checked."""
    if not weights.is_file():
        raise HpreditError(f"{where}: {WEIGHTS_NAME} is missing")
    if not isinstance(cfg.get("weights_sha256"), str) or not cfg["weights_sha256"]:
        raise HpreditError(
            f"{where}: config.json has no 'weights_sha256' entry (the checksum of {WEIGHTS_NAME}): "
            "the artifact is incomplete or was edited; save the editor again"
        )
    if sha256_file(weights) != cfg.get("weights_sha256"):
        raise HpreditError(
            f"{where}: {WEIGHTS_NAME} does not match the checksum in config.json (truncated or edited after saving)"
        )
    try:
        return load_file(weights)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise HpreditError(f"{where}: cannot read {WEIGHTS_NAME} ({e})") from None


def _artifact_layers(layers: Any, num_layers: int, where: str) -> list[int]:
    if not (isinstance(layers, list) and layers and all(is_int(i) for i in layers)):
        raise HpreditError(f"{where}: 'layers' must be a non-empty list of integers, got {layers!r}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or len(set(layers)) != len(layers):
        raise HpreditError(
            f"{where}: layers {layers} are invalid for a model with {num_layers} layers "
            "(each layer once, 0.." + f"{num_layers - 1})"
        )
    return layers


def config_checksum(cfg: dict) -> str:
    """The SHA-256 of ``config.json``'s entries outside :data:`UNCHECKED_ENTRIES`, as canonical JSON
    (sorted keys, no spaces, ASCII): what ``config_sha256`` records."""
    covered = {k: v for k, v in cfg.items() if k not in UNCHECKED_ENTRIES}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _check_config_checksum(cfg: dict, where: str) -> None:
    """Refuse a format-2 ``config.json`` whose covered entries were edited after saving (checked
    after every entry's own rules, so that a malformed entry gets its own message)."""
    if not isinstance(cfg.get("config_sha256"), str) or not cfg["config_sha256"]:
        raise HpreditError(
            f"{where}: config.json has no 'config_sha256' entry (the checksum of its config, layers and "
            "strength → KL curve): the artifact is incomplete or was edited; save the editor again"
        )
    if config_checksum(cfg) != cfg["config_sha256"]:
        raise HpreditError(
            f"{where}: config.json does not match its checksum (config_sha256): its config, layers or "
            "strength → KL curve were edited after saving; save the editor again from Python, or refit it"
        )
