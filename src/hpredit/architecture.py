"""Finding the parts of a decoder-only model without a per-architecture table, and its fingerprint.

The decoder blocks, the attention output projection, the backbone that owns the blocks, the text
config of multimodal models, and what an editor records about the model it was fitted on.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import align_module_device, has_offloaded_params
from torch import nn

from .checks import is_int
from .errors import HpreditError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "ModelFingerprint",
    "attention_output",
    "backbone",
    "decoder_layers",
    "fingerprint",
    "hidden_size",
    "max_positions",
    "num_attention_heads",
    "num_layers",
    "text_config",
    "weight_signature",
]


# --------------------------------------------------------------------------- layer discovery

_PREFERRED_NAMES = ("layers", "h", "blocks", "layer", "decoder_layers")
_AVOID = ("vision", "visual", "image", "audio", "encoder", "mtp")


def text_config(model_or_config: Any) -> PretrainedConfig:
    """The config of the text model: ``config.get_text_config()`` for multimodal configs, else the config.

    Accepts a model (its ``.config`` is used) or a config.
    """
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(config: Any) -> int | None:
    """The most token positions a config or model was built for (``max_position_embeddings``,
    ``n_positions``, …), or None when it names none."""
    text = text_config(config)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        n = getattr(text, attr, None)
        if is_int(n) and n > 0:
            return n
    return None


def num_layers(config: Any) -> int | None:
    """The decoder block count of a config or model (``num_hidden_layers``/``n_layer``/``num_layers``), or None."""
    text = text_config(config)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(text, attr, None)
        if is_int(n):
            return n
    return None


def decoder_layers(model: nn.Module, layers_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Find the decoder blocks of a decoder-only model: returns ``(path, ModuleList)``.

    Without ``layers_path``, looks for an ``nn.ModuleList`` of identical blocks whose length is the
    config's layer count (``num_hidden_layers`` / ``n_layer``), preferring names like ``layers`` or
    ``h`` and the shortest path outside vision/audio towers: no per-architecture table.
    """
    if layers_path is not None:
        try:
            mod = model.get_submodule(layers_path)
        except AttributeError:
            raise HpreditError(f"model has no submodule {layers_path!r}") from None
        if not isinstance(mod, nn.ModuleList):
            raise HpreditError(f"{layers_path!r} is a {type(mod).__name__}, not an nn.ModuleList of blocks")
        return layers_path, mod
    n = num_layers(model.config) if hasattr(model, "config") else None
    candidates = []
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if n is not None and len(mod) != n:
            continue
        if len({type(m) for m in mod}) != 1 or sum(1 for _ in mod[0].parameters()) == 0:
            continue
        last = path.rsplit(".", 1)[-1]
        score = (
            any(a in path.lower() for a in _AVOID),
            last not in _PREFERRED_NAMES,
            path.count("."),
        )
        candidates.append((score, path, mod))
    if not candidates:
        raise HpreditError(
            f"could not find the decoder blocks of {type(model).__name__}: looked for an nn.ModuleList "
            f"of {n if n is not None else 'N'} identical blocks (config num_hidden_layers/n_layer); "
            "pass layers_path='model.layers' (the dotted path of the blocks)"
        )
    candidates.sort(key=lambda c: c[0])
    return candidates[0][1], candidates[0][2]


_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_OUT_PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo")


def attention_output(block: nn.Module) -> nn.Module:
    """The attention output projection of a decoder block (its input holds the per-head outputs).

    Looked up by the usual names (``self_attn.o_proj``, ``attn.c_proj``, ``attention.dense``, …).
    """
    for attn_name in _ATTN_NAMES:
        attn = getattr(block, attn_name, None)
        if isinstance(attn, nn.Module):
            for proj_name in _OUT_PROJ_NAMES:
                proj = getattr(attn, proj_name, None)
                if isinstance(proj, nn.Module):
                    return proj
    raise HpreditError(
        f"could not find the attention output projection in {type(block).__name__}: looked for "
        f"{'/'.join(_ATTN_NAMES)} . {'/'.join(_OUT_PROJ_NAMES)}"
    )


