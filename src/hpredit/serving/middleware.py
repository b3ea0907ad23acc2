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

Like :class:`~hpredit.serving.plugin.RequestParams`, the class vLLM loads is named after the
server's editors and their curves (``RequestCheck_<hex>``), so that loading it by name carries them.
Pure Python (json, Starlette's types): no engine import.
"""

from __future__ import annotations

import json
from typing import Any

from .params import spec_hex, specialised, specialised_by_name, validate_extra_args

__all__ = ["RequestCheck", "middleware_name", "problem", "request_check_class"]

_PREFIX = "RequestCheck_"
#: the body key that carries hpredit's request arguments (OpenAI API: completions, chat, responses)
XARGS = "vllm_xargs"


def problem(body: bytes, editors: tuple[str, ...] | None, max_kl: tuple[float | None, ...] | None) -> str | None:
    """What is wrong with the hpredit arguments in a request body, or None (also for a body that is not
    JSON or has no ``vllm_xargs`` object: vLLM judges those)."""
    if XARGS.encode() not in body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError), or nested too deep
        return None
    xargs = data.get(XARGS) if isinstance(data, dict) else None
    if not isinstance(xargs, dict):
        return None
    try:
        validate_extra_args(xargs, editors, max_kl)
    except ValueError as e:
        return str(e)
    return None


def _error_body(message: str) -> bytes:
    """vLLM's (and OpenAI's) error shape, so that clients raise their BadRequestError with the message."""
    error = {"message": message, "type": "BadRequestError", "param": XARGS, "code": 400}
    return json.dumps({"error": error}).encode()


class RequestCheck:
    """ASGI middleware: a POST whose JSON ``vllm_xargs`` hpredit cannot apply gets HTTP 400."""

    editor_names: tuple[str, ...] | None = None
    max_kl: tuple[float | None, ...] | None = None

    def __init__(self, app: Any) -> None:
        self.app = app

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

                path = scope["path"].removeprefix(scope.get("root_path", ""))
                return not path.startswith(GUARDED_PREFIX) or bool(verify(Headers(scope=scope)))
            node = getattr(node, "app", None)
            if node is None:
                break
        return True

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
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
        found = problem(b"".join(chunks), self.editor_names, self.max_kl)
        if found is not None and self._authorized(scope):
            body = _error_body(found)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 400, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def middleware_name(editor_names: tuple[str, ...], max_kl: tuple[float | None, ...] | None = None) -> str:
    """The ``--middleware`` value (``module.Class``) of the check for a server with these editors."""
    return f"{__name__}.{_PREFIX}{spec_hex(editor_names, max_kl)}"


def request_check_class(
    editor_names: tuple[str, ...], max_kl: tuple[float | None, ...] | None = None
) -> type[RequestCheck]:
    """:class:`RequestCheck` for a server with these editors (and each one's largest measured KL)."""
    return specialised(RequestCheck, _PREFIX, editor_names, max_kl)


def __getattr__(name: str):
    """``RequestCheck_<hex>``: the class vLLM's ``--middleware`` loads by name."""
    return specialised_by_name(RequestCheck, _PREFIX, name)
