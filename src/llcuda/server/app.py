"""`llcuda serve`: an OpenAI-compatible (and llama-server-compatible) HTTP API over one engine.

    engine = InferenceEngine(); engine.load_model("model.gguf", n_parallel=8)
    make_server(engine, "127.0.0.1", 8080).run()

Every request becomes one `TextStream` of the shared `InferenceEngine`, so HTTP clients, like
`batch_infer` callers, share each forward pass of its continuous-batching loop. The engine thread
hands each request's deltas to a listener (`RequestHandle.listen`) that batches them: one wake-up
of the event loop per engine step carries every request's new tokens (`_Dispatcher`), and each
request's `_Pump` turns them into text pieces there. No thread waits per request: with a thread
per stream, 64 streams fought the engine thread for the GIL and served 4,051 tok/s from an engine
that decodes 15,781 (H100, gemma3 1B twin).

Lifecycle: a client that disconnects mid-stream has its request aborted (its KV blocks are freed
at the engine's next step). SIGTERM aborts what is in flight, so streams end at once with
finish_reason "abort" and `data: [DONE]`, and the process exits 0.

Errors: a bad request is a 4xx JSON body naming the field (schemas.py), a bug of ours a JSON 500
(middleware.py); every finished request is one line of the request log (request_log.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llcuda import openai_format
from llcuda.api import InferenceEngine
from llcuda.logprobs_format import ChunkLogprobs, chat_logprobs, completion_logprobs
from llcuda.server import schemas
from llcuda.server.metrics import ServerMetrics, engine_counters, engine_gauges, vllm_gauges
from llcuda.server.middleware import APIKeyMiddleware, ServerErrorMiddleware
from llcuda.server.request_log import RequestLogMiddleware, log_to_stderr, logger, record_of
from llcuda.server.schemas import APIError, GenerateRequest, bad
from llcuda.streams import TextStream

_END = object()


class _Dispatcher:
    """Carries deltas from the engine thread to the event loop, one wake-up per batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[_Pump, object]] = []

    def post(self, pump: _Pump, item: object) -> None:
        """Engine thread: queue `item` for `pump`; the first of a batch schedules the flush."""
        with self._lock:
            first = not self._items
            self._items.append((pump, item))
        if first:
            try:
                self._loop.call_soon_threadsafe(self._flush)
            except RuntimeError:
                pass  # the event loop is closed: nobody is listening any more

    def _flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for pump, item in items:
            pump.take(item)


