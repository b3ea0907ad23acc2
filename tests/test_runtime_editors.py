"""Editors loaded and unloaded at runtime, and the per-editor counters (issue 28, items 2 and 6), without
an engine: the settings' rows, the front door's endpoints with a stand-in engine, ``/metrics``. The
real server and engines are in test_vllm.py."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from hpredit.errors import HpreditError
from hpredit.serving.params import LIVE, EditorStats, FrontSpec, RequestEdit, ServeSettings

from .test_serving import CURVE, smol_editor, smol_editor_with_curve  # noqa: F401  (fixtures)


def test_settings_load_into_free_rows_and_keep_the_order():
    """Loaded editors go last in order, into the first free strength row; a request resolves to rows,
    its editors in the server's order whatever rows they hold."""
    s = ServeSettings((("a", "/a"), ("b", "/b")), 1.0, "all", ids=("ia", "ib"), capacity=3, server="s")
    s = s.loaded("c", "/c", CURVE, "ic")
    assert s.names == ("a", "b", "c") and s.slots == (0, 1, 2) and s.curves == (None, None, CURVE)
    s = s.unloaded("b").loaded("d", "/d", None, "id")
    assert s.names == ("a", "c", "d") and s.slots == (0, 2, 1) and s.ids == ("ia", "ic", "id")
    assert s.resolve({"editor": "d", "strength": 0.5}, 3) == RequestEdit.one(1, 0.5, 0)
    assert s.resolve({"kl": 0.45, "editor": "c"}, 3) == RequestEdit.one(2, 1.0, 0)  # c's curve
    assert s.resolve({"editors": {"d": 1, "c": 2}}, 3) == RequestEdit(((2, 2.0), (1, 1.0)), 0)  # c before d
    assert s.max_kl == (None, CURVE.max_kl, None) and s.rows == 3
    for change, message in [
        (lambda: s.loaded("a", "/x", None, "x"), "an editor named 'a' is loaded already"),
        (lambda: s.loaded("e", "/e", None, "x"), "its most (--max-editors 3): unload one first"),
        (lambda: s.unloaded("a"), "is the server's default"),
        (lambda: s.unloaded("b"), "no editor named 'b' is loaded (loaded: a, c, d)"),
        (lambda: ServeSettings((("a", "/a"),)).loaded("b", "/b", None, "x"), "start it with --max-editors N"),
    ]:
        with pytest.raises(HpreditError, match=message.replace("(", r"\(").replace(")", r"\)")):
            change()


def test_front_spec_round_trips_through_its_class_name():
    spec = FrontSpec(("a", "b"), (0.4, None), ("i1", "i2"), "srv", 4, ("/a", "/b"), ("/m", "org/m", False), 0.1)
    assert FrontSpec.from_hex(spec.hex()) == spec
    assert FrontSpec.from_hex(FrontSpec(("a",)).hex()) == FrontSpec(("a",))
    more = spec.with_editor("c", "/c", None, "i3")
    assert more.names == ("a", "b", "c") and more.max_kl == (0.4, None, None) and more.without("b").ids == ("i1", "i3")
    with pytest.raises(ValueError, match="not an hpredit server spec"):
        FrontSpec.from_hex("zz")


def test_editor_stats_count_tokens_and_each_request_with_a_fallback_once():
    stats = EditorStats(2)
    r1, r2 = RequestEdit(((0, 1.0), (1, 0.5)), 0), RequestEdit.one(1, 2.0, 2)
    for r in (r1, r2):
        stats.admitted(r)
    tokens = np.array([[1, 1, 0, 0], [0.5, 0.5, 0, 2.0]])
    fell = np.array([[False, False, False, False], [True, False, False, True]])
    stats.step([r1, r2], np.array([2, 2]), tokens, fell)
    stats.step([r1, r2], np.array([2, 2]), tokens, fell)  # again: the same requests, counted once
    assert stats.counts.tolist() == [[1, 4, 0, 0], [2, 6, 4, 2]]
    settings = ServeSettings((("a", "/a"), ("b", "/b")))
    assert stats.report(settings)["b"] == {
        "requests": 2,
        "edited_tokens": 6,
        "guard_fallback_tokens": 4,
        "guard_fallback_requests": 2,
    }
    stats.clear(1)
    assert stats.counts[1].tolist() == [0, 0, 0, 0]


# ----------------------------------------------------------------- the front door, with a stand-in engine


class _Engine:
    """``engine_client`` as the endpoints use it: ``collective_rpc`` by method name, recorded."""

    def __init__(self, stats=None) -> None:
        self.calls: list = []
        self.stats = stats or {}

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append((method, args))
        return [self.stats] if method == "hpredit_stats" else [None]


