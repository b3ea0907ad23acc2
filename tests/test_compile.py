"""The compiled path: edits under torch.compile(fullgraph=True), static-cache generation, no stale graphs.

Inductor (C++ codegen on CPU) is slow on small machines, so only the edit itself goes through it;
the model-level tests use the ``aot_eager`` backend, which runs the same dynamo capture (where hooks
are traced, guarded and could go stale) and AOT dispatch (where a custom op could be decomposed)
without code generation. The fused HPR edit's row-wise step is the custom op ``hpredit::hpr_rows``:
compiled graphs must keep it whole, so that they run the same kernel as eager mode.
"""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from hpredit.kernels import triton_available

from .conftest import random_editor, random_hpr, tiny_model

OP = torch.ops.hpredit.hpr_rows.default


def _compile_config(backend: str = "aot_eager"):
    from transformers import CompileConfig

    config = CompileConfig(backend=backend, mode=None, fullgraph=True)  # fullgraph: a graph break is an error
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    return config


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _inputs(dtype=torch.float32, seed=1, batch=2, seq=5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, seq, 64, generator=g) * 4).to(dtype)
    mask = torch.rand(batch, seq, generator=g) > 0.3
    s = torch.rand(batch, seq, generator=g) * 2
    s[0, 0] = 0.0
    return x, mask, s


class _Graphs:
    """A compile backend that records the graphs AOT dispatch hands to the compiler (after
    functionalisation and decomposition: where a custom op would be taken apart) and runs them."""

    def __init__(self):
        self.graphs = []

        def keep(gm, _inputs):
            self.graphs.append(gm)
            return gm

        self.backend = aot_autograd(fw_compiler=keep)

    def nodes(self, target) -> list:
        return [n for g in self.graphs for n in g.graph.nodes if n.op == "call_function" and n.target is target]

    def calls(self, target) -> int:
        return len(self.nodes(target))


def test_fast_edit_compiles_fullgraph_inductor():
    """Inductor keeps the custom op (its generated code calls it) and gives eager's result."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_model("llama")
    ed = random_hpr(model, depth=4)
    fn = ed.layer_edit(1, torch.device("cpu"), torch.float32)
    x, mask, s = _inputs()
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    got, code = run_and_get_code(compiled, x, mask, s)
    assert "\n".join(code).count("= torch.ops.hpredit.hpr_rows.default(") == 1  # called, not regenerated
    torch.testing.assert_close(got, fn(x, mask, s), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0, 0], x[0, 0]) and torch.equal(got[~mask], x[~mask])
    torch.testing.assert_close(compiled(x, None, 1.0), fn(x, None, 1.0), atol=1e-5, rtol=1e-5)


BACKENDS = ["auto", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_graph_keeps_the_fused_op(backend, dtype):
    """fullgraph, no graph break, one ``hpredit::hpr_rows`` per call in the graph AOT dispatch
    compiles (the Triton kernel or, on CPU, the PyTorch step inside it), eager's result bit for bit
    with per-token strengths and masks, and untouched tokens bit for bit."""
    if backend == "triton" and not triton_available():
        pytest.skip("triton not installed")
    model = tiny_model("llama")
    ed = random_hpr(model, depth=4)
    ed.kernel_backend = backend
    fn = ed.layer_edit(1, torch.device("cpu"), dtype)
    x, mask, s = _inputs(dtype)
    explained = torch._dynamo.explain(fn)(x, mask, s)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    rec = _Graphs()
    compiled = torch.compile(fn, fullgraph=True, backend=rec.backend)
    for m, strength in ((mask, s), (None, s), (mask, 1.0), (None, 0.5)):
        got = compiled(x, m, strength)
        assert torch.equal(_bits(got), _bits(fn(x, m, strength))), (m is None, strength)
        untouched = (got == x).all(-1)
        assert untouched.any() and not untouched.all()
        if m is not None:
            assert torch.equal(_bits(got[~m]), _bits(x[~m]))
        if torch.is_tensor(strength):
            assert torch.equal(_bits(got[strength == 0]), _bits(x[strength == 0]))
    assert len(rec.graphs) == 4 and rec.calls(OP) == 4  # one graph per mask / strength kind, one op each
    assert all(node.args[-1] is (backend == "triton") for node in rec.nodes(OP))  # the kernel, as eager


def test_backend_torch_compiles_the_pytorch_step_inline():
    """``kernel_backend = "torch"``: no custom op; inductor gets the PyTorch step to fuse itself."""
    model = tiny_model("llama")
    ed = random_hpr(model, depth=4)
    ed.kernel_backend = "torch"
    fn = ed.layer_edit(1, torch.device("cpu"), torch.float32)
    x, mask, s = _inputs()
    rec = _Graphs()
    got = torch.compile(fn, fullgraph=True, backend=rec.backend)(x, mask, s)
    torch.testing.assert_close(got, fn(x, mask, s), atol=1e-6, rtol=1e-6)
    assert rec.calls(OP) == 0 and rec.calls(torch.ops.aten.addmm.default) >= 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_check(dtype):
    """The custom op's schema, fake implementation and AOT dispatch (torch.library.opcheck)."""
    from hpredit.geometry import fallback_axis

    g = torch.Generator().manual_seed(0)
    n, d, width = 10, 64, 16
    w_hat = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    basis = torch.stack([w_hat, fallback_axis(w_hat)])
    h = (torch.randn(n, d, generator=g) * 4).to(dtype)
    z = torch.randn(n, width, generator=g).to(dtype)
    w_last, b_last = torch.randn(width, generator=g), torch.randn(1, generator=g)  # float32 always
    s = torch.rand(n, generator=g) * 2
    m = torch.rand(n, generator=g) > 0.3
    for args in (
        (h, z, basis, w_last, b_last, s, m, 0.0, None, True, True, False),
        (h, z, basis, w_last, b_last, None, None, 0.7, None, False, False, False),
        (h, None, basis, None, None, None, m, 1.0, 0.8, False, True, False),
    ):
        torch.library.opcheck(OP, args)
        assert not torch.equal(OP(*args), h)


