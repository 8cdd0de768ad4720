"""The server's request log: one line per finished request on the `llcuda.server` logger.

    127.0.0.1 POST /v1/completions 200 prompt_tokens=5 generated_tokens=16 finish_reason=length
    duration_ms=41.3

(one line). `llcuda serve` sends it to stderr (`log_to_stderr`); an application that embeds the
server through `make_server` configures logging itself, and anyone silences the lines with
`logging.getLogger("llcuda.server").setLevel(logging.WARNING)`. Requests that generate nothing
(/health, /tokenize, a 400) carry `-` for the token counts and the finish reason.

A request is finished when its response has gone out and, for a generation, when the engine has
let go of it: a client that disconnects mid-stream is logged once its request is aborted (at the
engine's next step), with finish_reason=abort, so the line tells what the engine really did.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("llcuda.server")
SCOPE_KEY = "llcuda.request"  # the ASGI scope entry that holds a request's RequestRecord


@dataclass
class RequestRecord:
    """What the log line needs beyond the HTTP exchange; a generation route sets `stream` and
    `done` (a future resolved once the engine finished the request)."""

    start: float = field(default_factory=time.perf_counter)
    status: int | None = None
    stream: Any = None  # llcuda.streams.TextStream
    done: Any = None  # asyncio.Future

    def line(self, client: str, method: str, path: str) -> str:
        r = self.stream.result if self.stream is not None else None
        if r is not None:
            tokens = (f"prompt_tokens={r.prompt_tokens} generated_tokens={r.tokens_generated} "
                      f"finish_reason={r.finish_reason or 'error'}")  # fmt: skip
        else:
            tokens = "prompt_tokens=- generated_tokens=- finish_reason=-"
        ms = (time.perf_counter() - self.start) * 1000.0
        return f"{client} {method} {path} {self.status or '-'} {tokens} duration_ms={ms:.1f}"


def record_of(scope: dict) -> RequestRecord | None:
    return scope.get(SCOPE_KEY)


class RequestLogMiddleware:
    """Pure ASGI (streaming and disconnects untouched): notes the status, logs at the end."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord()
        scope[SCOPE_KEY] = record

        async def noting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        except BaseException:
            record.status = record.status or 500  # the error middleware answers 500
            raise
        finally:
            client = scope.get("client")
            args = (f"{client[0]}" if client else "-", scope["method"], scope["path"])
            if record.done is not None and not record.done.done():
                record.done.add_done_callback(lambda _: _log(record, args))
            else:
                _log(record, args)


def _log(record: RequestRecord, args: tuple[str, str, str]) -> None:
    if logger.isEnabledFor(logging.INFO):  # the line is not even built when nobody listens
        logger.info(record.line(*args))


def log_to_stderr() -> None:
    """Send the request log to stderr at INFO, formatted like uvicorn's own lines; once."""
    if logger.handlers:
        return
    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