class _App:
    """An inner app: answers generation with what it received, waiting on ``gate`` when given; ``/metrics``
    with one vLLM line (gzip refused: it records the request headers)."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.headers: list = []

    async def __call__(self, scope, receive, send):
        self.headers = scope["headers"]
        body, more = b"", scope["method"] == "POST"
        while more:
            m = await receive()
            body, more = body + m.get("body", b""), m.get("more_body", False)
        if self.gate is not None:
            await self.gate.wait()
        out = body if scope["method"] == "POST" else b"vllm:prefix_cache_hits_total 3.0\n"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": out})


def _call(check, method: str, path: str, body: bytes = b"", headers=()) -> tuple[int, bytes]:
    return asyncio.run(_acall(check, method, path, body, headers))


async def _acall(check, method, path, body=b"", headers=()):
    sent = []
    incoming = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers), "root_path": ""}
    scope["app"] = check.engine_app
    await check(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def _front(smol_editor, smol_dir, capacity=3, server="unit"):  # noqa: F811
    from types import SimpleNamespace

    from hpredit.serving.middleware import request_check_class
    from hpredit.serving.params import content_id

    LIVE.pop(server, None)
    spec = FrontSpec(
        ("default",),
        (None,),
        (content_id(smol_editor),),
        server,
        capacity,
        (str(smol_editor),),
        (str(smol_dir), "HuggingFaceTB/SmolLM2-135M-Instruct", True),
    )
    app, engine = (
        _App(),
        _Engine(
            {"default": {"requests": 2, "edited_tokens": 9, "guard_fallback_tokens": 0, "guard_fallback_requests": 0}}
        ),
    )
    check = request_check_class(spec)(app)
    check.engine_app = SimpleNamespace(state=SimpleNamespace(engine_client=engine))
    return check, app, engine


def test_front_door_loads_lists_and_unloads(smol_editor, smol_editor_with_curve, smol_dir, tmp_path):  # noqa: F811
    check, _, engine = _front(smol_editor, smol_dir)
    status, body = _call(check, "GET", "/v1/editors")
    assert status == 200 and [e["name"] for e in json.loads(body)["editors"]] == ["default"]
    request = json.dumps({"prompt": "Hi", "vllm_xargs": {"editor": "curved", "kl": 0.1}}).encode()
    assert _call(check, "POST", "/v1/completions", request)[0] == 400  # not loaded yet
    load = {"editor_name": "curved", "editor_path": str(smol_editor_with_curve)}
    status, body = _call(check, "POST", "/v1/load_editor", json.dumps(load).encode())
    assert status == 200 and json.loads(body)["loaded"]["name"] == "curved", body
    method, args = engine.calls[-1]
    assert method == "hpredit_load" and args[0] == "curved" and args[1] == str(smol_editor_with_curve.resolve())
    status, body = _call(check, "POST", "/v1/completions", request)
    assert status == 200 and json.loads(body)["cache_salt"].startswith("hpredit-")  # now known, its curve too
    too_far = json.dumps({"prompt": "Hi", "vllm_xargs": {"editor": "curved", "kl": 5.0}}).encode()
    assert b"beyond editor 'curved'" in _call(check, "POST", "/v1/completions", too_far)[1]
    status, body = _call(check, "POST", "/v1/unload_editor", b'{"editor_name": "curved"}')
    assert (status, json.loads(body)) == (200, {"unloaded": "curved"}) and engine.calls[-1] == (
        "hpredit_unload",
        ("curved",),
    )
    assert _call(check, "POST", "/v1/completions", request)[0] == 400


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/load_editor", b"[1]", 400, "the body must be a JSON object"),
        ("/v1/load_editor", b'{"editor_name": 3, "editor_path": "x"}', 400, "'editor_name': an editor name must be"),
        ("/v1/load_editor", b'{"editor_name": "default", "editor_path": "x"}', 409, "loaded already"),
        ("/v1/load_editor", b'{"editor_name": "n", "editor_path": "/nonexistent/dir"}', 400, "does not exist"),
        ("/v1/load_editor", b'{"editor_name": "n", "editor_path": null}', 400, "'editor_path' must be"),
        ("/v1/unload_editor", b'{"editor_name": "n"}', 404, "no editor named 'n' is loaded (loaded: default)"),
        ("/v1/unload_editor", b'{"editor_name": "default"}', 400, "is the server's default"),
        ("/v1/unload_editor", b"", 400, "the body must be a JSON object"),
    ],
)
def test_front_door_refuses_bad_editor_requests(smol_editor, smol_dir, path, body, status, message):  # noqa: F811
    check, _, engine = _front(smol_editor, smol_dir)
    got, answer = _call(check, "POST", path, body)
    error = json.loads(answer)["error"]
    assert got == status and error["code"] == status and message in error["message"], answer
    assert engine.calls == []  # nothing reached the engine


def test_front_door_without_max_editors_loads_nothing(smol_editor, smol_dir):  # noqa: F811
    check, _, _ = _front(smol_editor, smol_dir, capacity=0, server=None)
    load = json.dumps({"editor_name": "x", "editor_path": str(smol_editor)}).encode()
    status, body = _call(check, "POST", "/v1/load_editor", load)
    assert status == 400 and "start it with --max-editors N" in json.loads(body)["error"]["message"]
    assert _call(check, "POST", "/v1/unload_editor", b'{"editor_name": "x"}')[0] == 400


def test_a_full_front_door_and_a_model_mismatch(smol_editor, smol_dir, tmp_path):  # noqa: F811
    from .conftest import random_hpr, tiny_model

    check, _, _ = _front(smol_editor, smol_dir, capacity=1)
    status, body = _call(
        check, "POST", "/v1/load_editor", json.dumps({"editor_name": "x", "editor_path": str(smol_editor)}).encode()
    )
    assert status == 409 and "(--max-editors 1)" in json.loads(body)["error"]["message"]
    check, _, _ = _front(smol_editor, smol_dir)
    other = random_hpr(tiny_model("llama"), [1]).save_pretrained(tmp_path / "other")
    status, body = _call(
        check, "POST", "/v1/load_editor", json.dumps({"editor_name": "x", "editor_path": str(other)}).encode()
    )
    assert status == 400 and "editor 'x': " in json.loads(body)["error"]["message"]


def test_unload_waits_for_requests_in_flight(smol_editor, smol_dir):  # noqa: F811
    """A request using the editor holds the unload: it answers only once the request is done; a new
    request naming the editor is refused meanwhile."""
    check, app, engine = _front(smol_editor, smol_dir)

    async def whole():
        load = json.dumps({"editor_name": "e", "editor_path": str(smol_editor)}).encode()
        assert (await _acall(check, "POST", "/v1/load_editor", load))[0] == 200
        gate = asyncio.Event()
        app.gate = gate
        busy = asyncio.create_task(
            _acall(check, "POST", "/v1/completions", b'{"prompt": "Hi", "vllm_xargs": {"editor": "e"}}')
        )
        await asyncio.sleep(0.05)
        app.gate = None
        unload = asyncio.create_task(_acall(check, "POST", "/v1/unload_editor", b'{"editor_name": "e"}'))
        await asyncio.sleep(0.2)
        assert not unload.done() and ("hpredit_unload", ("e",)) not in engine.calls
        refused = await _acall(check, "POST", "/v1/completions", b'{"prompt": "Hi", "vllm_xargs": {"editor": "e"}}')
        assert refused[0] == 400 and b"unknown editor 'e'" in refused[1]
        gate.set()
        assert (await busy)[0] == 200
        assert (await unload)[0] == 200 and engine.calls[-1] == ("hpredit_unload", ("e",))

    asyncio.run(whole())


def test_metrics_get_hpredits_counters_after_vllms(smol_editor, smol_dir):  # noqa: F811
    check, app, _ = _front(smol_editor, smol_dir)
    status, body = _call(
        check, "GET", "/metrics", headers=[(b"accept-encoding", b"gzip"), (b"accept", b"application/openmetrics-text")]
    )
    text = body.decode()
    assert status == 200 and text.startswith("vllm:prefix_cache_hits_total 3.0\n")
    assert (
        'hpredit_requests_total{editor="default"} 2\n' in text
        and 'hpredit_edited_tokens_total{editor="default"} 9' in text
    )
    assert "# TYPE hpredit_guard_fallback_requests_total counter" in text
    assert app.headers == []  # asked of vLLM in the plain text format, uncompressed (ours is appended)
    assert "hpredit_requests_total" in _call(check, "GET", "/metrics/")[1].decode()


def test_the_cache_salt_carries_the_editors_content():
    from hpredit.serving.middleware import salted

    body = {"prompt": "Hi", "vllm_xargs": {"editor": "a", "strength": 1.0}}
    one, other = FrontSpec(("a",), ids=("c1",)), FrontSpec(("a",), ids=("c2",))
    salt = [json.loads(salted(json.loads(json.dumps(body)), spec))["cache_salt"] for spec in (one, other, one)]
    assert salt[0] != salt[1] and salt[0] == salt[2]
    default = {"prompt": "Hi"}  # the default editor's content, too
    assert (
        json.loads(salted(dict(default), one))["cache_salt"] != json.loads(salted(dict(default), other))["cache_salt"]
    )


# ----------------------------------------------------------------- hpredit serve --max-editors


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "--max-editors must be a whole number between 1 (the editors given) and 64, got 0"),
        ("65", "between 1 (the editors given) and 64, got 65"),
        ("-1", "got -1"),
    ],
)
def test_serve_bad_max_editors(smol_editor, capsys, value, message):  # noqa: F811
    from .test_serving import _one_line_error, run_cli

    code, _, err = run_cli(["serve", "--editor", str(smol_editor), "--max-editors", value], capsys)
    _one_line_error(code, err, message)


def test_serve_max_editors_below_the_editors_given(smol_editor, capsys):  # noqa: F811
    from .test_serving import _one_line_error, run_cli

    argv = ["serve", "--editor", str(smol_editor), "--editor", f"b={smol_editor}", "--max-editors", "1"]
    code, _, err = run_cli(argv, capsys)
    _one_line_error(code, err, "between 2 (the editors given) and 64, got 1")


def test_serve_max_editors_and_the_vllm_options_it_needs(smol_editor):  # noqa: F811
    """One API server (the list of editors lives in its process); the worker extension is hpredit's."""
    pytest.importorskip("vllm")
    from hpredit.serving import _serve_argv, check_vllm_args

    argv, owned = _serve_argv(smol_editor, None, 1.0, "all", ["--api-server-count", "2"], True, None, 3)
    with pytest.raises(HpreditError, match=r"--max-editors needs one API server \(--api-server-count 1\)"):
        check_vllm_args(argv, owned)
    argv, owned = _serve_argv(smol_editor, None, 1.0, "all", ["--worker-extension-cls", "my.Ext"], True, None, 3)
    with pytest.raises(HpreditError, match="--worker-extension-cls is set by hpredit serve"):
        check_vllm_args(argv, owned)
    argv, owned = _serve_argv(smol_editor, None, 1.0, "all", [], True, None, 3)
    args = check_vllm_args(argv, owned)  # on CPU: no CUDA graphs, torch.compile stays
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert overrides["hpredit_capacity"] == 3 and overrides["hpredit_server"] and args.worker_extension_cls


