"""The server's front door: a request's hpredit arguments checked before vLLM answers.

vLLM validates a request's ``vllm_xargs`` (through the logits processor's ``validate_params``) only
when the request reaches the engine; a streaming request's HTTP 200 has been sent by then, so a bad
argument would come back as an error event inside a 200. :class:`RequestCheck` (an ASGI middleware
that ``hpredit serve`` hands to vLLM's ``--middleware``) reads the JSON body first and answers a bad
argument with HTTP 400 and vLLM's error shape, streaming or not. It sees the JSON as the client sent
it, so ``true`` or ``null`` is refused as what it is (vLLM's schema would turn ``true`` into 1 and
``null`` into a four-entry validation dump). Everything else passes through untouched: a body that
is not JSON, has no ``vllm_xargs`` or has valid ones; vLLM then validates it as usual.

A server with API keys answers a request without a valid key with vLLM's own 401 first: the check
runs only where vLLM's authentication (further in) would let the request through.

It also keeps vLLM's prefix cache exact: cached KV blocks are keyed by token ids, but an edited
token's keys and values depend on the edit. So every generation request gets a ``cache_salt``
derived from its edit (:func:`edit_salt`; vLLM folds the salt into the hash of the first block,
and so of every block after it): requests share cached blocks only when they ask for the same edit
(the same editor, strength or cost, and scope; the server's defaults fill the same gaps for all)
and the same salt of their own, if they give one. A scope that leaves the prompt unedited still
gets a salt: vLLM also caches the blocks of generated tokens, which a later request (the next turn
of a chat) sends back as its prompt.

Like :class:`~hpredit.serving.plugin.RequestParams`, the class vLLM loads is named after the
server's editors and their curves (``RequestCheck_<hex>``), so that loading it by name carries them.
Pure Python (json, Starlette's types): no engine import.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .admin import LIST_PATH, LOAD_PATH, UNLOAD_PATH, Admin, Problem, json_body, metrics_text
from .params import (
    REQUEST_KEYS,
    FrontSpec,
    editor_strengths,
    specialised,
    specialised_by_name,
    validate_extra_args,
)

__all__ = ["RequestCheck", "edit_salt", "middleware_name", "problem", "request_check_class", "salted"]

_PREFIX = "RequestCheck_"
#: the body key that carries hpredit's request arguments (OpenAI API: completions, chat, responses)
XARGS = "vllm_xargs"


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The request body as a JSON object, or None (not JSON, or not an object: vLLM judges those)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError), or nested too deep
        return None
    return data if isinstance(data, dict) else None


def _problem(data: dict[str, Any] | None, editors, max_kl) -> str | None:
    """:func:`problem` of a body already read as a JSON object (None: not one)."""
    xargs = data.get(XARGS) if data is not None else None
    if not isinstance(xargs, dict):
        return None
    try:
        validate_extra_args(xargs, editors, max_kl)
    except ValueError as e:
        return str(e)
    return None


def problem(body: bytes, editors: tuple[str, ...] | None, max_kl: tuple[float | None, ...] | None) -> str | None:
    """What is wrong with the hpredit arguments in a request body, or None (also for a body that is not
    JSON or has no ``vllm_xargs`` object: vLLM judges those)."""
    return _problem(_json_object(body) if XARGS.encode() in body else None, editors, max_kl)


#: the endpoints whose requests generate (and take a ``cache_salt``): OpenAI's completions, chat and
#: responses, Anthropic's messages (the edit in ``vllm_xargs``), and the token-in/token-out endpoint
#: of ``--enable-scale-out`` (the edit in ``sampling_params.extra_args``)
SALTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/inference/v1/generate")
#: what vLLM accepts as a salt (``vllm.entrypoints.generate.base.protocol.validate_cache_salt``)
_SALT_MAX, _SALT_FORBIDDEN = 128, ("@", "/", "\\", "\x00")


def _number(value: Any) -> Any:
    """A JSON number as a float (1 and 1.0 are the same strength); anything else as it is."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def edit_salt(
    xargs: dict[str, Any] | None, own_salt: str | None = None, content: dict[str, str | None] | None = None
) -> str | None:
    """The cache salt of a request asking for the edit ``xargs`` (its valid ``vllm_xargs``), with the
    client's own salt ``own_salt`` and the content ids of the editors it uses (``content``: name → id,
    :func:`~hpredit.serving.params.content_id`) folded in: equal for equal edits by the same editors
    and equal own salts, different otherwise (an editor loaded again under a name with other content
    gets other blocks). None where the edit is the identity (``strength`` 0, or ``editors`` all at 0:
    the unedited model's KV cache) and the client gave no salt."""
    edit = {k: _number(xargs[k]) for k in REQUEST_KEYS if xargs and k in xargs}
    if "editors" in edit:  # {name: strength} or its flat list, in any order; an editor at 0 edits nothing
        chosen = editor_strengths(edit["editors"])
        edit["editors"] = {n: float(v) for n, v in sorted(chosen.items()) if float(v) != 0.0}
        if not edit["editors"]:
            edit = {"strength": 0.0}
    if edit.get("strength") == 0.0:
        edit = {"strength": 0.0}  # strength 0 leaves every token as the unedited model has it
        if own_salt is None:
            return None
    key = json.dumps({"edit": edit, "salt": own_salt, "content": content or {}}, sort_keys=True)
    return "hpredit-" + hashlib.sha256(key.encode()).hexdigest()[:48]