class _Pump:
    """One request's text pieces on the event loop: `pieces()` yields them as deltas arrive."""

    def __init__(self, stream: TextStream, loop: asyncio.AbstractEventLoop,
                 dispatcher: _Dispatcher) -> None:  # fmt: skip
        self.stream = stream
        self._handle = stream._handle  # kept to abort after the stream let go of it
        self._queue: asyncio.Queue = asyncio.Queue()
        self.done: asyncio.Future = loop.create_future()  # set once stream.result exists
        self._handle.listen(lambda item: dispatcher.post(self, item))

    def take(self, item: object) -> None:
        """Event loop: one delta (or the engine's failure) of this request."""
        if self.done.done():
            return
        if isinstance(item, BaseException):  # an engine step failed: the result records it
            self.stream.end(error=item if isinstance(item, Exception) else RuntimeError(item))
            self._queue.put_nowait(item)
        else:
            piece = self.stream.feed(item)
            if piece:
                self._queue.put_nowait(piece)
            if not item.finished:
                return
            self.stream.end()
        self._queue.put_nowait(_END)
        self.done.set_result(None)

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces as they come; pieces that queued up while the event loop was busy come
        joined as one, so a loaded server sends fewer, larger events instead of falling behind."""
        pending = None
        while True:
            item = pending if pending is not None else await self._queue.get()
            pending = None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise APIError(500, f"generation failed: {item}", "server_error")
            while not self._queue.empty():
                more = self._queue.get_nowait()
                if not isinstance(more, str):
                    pending = more
                    break
                item += more
            yield item

    def abort(self) -> None:
        """Cancel the request (a no-op once it finished); its stream ends with 'abort'."""
        if self._handle is not None:
            self._handle.abort()


class ServerState:
    """What the routes share: the engine, metrics, requests in flight, the shutdown flag."""

    def __init__(self, engine: InferenceEngine, api_key: str | None, model_name: str | None):
        info = engine.model_info()
        self.engine = engine
        # the engine's internals, for /metrics gauges and EOS-vs-stop-word only; never stepped
        # here. A ReplicaSet (server/replicas.py) has one per replica.
        self.llm_engines = getattr(engine, "llm_engines", None) or [engine._loaded.llm_engine]
        self.llm_engine = self.llm_engines[0]
        self.ctx_size: int = info["ctx_size"]
        self.vocab_size: int = info["vocab_size"]
        self.model_name = model_name or os.path.basename(info["path"] or "model")
        self.api_key = api_key
        self.metrics = ServerMetrics()
        self.dispatcher: _Dispatcher | None = None
        self.active: set[_Pump] = set()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, stream: TextStream, endpoint: str) -> _Pump:
        assert self.loop is not None and self.dispatcher is not None
        pump = _Pump(stream, self.loop, self.dispatcher)
        self.active.add(pump)

        def finished(_: object) -> None:
            self.active.discard(pump)
            r = stream.result
            if r is not None:
                self.metrics.observe_request(
                    endpoint, r.finish_reason, r.prompt_tokens, r.tokens_generated,
                    r.ttft_ms / 1000.0 if r.tokens_generated else None, r.latency_ms / 1000.0,
                )  # fmt: skip

        pump.done.add_done_callback(finished)
        return pump

    def begin_shutdown(self) -> None:
        """Refuse new work and abort what runs (thread-safe: called from a signal handler)."""
        self.stopping = True
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._abort_all)

    def _abort_all(self) -> None:
        for pump in list(self.active):
            pump.abort()


def create_app(engine: InferenceEngine, api_key: str | None = None,
               model_name: str | None = None) -> FastAPI:  # fmt: skip
    """The ASGI app over a loaded `engine` (which stays the caller's to unload), or over a
    ReplicaSet of engines (server/replicas.py)."""
    state = ServerState(engine, api_key, model_name)

    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        state.dispatcher = _Dispatcher(state.loop)
        yield
        state.begin_shutdown()

    app = FastAPI(title="llcuda", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.llcuda = state
    app.add_middleware(ServerErrorMiddleware, metrics=state.metrics)  # innermost
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, metrics=state.metrics)
    app.add_middleware(RequestLogMiddleware)  # outermost: 401s are logged too

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        # label by route, not raw path: random 404 paths must not grow the series without end
        route = request.scope.get("route")
        state.metrics.observe_error(getattr(route, "path", "unmatched"), exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return await api_error(request, APIError(exc.status_code, message, kind))

    async def body_of(request: Request) -> dict:
        if state.stopping:
            raise APIError(503, "the server is shutting down", "unavailable_error")
        return schemas.parse_json_body(await request.body())

    async def grammar_ready(req: GenerateRequest) -> None:
        """The first constrained request builds the vocabulary's grammar tables (~2 s for 262k
        tokens): on a worker thread, not the event loop every stream shares (the engine checks
        a grammar where it is submitted). Every replica's, as the request may go to any; later
        requests find them built and skip the thread hop."""
        if "structured" in req.sampling or req.tools is not None:
            for llm_engine in state.llm_engines:
                if llm_engine._grammar_compiler is None:
                    await asyncio.to_thread(llm_engine._compiler)

    def submit(req: GenerateRequest, endpoint: str, request: Request) -> _Pump:
        try:
            if req.messages is not None:
                stream = engine.chat_stream(req.messages, **req.sampling)
            else:
                stream = engine.infer_stream(req.prompt, **req.sampling)
        except ValueError as exc:  # prompt over ctx_size, bad messages, bad sampling values
            raise bad(str(exc), _engine_param(str(exc), req)) from None
        pump = state.start(stream, endpoint)
        record = record_of(request.scope)
        if record is not None:
            record.stream, record.done = stream, pump.done
        return pump

    # --- OpenAI ---------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = schemas.parse_completion(await body_of(request), state.ctx_size)
        await grammar_ready(req)
        pump = submit(req, "completions", request)
        prefix = req.prompt if req.echo else ""
        fmt = _OpenAIFormat("text_completion", state.model_name, req.return_tokens)
        if req.stream:
            return _sse(pump, fmt.stream_completion(pump, prefix, req.include_usage))
        text = prefix + await _collect(pump, request)
        return fmt.completion(pump.stream, text)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = schemas.parse_chat(await body_of(request), state.ctx_size)
        await grammar_ready(req)
        pump = submit(req, "chat", request)
        fmt = _OpenAIFormat("chat.completion", state.model_name, req.return_tokens)
        fmt.tool_stream = engine._tool_call_stream(req.tools)
        if req.stream:
            return _sse(pump, fmt.stream_chat(pump, req.include_usage))
        text = await _collect(pump, request)
        return fmt.chat(pump.stream, text)

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> dict:
        info = engine.model_info()
        keys = ("architecture", "parameters", "file_size", "vocab_size", "context_length",
                "ctx_size", "n_parallel", "device")  # fmt: skip
        meta = {k: info[k] for k in keys}
        card = {"id": state.model_name, "object": "model", "created": int(time.time()),
                "owned_by": "llcuda", "meta": meta}  # fmt: skip
        return {"object": "list", "data": [card]}

    # --- operations -----------------------------------------------------------------------------

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> JSONResponse:
        if state.stopping or not engine.is_loaded:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        gauges = engine_gauges(state.llm_engines, lambda: len(state.active))
        text = state.metrics.render(gauges, engine_counters(state.llm_engines))
        text += vllm_gauges(state.llm_engines, state.model_name)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # --- llama-server -----------------------------------------------------------------------------

    @app.post("/completion")
    async def llama_completion(request: Request):
        req = schemas.parse_llama_completion(await body_of(request), state.ctx_size)
        await grammar_ready(req)
        pump = submit(req, "completion", request)
        final = _LlamaFormat(state, req)
        if req.stream:
            return _sse(pump, final.stream(pump), done_marker=False)
        text = await _collect(pump, request)
        return {"content": text, "index": 0, **final.summary(pump.stream),
                **final.probabilities(pump.stream)}  # fmt: skip

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        content, add_special, parse_special = schemas.parse_tokenize(await body_of(request))
        return {"tokens": engine.tokenize(content, add_special, parse_special)}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        tokens = schemas.parse_detokenize(await body_of(request), state.vocab_size)
        return {"content": engine.detokenize(tokens)}

    return app


def _engine_param(message: str, req: GenerateRequest) -> str | None:
    """The field an engine ValueError is about: its messages start with the argument's name
    ("messages[0] must be ...", "prompt is 300 tokens ..."); a chat template that fails on
    the messages names none."""
    head = re.match(r"[a-z_]+", message)
    name = head.group(0) if head else ""
    if name in ("prompt", "messages") or name in req.sampling:
        return name
    return "messages" if req.messages is not None else None


# --- response bodies ------------------------------------------------------------------------------


async def _collect(pump: _Pump, request: Request) -> str:
    """The whole text of a non-streamed request; a client that goes away meanwhile aborts it."""

    async def watch() -> None:
        # the body is read, so the next ASGI message is http.disconnect: the client left (or,
        # after we answer, the response went out; the watcher is cancelled before that)
        while (await request.receive())["type"] != "http.disconnect":
            pass
        pump.abort()

    watcher = asyncio.create_task(watch())
    try:
        return "".join([piece async for piece in pump.pieces()])
    finally:
        watcher.cancel()


def _sse(pump: _Pump, events: AsyncIterator[dict | str],
         done_marker: bool = True) -> StreamingResponse:  # fmt: skip
    """Server-sent events; a client that goes away aborts the request (the finally below)."""

    async def body() -> AsyncIterator[str]:
        try:
            try:
                async for event in events:  # dicts, or events already encoded (_PieceEvent)
                    yield event if isinstance(event, str) else _sse_event(event)
            except APIError as exc:  # headers are sent: report the failure in the stream
                yield _sse_event(exc.body())
            except Exception as exc:  # a bug of ours: still an error event, not a dropped stream
                logger.exception("stream failed")
                error = APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                 "server_error")  # fmt: skip
                yield _sse_event(error.body())
            if done_marker:
                yield "data: [DONE]\n\n"
        finally:
            pump.abort()  # disconnect (cancellation) or normal end: a no-op once finished

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _timings(stream: TextStream) -> dict:
    """llama-server's `timings` (cache_n: prompt tokens served by the prefix cache)."""
    r = stream.result
    assert r is not None
    return {
        "cache_n": r.cached_tokens, "prompt_n": r.prompt_tokens, "prompt_ms": r.ttft_ms,
        "predicted_n": r.tokens_generated, "predicted_ms": max(r.latency_ms - r.ttft_ms, 0.0),
        "predicted_per_second": r.tokens_per_sec,
    }  # fmt: skip