def test_cuda_graphs_are_refused_with_runtime_editors(monkeypatch):
    """On a GPU, --max-editors with CUDA graphs on is refused (they replay the edits they captured)."""
    pytest.importorskip("vllm")
    import hpredit.serving
    from hpredit.serving import _cuda_graphs

    assert not _cuda_graphs(False, None)  # CPU: never
    monkeypatch.setattr(hpredit.serving, "_on_cpu", lambda: False)
    assert _cuda_graphs(False, None) and _cuda_graphs(False, {"cudagraph_mode": "FULL_AND_PIECEWISE"})
    assert not _cuda_graphs(True, None) and not _cuda_graphs(False, {"cudagraph_mode": "NONE"})


def test_editor_endpoints_need_the_api_key(smol_editor, smol_dir):  # noqa: F811
    """With --api-key, loading, unloading and listing without the key is vLLM's 401 (they are /v1 paths)."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    check, app, engine = _front(smol_editor, smol_dir)
    check.app = AuthenticationMiddleware(app, tokens=["secret"])
    load = json.dumps({"editor_name": "e", "editor_path": str(smol_editor)}).encode()
    assert _call(check, "POST", "/v1/load_editor", load)[0] == 401
    assert _call(check, "POST", "/v1/unload_editor", b'{"editor_name": "default"}')[0] == 401
    assert _call(check, "GET", "/v1/editors")[0] == 401
    assert engine.calls == []
    key = [(b"authorization", b"Bearer secret")]
    assert _call(check, "POST", "/v1/load_editor", load, key)[0] == 200
    assert _call(check, "GET", "/v1/editors", headers=key)[0] == 200


@pytest.mark.parametrize(
    "value, message",
    [
        ("x", "Invalid value for '--max-editors'"),
        ("2.5", "Invalid value for '--max-editors'"),
        ("", "Invalid value for '--max-editors'"),
        ("0", "between 1 (the editors given) and 64, got 0"),
        ("100000", "got 100000"),
    ],
)
def test_serve_bad_max_editors_in_a_real_process(smol_editor, value, message):  # noqa: F811
    """`hpredit serve --max-editors` as a user types it, in its own process: one error line, exit 2."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "hpredit.cli", "serve", "--editor", str(smol_editor), "--max-editors", value]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert message in lines[0] and "Traceback" not in out.stderr


def test_editor_names_are_bounded():
    from hpredit.serving.params import check_editor_name

    assert check_editor_name("a" * 64) == "a" * 64
    with pytest.raises(HpreditError, match="at most 64, got 'a{65}'$"):
        check_editor_name("a" * 65)
    with pytest.raises(HpreditError, match=r"at most 64, got 'a{59}\.\.\. \(5000 characters\)$"):
        check_editor_name("a" * 5000)  # not echoed whole
    with pytest.raises(HpreditError, match="got ''"):
        check_editor_name("")
