"""The server's editor endpoints, answered by hpredit's front door (:mod:`~hpredit.serving.middleware`):
load and unload editors at runtime, list them, and hpredit's counters on vLLM's ``/metrics``.

- ``POST /v1/load_editor`` ``{"editor_name": NAME, "editor_path": DIR or org/name[@REVISION]}``: the
  checks of a start-up editor (artifact integrity, the model's fingerprint, a residual-stream method,
  the server's default cost reachable), then every worker loads it, last in the server's editor order.
- ``POST /v1/unload_editor`` ``{"editor_name": NAME}``: new requests naming it are refused at once; the
  requests in flight with it finish first (the answer waits for them, :data:`UNLOAD_WAIT` s at most),
  then every worker drops it. The default editor (the first) stays.
- ``GET /v1/editors``: name, method, layers, the measured strength → KL range, default or not.

Only on a server started with ``--max-editors N`` (loading); listing always. Errors are vLLM's error
shape: 400 a bad body, path or editor; 404 an unknown name; 409 a name loaded already, a full server,
or an editor still in use after the wait.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import HpreditError
from .params import COUNTERS, LIVE, FrontSpec, check_editor_name, load_refusal, unload_refusal

__all__ = ["LOAD_PATH", "LIST_PATH", "UNLOAD_PATH", "Admin", "editor_info", "metrics_text"]

LOAD_PATH, UNLOAD_PATH, LIST_PATH = "/v1/load_editor", "/v1/unload_editor", "/v1/editors"
#: how long an unload waits for the requests in flight with the editor (seconds)
UNLOAD_WAIT = 300.0

_HELP = {
    "requests": "Requests served with the editor, at any strength (counted when they enter the running batch).",
    "edited_tokens": "Tokens given a nonzero strength for the editor (its own gate may leave some as they are).",
    "guard_fallback_tokens": "Tokens whose edit by the editor was not finite, left as they were by the guard.",
    "guard_fallback_requests": "Requests with at least one token the non-finite guard left unedited.",
}


class Problem(Exception):
    """A request the endpoints refuse: HTTP ``status`` and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def editor_info(name: str, directory: str, default: bool) -> dict[str, Any]:
    """What ``GET /v1/editors`` says of one editor, from its artifact's ``config.json``."""
    from ..files import read_json

    cfg = read_json(Path(directory) / "config.json", "editor artifact")
    curve = cfg.get("kl_curve") or None
    return {
        "name": name,
        "method": cfg.get("method"),
        "layers": cfg.get("layers"),
        "default": default,
        "strength_kl": None if curve is None else {"strength": curve.get("strength"), "kl": curve.get("kl")},
        "path": directory,
    }


def metrics_text(stats: dict[str, dict[str, int]]) -> str:
    """Prometheus text-format lines of the per-editor counters (``editor`` label)."""
    lines = []
    for counter in COUNTERS:
        metric = f"hpredit_{counter}_total"
        lines += [f"# HELP {metric} {_HELP[counter]}", f"# TYPE {metric} counter"]
        lines += [f'{metric}{{editor="{name}"}} {values[counter]}' for name, values in stats.items()]
    return "\n".join(lines) + "\n"