def _usage(stream: TextStream) -> dict:
    assert stream.result is not None
    return openai_format.usage(stream.result)


class _PieceEvent:
    """The SSE event of one text piece, from a chunk encoded once per stream: the piece is the
    only part that changes, so each event costs one json.dumps of a string (the same bytes as
    encoding the whole chunk)."""

    SLOT = "\x00piece\x00"

    def __init__(self, chunk: dict) -> None:
        head, tail = _sse_event(chunk).split(json.dumps(self.SLOT))
        self._head, self._tail = head, tail

    def __call__(self, piece: str) -> str:
        return self._head + json.dumps(piece, ensure_ascii=False) + self._tail


def _sse_event(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


class _OpenAIFormat:
    """text_completion / chat.completion bodies and their stream chunks (one id per request).

    The body, or a stream's finish_reason chunk, carries llama-server's `timings` too, and with
    return_tokens (llama-server's /completion flag, an extension here) the generated ids as a
    top-level `tokens`.
    """

    def __init__(self, kind: str, model: str, return_tokens: bool = False) -> None:
        prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
        self.tool_stream: Any = None  # a chat with tools: its ToolCallStream
        self.kind = kind
        self.return_tokens = return_tokens
        self.header = {"id": f"{prefix}-{os.urandom(12).hex()}", "created": int(time.time()),
                       "model": model}  # fmt: skip

    def completion(self, stream: TextStream, text: str) -> dict:
        logprobs = stream.result.logprobs
        logprobs = None if logprobs is None else completion_logprobs(logprobs)
        choice = {"text": text, "index": 0, "logprobs": logprobs,
                  "finish_reason": stream.result.finish_reason}  # fmt: skip
        return {**self.header, "object": "text_completion", "choices": [choice],
                "usage": _usage(stream), **self._extras(stream)}  # fmt: skip

    def chat(self, stream: TextStream, text: str) -> dict:
        message, finish_reason = openai_format.chat_message(
            text, stream.result.finish_reason, self.tool_stream
        )
        logprobs = stream.result.logprobs
        logprobs = None if logprobs is None else chat_logprobs(logprobs)
        choice = {"index": 0, "message": message, "logprobs": logprobs,
                  "finish_reason": finish_reason}  # fmt: skip
        return {**self.header, "object": "chat.completion", "choices": [choice],
                "usage": _usage(stream), **self._extras(stream)}  # fmt: skip

    def _extras(self, stream: TextStream) -> dict:
        tokens = {"tokens": list(stream.result.token_ids)} if self.return_tokens else {}
        return {"timings": _timings(stream), **tokens}

    def _chunk(self, obj: str, choice: dict, finish_reason: str | None) -> dict:
        choice = {"index": 0, **choice, "logprobs": None, "finish_reason": finish_reason}
        return {**self.header, "object": obj, "choices": [choice]}

    async def stream_completion(self, pump: _Pump, prefix: str, include_usage: bool):
        obj = "text_completion"
        if prefix:
            yield self._chunk(obj, {"text": prefix}, None)
        event = _PieceEvent(self._chunk(obj, {"text": _PieceEvent.SLOT}, None))
        logprobs = ChunkLogprobs.of(pump.stream, "completion")
        async for piece in pump.pieces():
            if logprobs is None:
                yield event(piece)
            else:
                yield logprobs.added(self._chunk(obj, {"text": piece}, None))
        end = self._chunk(obj, {"text": ""}, pump.stream.result.finish_reason)
        if logprobs is not None:
            end = logprobs.added(end)
        yield {**end, **self._extras(pump.stream)}
        if include_usage:
            yield {**self.header, "object": obj, "choices": [], "usage": _usage(pump.stream)}

    async def stream_chat(self, pump: _Pump, include_usage: bool):
        obj = "chat.completion.chunk"
        yield self._chunk(obj, {"delta": {"role": "assistant", "content": ""}}, None)
        event = _PieceEvent(self._chunk(obj, {"delta": {"content": _PieceEvent.SLOT}}, None))
        logprobs = ChunkLogprobs.of(pump.stream, "chat")
        tools = self.tool_stream
        async for piece in pump.pieces():
            if tools is not None:
                piece = tools.feed(piece)  # what may be a tool call is held back
            if not piece:
                continue  # held tokens' log-probs go with the next chunk that is sent
            if logprobs is None:
                yield event(piece)
            else:
                yield logprobs.added(self._chunk(obj, {"delta": {"content": piece}}, None))
        finish_reason = pump.stream.result.finish_reason
        if tools is not None:
            content, calls = tools.finish()
            if content:
                yield event(content)
            if calls:
                deltas = openai_format.tool_call_deltas(calls)
                yield self._chunk(obj, {"delta": {"tool_calls": deltas}}, None)
                finish_reason = "tool_calls"
        end = self._chunk(obj, {"delta": {}}, finish_reason)
        if logprobs is not None:
            end = logprobs.added(end)
        yield {**end, **self._extras(pump.stream)}
        if include_usage:
            yield {**self.header, "object": obj, "choices": [], "usage": _usage(pump.stream)}


class _LlamaFormat:
    """llama-server's /completion fields: stop_type, token counts, timings."""

    def __init__(self, state: ServerState, req: GenerateRequest) -> None:
        self.model = state.model_name
        self.eog_ids = state.llm_engine.eog_ids
        self.stops = req.sampling["stop"]
        self.return_tokens = req.return_tokens

    def summary(self, stream: TextStream) -> dict:
        r = stream.result
        assert r is not None
        if r.finish_reason == "length":
            stop_type = "limit"
        elif r.finish_reason == "stop":
            stop_type = "eos" if r.token_ids and r.token_ids[-1] in self.eog_ids else "word"
        else:
            stop_type = "none"
        return {
            "stop": True, "model": self.model, "stop_type": stop_type,
            "tokens_predicted": r.tokens_generated, "tokens_evaluated": r.prompt_tokens,
            "timings": _timings(stream),
            # all of them, also at the end of a stream (llama-server sends them chunk by chunk)
            **({"tokens": list(r.token_ids)} if self.return_tokens else {}),
        }  # fmt: skip

    async def stream(self, pump: _Pump):
        event = _PieceEvent({"content": _PieceEvent.SLOT, "stop": False, "index": 0})
        probs = ChunkLogprobs.of(pump.stream, "llama")
        async for piece in pump.pieces():
            if probs is None:
                yield event(piece)
            else:
                yield probs.added({"content": piece, "stop": False, "index": 0})
        end = {"content": "", "index": 0, **self.summary(pump.stream)}
        yield end if probs is None else probs.added(end)

    @staticmethod
    def probabilities(stream: TextStream) -> dict:
        """A whole answer's `completion_probabilities` (with n_probs), else nothing."""
        entries = stream.result.logprobs
        return {} if entries is None else {"completion_probabilities": entries}


# --- running it -----------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn.Server whose exit signal first aborts the requests in flight."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def make_server(engine: InferenceEngine, host: str = "127.0.0.1", port: int = 8080,
                api_key: str | None = None, model_name: str | None = None,
                log_level: str = "info") -> uvicorn.Server:  # fmt: skip
    """A uvicorn server over `engine`: `.run()` blocks until SIGINT/SIGTERM or `.should_exit`."""
    app = create_app(engine, api_key=api_key, model_name=model_name)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on",
        timeout_graceful_shutdown=10,  # a backstop: aborted streams end within a step
        access_log=False,  # the request log (request_log.py) says more, once per request
    )  # fmt: skip
    return _Server(config, on_exit=app.state.llcuda.begin_shutdown)


def serve(engine: InferenceEngine, host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, model_name: str | None = None) -> int:  # fmt: skip
    """Run until SIGTERM/SIGINT; 0 after a clean shutdown."""
    server = make_server(engine, host, port, api_key, model_name)
    log_to_stderr()
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the caught signal under the previous handler once it has shut down;
        # SIGTERM's default handler would kill us (exit -15) after a clean shutdown
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return 0