def _valid_salt(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _SALT_MAX and not any(c in value for c in _SALT_FORBIDDEN)


def _edit_args(data: dict[str, Any]) -> dict[str, Any] | None:
    """A request's hpredit arguments: ``vllm_xargs``, or the token-in/token-out ``sampling_params.extra_args``."""
    xargs = data.get(XARGS)
    if xargs is None and isinstance(data.get("sampling_params"), dict):
        xargs = data["sampling_params"].get("extra_args")
    return xargs if isinstance(xargs, dict) else None


def _flat_editors(data: dict[str, Any]) -> bool:
    """``vllm_xargs["editors"]`` given as an object → the flat list ``[name, strength, ...]`` (vLLM's
    request schema takes no nested object there; the engine reads both). Whether it changed."""
    xargs = data.get(XARGS)
    if isinstance(xargs, dict) and isinstance(xargs.get("editors"), dict):
        xargs["editors"] = [x for pair in xargs["editors"].items() for x in pair]
        return True
    return False


def used_editors(xargs: dict[str, Any] | None, spec: FrontSpec | None) -> list[str]:
    """The editors a valid request uses: those of its ``editors``, its ``editor``, or the default."""
    xargs = xargs or {}
    if "editors" in xargs:
        return list(editor_strengths(xargs["editors"]))
    if "editor" in xargs:
        return [xargs["editor"]]
    return [spec.names[0]] if spec is not None and spec.names else []


def salted(data: dict[str, Any], spec: FrontSpec | None = None) -> bytes | None:
    """A valid generation request's body (read as a JSON object; changed here) with the cache salt of its
    edit (:func:`edit_salt`; ``spec``: the server's editors now, whose content ids it folds in) and its
    ``editors`` as vLLM takes them (:func:`_flat_editors`), or None to pass it on as sent: nothing to
    change, or a salt of the client's own that vLLM will refuse."""
    own = data.get("cache_salt")
    if own is not None and not _valid_salt(own):
        return None  # vLLM's own message says what is wrong with it
    xargs = _edit_args(data)
    content = None
    if spec is not None and spec.ids:
        names = used_editors(xargs, spec)
        content = dict(zip(names, spec.content_ids(names)))
    salt = edit_salt(xargs, own, content)
    flattened = _flat_editors(data)
    if salt is None and not flattened:
        return None
    if salt is not None:
        data["cache_salt"] = salt
    return json.dumps(data).encode()


def _path(scope: dict) -> str:
    """The request's path below the server's root path."""
    return scope["path"].removeprefix(scope.get("root_path", ""))


_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError", 500: "InternalServerError"}


def _error_body(message: str, status: int = 400, param: str | None = XARGS) -> bytes:
    """vLLM's (and OpenAI's) error shape, so that clients raise their BadRequestError with the message."""
    error = {"message": message, "type": _ERROR_TYPES.get(status, "BadRequestError"), "param": param, "code": status}
    return json.dumps({"error": error}).encode()


async def _answer(send: Any, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestCheck:
    """ASGI middleware: a POST whose JSON ``vllm_xargs`` hpredit cannot apply gets HTTP 400; the editor
    endpoints (:mod:`~hpredit.serving.admin`) and hpredit's counters on ``/metrics`` are answered here."""

    #: the server's editors as started (set on the class :func:`request_check_class` makes; None: any name)
    spec: FrontSpec | None = None

    def __init__(self, app: Any) -> None:
        self.app = app
        self.admin = Admin(self.spec) if self.spec is not None else None

    def _authorized(self, scope: dict) -> bool:
        """Whether vLLM's authentication middleware (if any, further in) lets this request through."""
        node = self.app
        for _ in range(64):  # the middleware chain, inner by inner
            verify = getattr(node, "verify_token", None)
            guarded = getattr(node, "api_tokens", None) is not None
            if callable(verify) and guarded:
                # optional: vllm (and its starlette); this module is imported without vLLM to name the middleware
                from starlette.datastructures import Headers
                from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX

                return not _path(scope).startswith(GUARDED_PREFIX) or bool(verify(Headers(scope=scope)))
            node = getattr(node, "app", None)
            if node is None:
                break
        return True

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path, method = _path(scope) if scope["type"] == "http" else "", scope.get("method")
        if self.admin is not None and method == "GET" and path in ("/metrics", "/metrics/"):
            await self._metrics(scope, receive, send)
            return
        if self.admin is not None and method == "GET" and path == LIST_PATH and self._authorized(scope):
            await _answer(send, 200, json_body(self.admin.list()))
            return
        if scope["type"] != "http" or method != "POST":
            await self.app(scope, receive, send)
            return
        messages, chunks = [], []
        while True:  # the whole body (the messages are replayed to vLLM unchanged)
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, generates = b"".join(chunks), path in SALTED_PATHS
        if self.admin is not None and path in (LOAD_PATH, UNLOAD_PATH) and self._authorized(scope):
            await self._admin(scope, path, body, send)
            return
        spec = self.spec.current() if self.spec is not None else None
        data = _json_object(body) if generates or XARGS.encode() in body else None  # read once
        found = _problem(data, *((spec.names, spec.max_kl) if spec is not None else (None, None)))
        if found is not None and self._authorized(scope):
            await _answer(send, 400, _error_body(found))
            return
        used: list[str] = []
        if found is None and generates and data is not None and messages[-1]["type"] == "http.request":
            used = used_editors(_edit_args(data), spec) if spec is not None else []
            scope, messages = self._salted(scope, data, messages, spec)

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        if self.admin is None or not used:
            await self.app(scope, replay, send)
            return
        self.admin.in_flight.update(used)  # no await since the check: an unload sees this request
        try:
            await self.app(scope, replay, send)
        finally:
            self.admin.in_flight.subtract(used)

    async def _admin(self, scope: dict, path: str, body: bytes, send: Any) -> None:
        """``POST /v1/load_editor`` or ``/v1/unload_editor``."""
        assert self.admin is not None
        data = _json_object(body)
        try:
            if data is None:
                raise Problem(400, 'the body must be a JSON object, e.g. {"editor_name": "x", "editor_path": "DIR"}')
            engine = scope["app"].state.engine_client
            action = self.admin.load if path == LOAD_PATH else self.admin.unload
            result = await action(data, engine)
        except Problem as p:
            await _answer(send, p.status, _error_body(f"hpredit: {p}", p.status, None))
            return
        await _answer(send, 200, json_body(result))

    async def _metrics(self, scope: dict, receive: Any, send: Any) -> None:
        """vLLM's ``/metrics`` (asked for in the plain text format) with hpredit's counters after it."""
        assert self.admin is not None
        plain = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"accept", b"accept-encoding")]
        sent: list[dict] = []

        async def keep(message: dict) -> None:
            sent.append(message)

        await self.app({**scope, "headers": plain}, receive, keep)
        start = next((m for m in sent if m["type"] == "http.response.start"), None)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        if start is None or start["status"] != 200:
            for m in sent:
                await send(m)
            return
        try:
            body += metrics_text(await self.admin.stats(scope["app"].state.engine_client)).encode()
        except Exception as e:  # noqa: BLE001  vLLM's metrics still answer; say why ours are missing
            body += f"# hpredit counters unavailable: {type(e).__name__}: {e}\n".encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _salted(scope: dict, data: dict[str, Any], messages: list, spec: FrontSpec | None) -> tuple[dict, list]:
        """A generation request with its edit's cache salt: the body (one message) and its length."""
        new = salted(data, spec)
        if new is None:
            return scope, messages
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(new)).encode()))
        return {**scope, "headers": headers}, [{"type": "http.request", "body": new, "more_body": False}]


def middleware_name(spec: FrontSpec) -> str:
    """The ``--middleware`` value (``module.Class``) of the check for a server with these editors."""
    return f"{__name__}.{_PREFIX}{spec.hex()}"


def request_check_class(spec: FrontSpec) -> type[RequestCheck]:
    """:class:`RequestCheck` for a server with these editors."""
    return specialised(RequestCheck, _PREFIX, spec)


def __getattr__(name: str):
    """``RequestCheck_<hex>``: the class vLLM's ``--middleware`` loads by name."""
    return specialised_by_name(RequestCheck, _PREFIX, name)
