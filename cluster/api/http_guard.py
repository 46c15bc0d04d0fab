"""The HTTP front door's gate, before any route runs: API key, body size, content type.

An ASGI middleware, so FastAPI's own routes (`/docs`, `/openapi.json`) and the metrics and
dashboard routes are behind the same key as the OpenAI ones. Liveness and readiness
(`/health`, `/ready`, for probes and load balancers) and the dashboard's static page (its
data is behind the key) stay open. A POST body is read here, up to `max_body_bytes`, and
handed to the route as it came; a larger one gets 413 without being read, which keeps a
huge upload from stalling the front door for everyone. Refusals carry OpenAI's error body.
"""

from __future__ import annotations

import json
from typing import Callable

from cluster.api.access import ApiKeys
from cluster.api.limits import RequestLimits

OPEN_PATHS = frozenset({"/health", "/ready", "/dashboard"})


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class HttpGuard:
    """Wraps an ASGI app; `policy()` gives the current (ApiKeys, RequestLimits)."""

    def __init__(self, app, policy: Callable[[], tuple[ApiKeys, RequestLimits]]):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        keys, limits = self.policy()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["path"] not in OPEN_PATHS and not keys.allows_header(headers.get("authorization")):
            return await _refuse(send, 401, error_body(
                "missing or invalid API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key"),
                [(b"www-authenticate", b"Bearer")])
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            return await _refuse(send, 415, error_body(
                f"Content-Type must be application/json, got {media or 'none'!r}", code="unsupported_media_type"))
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > limits.max_body_bytes:
            return await _refuse(send, 413, _too_large(limits))
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limits.max_body_bytes:
                return await _refuse(send, 413, _too_large(limits))
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()     # after the body: the client's disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.app(scope, replay, send)


def _too_large(limits: RequestLimits) -> dict:
    return error_body(f"request body is larger than {limits.max_body_bytes} bytes", code="request_too_large")


async def _refuse(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
