"""The compiled path: edits under torch.compile(fullgraph=True), static-cache generation, no stale graphs.

Inductor (C++ codegen on CPU) is slow on small machines, so only the edit itself goes through it;
the model-level tests use the ``aot_eager`` backend, which runs the same dynamo capture (where hooks
are traced, guarded and could go stale) without code generation.
"""

import pytest
import torch

from .conftest import random_editor, random_hpr, tiny_model


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


def test_fast_edit_compiles_fullgraph_inductor():
    model = tiny_model("llama")
    ed = random_hpr(model, depth=4)
    fn = ed.layer_edit(1, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 64, generator=g) * 4
    mask = torch.rand(2, 5, generator=g) > 0.3
    s = torch.rand(2, 5, generator=g) * 2
    s[0, 0] = 0.0
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    got = compiled(x, mask, s)
    torch.testing.assert_close(got, fn(x, mask, s), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0, 0], x[0, 0]) and torch.equal(got[~mask], x[~mask])
    torch.testing.assert_close(compiled(x, None, 1.0), fn(x, None, 1.0), atol=1e-5, rtol=1e-5)


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
