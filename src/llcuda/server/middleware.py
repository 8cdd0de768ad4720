"""The app's pure-ASGI middlewares (streaming and disconnects pass through untouched): the API
key check and the JSON 500 for a bug of ours."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

from llcuda.server.metrics import ServerMetrics
from llcuda.server.request_log import logger
from llcuda.server.schemas import APIError

OPEN_PATHS = frozenset({"/health", "/v1/health"})  # reachable without the API key (llama-server)


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` (pure ASGI: streaming and disconnects untouched)."""

    def __init__(self, app: Any, api_key: str, metrics: ServerMetrics) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                what = "missing" if not given else "invalid"
                self.metrics.observe_error(scope["path"], 401)
                error = APIError(401, f"{what} API key: send 'Authorization: Bearer <key>'",
                                 "authentication_error")  # fmt: skip
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ServerErrorMiddleware:
    """A bug of ours (an exception no route turned into an APIError) answered as a JSON 500.
    Caught here rather than left to Starlette's ServerErrorMiddleware, which re-raises it to
    uvicorn, and uvicorn then resets the connection: a keep-alive client lost its next request
    too. Streams report their failures in the stream (`_sse`)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def noting_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        except Exception as exc:
            if started:  # part of the answer is out: nothing sound to add
                raise
            logger.exception("%s %s failed", scope["method"], scope["path"])
            route = scope.get("route")
            self.metrics.observe_error(getattr(route, "path", "unmatched"), 500)
            error = APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
            await JSONResponse(error.body(), status_code=500)(scope, receive, send)