def test_vllm_style_call_compiles_dynamic():
    """The call vLLM's compiled forward makes (``serving/model.py``: flattened tokens (n, d), mask
    ``s != 0``, per-token strengths (n,)), with the token count dynamic: one graph, the op in it."""
    model = tiny_model("llama")
    fn = random_hpr(model, depth=4).layer_edit(1, torch.device("cpu"), torch.bfloat16)

    def layer_tail(stream: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return fn(stream, s != 0, s)

    rec = _Graphs()
    compiled = torch.compile(layer_tail, fullgraph=True, dynamic=True, backend=rec.backend)
    for n in (3, 8, 17):
        x, _, s = _inputs(torch.bfloat16, seed=n, batch=1, seq=n)
        got = compiled(x[0], s[0])
        assert torch.equal(_bits(got), _bits(layer_tail(x[0], s[0])))
    assert len(rec.graphs) == 1 and rec.calls(OP) == 1


@pytest.mark.parametrize("kind", ["hpr-reference", "caa", "caa-norm", "iti"])
def test_other_edits_compile_fullgraph(kind):
    model = tiny_model("llama")
    if kind == "hpr-reference":
        fn = random_hpr(model, depth=2).layer_edit(0, torch.device("cpu"), torch.float32, fast=False)
    else:
        ed = random_editor(kind, model)
        fn = ed.layer_edit(ed.layers[0], torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 64, generator=g) * 4
    s = torch.rand(2, 5, generator=g)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for strength in (s, 0.7):
        torch.testing.assert_close(compiled(x, None, strength), fn(x, None, strength), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_compiled_generate_equals_eager(dtype):
    model = tiny_model("llama", dtype=dtype)
    ed = random_hpr(model, depth=4)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        with ed.attach(model):
            eager = model.generate(ids, **kw)
            compiled = model.generate(ids, **kw, cache_implementation="static", compile_config=_compile_config())
    assert hasattr(model, "_compiled_call")  # the decode steps did run compiled
    assert torch.equal(compiled, eager)
    assert not torch.equal(eager, plain)


@torch._dynamo.config.patch(skip_nnmodule_hook_guards=True)  # dynamo's default, as in a fresh process
def test_attach_detach_after_compile_is_never_stale():
    """Compiled before attach (dynamo's default: no guards on hooks): unedited, edited, unedited."""
    model = tiny_model("llama")
    ed = random_hpr(model, depth=2)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        plain = model(ids).logits
        with ed.attach(model, strength=1.0):
            edited = model(ids).logits
        with ed.attach(model, strength=0.5):
            half = model(ids).logits
        assert not torch.equal(plain, edited) and not torch.equal(edited, half)

        torch.testing.assert_close(compiled(ids).logits, plain)
        with ed.attach(model, strength=1.0):
            torch.testing.assert_close(compiled(ids).logits, edited)
        torch.testing.assert_close(compiled(ids).logits, plain)
        with ed.attach(model, strength=0.5):  # another strength: another graph, not the last one
            torch.testing.assert_close(compiled(ids).logits, half)
        torch.testing.assert_close(compiled(ids).logits, plain)


@torch._dynamo.config.patch(skip_nnmodule_hook_guards=True)
def test_generate_compiled_then_attached_is_never_stale():
    model = tiny_model("llama")
    ed = random_hpr(model, depth=2)
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    static = dict(kw, cache_implementation="static", compile_config=_compile_config())
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        with ed.attach(model):
            edited = model.generate(ids, **kw)
        assert not torch.equal(plain, edited)
        assert torch.equal(model.generate(ids, **static), plain)
        with ed.attach(model):
            assert torch.equal(model.generate(ids, **static), edited)
        assert torch.equal(model.generate(ids, **static), plain)