class Admin:
    """One server's editor endpoints and the requests in flight per editor (one per front door)."""

    def __init__(self, spec: FrontSpec) -> None:
        self.spec = spec
        self.in_flight: Counter[str] = Counter()
        self._lock = asyncio.Lock()  # one load or unload at a time

    def current(self) -> FrontSpec:
        return self.spec.current()

    def list(self) -> dict[str, Any]:
        spec = self.current()
        editors = [editor_info(n, p, i == 0) for i, (n, p) in enumerate(zip(spec.names, spec.paths))]
        return {"editors": editors, "max_editors": spec.capacity or len(spec.names)}

    def _loadable(self, spec: FrontSpec, name: str) -> None:
        refusal = load_refusal(spec.names, spec.capacity, name)
        if refusal:
            raise Problem(*refusal)

    def plan_load(self, body: dict[str, Any]) -> tuple[FrontSpec, str, str, float | None, str]:
        """Check a load request and the editor (reading it: blocking): ``(spec now, name, local directory,
        its largest measured KL, its content id)``."""
        name, path = _name(body), body.get("editor_path")
        if not isinstance(path, str) or not path.strip():
            raise Problem(400, f"'editor_path' must be an editor directory or a Hub repo id, got {path!r}")
        spec = self.current()
        self._loadable(spec, name)
        from . import check_runtime_editor  # transformers, huggingface_hub: only when loading

        try:
            directory, top, content = check_runtime_editor(path, spec, name)
        except HpreditError as e:
            raise Problem(400, f"editor {name!r}: {e}") from None
        return spec, name, directory, top, content

    def plan_unload(self, body: dict[str, Any]) -> tuple[FrontSpec, str]:
        """Check an unload request: ``(spec now, name)``."""
        name = _name(body)
        spec = self.current()
        refusal = unload_refusal(spec.names, spec.capacity, name)
        if refusal:
            raise Problem(*refusal)
        return spec, name

    def loaded(self, spec: FrontSpec, name: str, directory: str, top: float | None, content: str) -> dict[str, Any]:
        """Once every worker has loaded it: the editor known to the front door (last in order), and
        what ``GET /v1/editors`` says of it."""
        assert spec.server is not None  # capacity: a server that loads at runtime has an id
        LIVE[spec.server] = spec.with_editor(name, directory, top, content)
        return editor_info(name, directory, False)

    def unloading(self, spec: FrontSpec, name: str) -> None:
        """Before any worker drops it: from now on a request naming ``name`` is refused."""
        assert spec.server is not None
        LIVE[spec.server] = spec.without(name)

    async def load(self, body: dict[str, Any], engine: Any) -> dict[str, Any]:
        """``POST /v1/load_editor``: checked, then loaded by every worker (``engine.collective_rpc``)."""
        self._loadable(self.current(), _name(body))  # a clear answer before waiting for the lock
        async with self._lock:
            spec, name, directory, top, content = await asyncio.to_thread(self.plan_load, body)
            try:
                await engine.collective_rpc("hpredit_load", args=(name, directory, content))
            except Exception as e:  # noqa: BLE001  a worker could not load it: said, not fatal to the server
                raise Problem(500, f"editor {name!r}: the engine could not load it: {e}") from None
            return {"loaded": self.loaded(spec, name, directory, top, content)}

    async def unload(self, body: dict[str, Any], engine: Any) -> dict[str, Any]:
        """``POST /v1/unload_editor``: refused to new requests at once, dropped once none in flight uses it."""
        async with self._lock:
            spec, name = self.plan_unload(body)
            self.unloading(spec, name)
            deadline = time.monotonic() + UNLOAD_WAIT
            while self.in_flight[name] > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.in_flight[name] > 0:
                assert spec.server is not None  # checked by unloading
                LIVE[spec.server] = spec  # still in use: it stays loaded
                raise Problem(
                    409,
                    f"editor {name!r} is still used by {self.in_flight[name]} requests after {UNLOAD_WAIT:g} s: "
                    "try again later",
                )
            await engine.collective_rpc("hpredit_unload", args=(name,))
        return {"unloaded": name}

    async def stats(self, engine: Any) -> dict[str, dict[str, int]]:
        """The counters of the first worker (every worker of a tensor-parallel group sees the same tokens)."""
        return (await engine.collective_rpc("hpredit_stats"))[0]


def _name(body: dict[str, Any]) -> str:
    try:
        return check_editor_name(body.get("editor_name"))
    except HpreditError as e:
        raise Problem(400, f"'editor_name': {e}") from None


def json_body(data: Any) -> bytes:
    return json.dumps(data).encode()