def num_attention_heads(model: nn.Module) -> int:
    """The attention head count of the text model."""
    return int(text_config(model).num_attention_heads)


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: accelerate's execution device where its hooks place the
    weights (a device map, CPU or disk offload: offloaded weights sit on the meta device), else the
    device of its first parameter."""
    for m in module.modules():
        device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def backbone(model: nn.Module, layers_path: str) -> nn.Module:
    """The module that owns the decoder blocks (e.g. ``model.model`` for Llama)."""
    parent = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    return model.get_submodule(parent) if parent else model


# --------------------------------------------------------------------------- fingerprint


_SIGNATURE_POINTS = 6  # entries taken from each of two weight matrices
# Loose on purpose: the same model in bfloat16 or 4-bit quantised (the embedded default is Q4_1) must match;
# unrelated weights differ by O(1) of the scale in every one of the 12 entries.
_SIGNATURE_RTOL = 0.25  # a 4-bit copy of a tiny model differs by 7% here


@dataclass(frozen=True)
class ModelFingerprint:
    """What an editor was fitted on: enough to refuse a model it cannot apply to.

    ``weights``: a few fixed entries of the input embedding and of the last block's first weight
    matrix (a cheap digest that tells two models of the same architecture, sizes and name apart;
    compared with a tolerance, so the same model in float32, float16 or bfloat16 matches). Artifacts
    written before it existed have ``None`` and are compared without it.
    """

    architecture: str
    hidden_size: int
    num_layers: int
    name: str
    weights: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.weights is None:
            del d["weights"]
        else:
            d["weights"] = list(self.weights)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ModelFingerprint:
        """Rebuild from :meth:`to_dict`'s output; wrong or missing entries raise :class:`HpreditError`."""
        if not isinstance(d, dict):
            raise HpreditError("model fingerprint must be an object")
        for key, kind in (("architecture", str), ("hidden_size", int), ("num_layers", int), ("name", str)):
            if key not in d:
                raise HpreditError(f"model fingerprint: missing {key!r}")
            if not isinstance(d[key], kind) or isinstance(d[key], bool):
                raise HpreditError(f"model fingerprint: {key!r} must be {'a string' if kind is str else 'an integer'}")
        weights = d.get("weights")
        if weights is not None and not (
            isinstance(weights, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in weights)
        ):
            raise HpreditError("model fingerprint: 'weights' must be a list of numbers")
        return cls(
            architecture=d["architecture"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_layers"],
            name=d["name"],
            weights=None if weights is None else tuple(float(v) for v in weights),
        )

    def short_name(self) -> str:
        return self.name.rstrip("/").rsplit("/", 1)[-1].lower()

    def mismatches(self, other: ModelFingerprint, check_name: bool = True) -> list[str]:
        """Human-readable differences, empty when ``other`` matches."""
        out = []
        for field in ("architecture", "hidden_size", "num_layers"):
            a, b = getattr(self, field), getattr(other, field)
            if a != b:
                out.append(f"{field} {b} (editor fitted on {a})")
        if check_name and self.short_name() != other.short_name():
            out.append(f"name {other.name!r} (editor fitted on {self.name!r})")
        if not out and not _same_weights(self.weights, other.weights):
            out.append("weights: same architecture and sizes, but not the weights the editor was fitted on")
        return out


def _same_weights(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    if a is None or b is None:
        return True  # an old artifact without the digest: nothing to compare
    if len(a) != len(b):
        return False
    scale = max((abs(v) for v in a), default=0.0)
    return all(abs(x - y) <= _SIGNATURE_RTOL * scale + 1e-12 for x, y in zip(a, b))


def hidden_size(model: nn.Module) -> int:
    """The residual width ``d`` of the text model."""
    return int(text_config(model).hidden_size)


def weight_signature(model: nn.Module, blocks: nn.ModuleList | None = None) -> tuple[float, ...] | None:
    """A few fixed entries of the input embedding and the last block's first 2-D weight (see
    :class:`ModelFingerprint`); None where the weights cannot be read (meta device, no embedding)."""
    try:
        emb_module = model.get_input_embeddings()  # type: ignore[operator]
        emb_module.weight  # noqa: B018  (has a weight)
    except (AttributeError, NotImplementedError):
        return None
    if blocks is None:
        blocks = decoder_layers(model)[1]
    last = next(
        ((m, n) for m in blocks[-1].modules() for n, p in m.named_parameters(recurse=False) if p.dim() == 2), None
    )
    out: list[float] = []
    for owner, name in ((emb_module, "weight"), last or (None, "")):
        if owner is None:
            return None
        values = _signature_points(owner, name)
        if values is None:
            return None
        out += values
    return tuple(out)


def _signature_points(module: nn.Module, name: str) -> list[float] | None:
    """``_SIGNATURE_POINTS`` fixed entries of ``module``'s parameter ``name``; an offloaded parameter
    (meta device under an accelerate device map) is read where accelerate keeps it."""
    with contextlib.ExitStack() as stack:
        w = getattr(module, name)
        if w.device.type == "meta" and getattr(module, "_hf_hook", None) is not None:
            if has_offloaded_params(module):
                stack.enter_context(align_module_device(module))
                w = getattr(module, name)
        if w.device.type == "meta" or not w.dtype.is_floating_point:
            return None
        flat = w.detach().reshape(-1)
        n = flat.numel()
        idx = torch.tensor([(2 * k + 1) * n // (2 * _SIGNATURE_POINTS) for k in range(_SIGNATURE_POINTS)])
        return [float(f"{v:.4g}") for v in flat[idx.to(flat.device)].double().cpu().tolist()]


def fingerprint(model: nn.Module, layers_path: str | None = None) -> ModelFingerprint:
    """The fingerprint of ``model``: architecture class, hidden size, block count, name and weight digest."""
    _, layers = decoder_layers(model, layers_path)
    return ModelFingerprint(
        architecture=type(model).__name__,
        hidden_size=hidden_size(model),
        num_layers=len(layers),
        name=str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        weights=weight_signature(model, layers),
    )
