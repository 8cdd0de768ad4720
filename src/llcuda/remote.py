"""`InferenceEngine(server_url=...)`: the same calls, answered by a running `llcuda serve`.

    with InferenceEngine(server_url="http://127.0.0.1:8080", api_key="KEY") as engine:
        print(engine.infer("Explain KV caches", max_tokens=64).text)

Generation always streams (server-sent events), as it does in the local engine, where `infer` is
`infer_stream(...).consume()`: latency and time to first token are measured on this side, from
the moment the request is sent to its last / first piece of text, and recorded in the engine's
`MetricsCollector` exactly as local requests are. Token counts, token ids and the finish reason
come from the server's answer:

- prompts go to llama-server's `POST /completion` with `return_tokens` (the generated ids,
  `stop_type`, `tokens_predicted`, `tokens_evaluated`);
- conversations go to `POST /v1/chat/completions` with `stream_options.include_usage` (token
  counts) and `return_tokens` (an llcuda extension: llama-server ignores it, and there
  `InferResult.token_ids` stays empty for chat);
- logprobs=N asks /completion for `n_probs` (its entries are InferResult.logprobs' shape) and
  chat for `logprobs` + `top_logprobs` (OpenAI's entries: no token ids).

The HTTP client is the standard library's urllib: no dependency, one connection per request, so
the threads of `batch_infer` run side by side and the server batches them. A request the server
refuses (4xx) or that cannot be sent counts as failed in `get_metrics()`; a ValueError raised
before sending counts nothing, as locally.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from llcuda.metrics import MetricsCollector
from llcuda.sampling_params import SamplingParams
from llcuda.streams import InferResult, ResultStream

UNTIL_FULL = 2**31 - 1  # max_tokens meaning "until EOS or the context is full" (server ctx unknown)
MAX_BATCH_THREADS = 64  # batch_infer's concurrent requests; the server queues beyond n_parallel

# llama-server's /completion stop_type -> the engine's finish_reason
_STOP_TYPES = {"limit": "length", "eos": "stop", "word": "stop", "none": "abort"}


class ServerError(RuntimeError):
    """The server answered with an error status, or reported an error in its stream."""

    def __init__(self, url: str, status: int | None, message: str,
                 type_: str | None = None, param: str | None = None) -> None:  # fmt: skip
        self.url = url
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        super().__init__(f"{url}: HTTP {status}: {message}" if status else f"{url}: {message}")


class BadRequestError(ServerError, ValueError):
    """A 400/422: the server refused the request's arguments (a ValueError, as locally)."""


class ServerConnectionError(ServerError, ConnectionError):
    """The server could not be reached, or the connection broke mid-answer."""


class RemoteBackend:
    """HTTP calls to one server; thread-safe (one connection per request, no shared state)."""

    def __init__(self, server_url: str, api_key: str | None = None, timeout: float = 600.0):
        if not isinstance(server_url, str) or not server_url.startswith(("http://", "https://")):
            raise ValueError(
                f"server_url must be an http:// or https:// URL such as "
                f"'http://127.0.0.1:8080', got {server_url!r}"
            )
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ValueError(f"api_key must be a non-empty string or None, got {api_key!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        self.url = server_url.rstrip("/")
        self.timeout = float(timeout)
        self.closed = False
        self._headers = {"Content-Type": "application/json", "User-Agent": "llcuda"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._card: dict | None = None  # the model card of GET /v1/models, fetched once

    def close(self) -> None:
        self.closed = True

    # --- generation -----------------------------------------------------------------------------

    def complete(self, prompt: str | list[int], params: SamplingParams,
                 metrics: MetricsCollector) -> RemoteStream:  # fmt: skip
        body = {"prompt": prompt, **self._sampling(params, "n_predict"), "stream": True,
                "return_tokens": True}  # fmt: skip
        if params.logprobs is not None:  # n_probs 0 is llama-server's "none": ask one, drop it
            body["n_probs"] = max(params.logprobs, 1)
        return RemoteStream(self, "/completion", body, metrics, _completion_event,
                            params.logprobs)  # fmt: skip

    def chat(self, messages: list[dict], params: SamplingParams,
             metrics: MetricsCollector) -> RemoteStream:  # fmt: skip
        body = {"messages": messages, **self._sampling(params, "max_tokens"), "stream": True,
                "stream_options": {"include_usage": True}, "return_tokens": True}  # fmt: skip
        if self.model_name():
            body["model"] = self.model_name()  # OpenAI servers other than ours require it
        if params.logprobs is not None:
            body["logprobs"], body["top_logprobs"] = True, params.logprobs
        return RemoteStream(self, "/v1/chat/completions", body, metrics, _chat_event,
                            params.logprobs)  # fmt: skip

    def batch(self, prompts: list[str], params: SamplingParams,
              metrics: MetricsCollector) -> list[InferResult]:  # fmt: skip
        """One request per prompt, sent concurrently; results in prompt order."""
        if not prompts:
            return []

        def one(prompt: str) -> InferResult:
            return self.complete(prompt, dataclasses.replace(params), metrics).consume()

        self.model_card()  # once, before the threads (so they do not all ask for it)
        with ThreadPoolExecutor(min(len(prompts), MAX_BATCH_THREADS)) as pool:
            return list(pool.map(one, prompts))

    def _sampling(self, params: SamplingParams, max_name: str) -> dict:
        """SamplingParams as request fields, llama-server's names (which ours understands)."""
        body: dict[str, Any] = {
            "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
            "min_p": params.min_p, "repeat_penalty": params.repeat_penalty,
            "repeat_last_n": params.repeat_last_n, "stop": params.stop,
            "ignore_eos": params.ignore_eos,
        }  # fmt: skip
        # locally a max_tokens beyond the context runs until it is full; `llcuda serve` refuses
        # one > ctx_size, and absent means exactly that
        ctx = self.ctx_size()
        if params.max_tokens < (ctx if ctx is not None else UNTIL_FULL):
            body[max_name] = params.max_tokens
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    # --- tokens, model --------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        body = {"content": text, "add_special": add_special, "parse_special": parse_special}
        return list(self.request("POST", "/tokenize", body)["tokens"])

    def detokenize(self, ids: list[int]) -> str:
        return self.request("POST", "/detokenize", {"tokens": ids})["content"]

    def model_card(self) -> dict:
        """The first model of GET /v1/models ({} if the server has no such route)."""
        if self._card is None:
            try:
                cards = self.request("GET", "/v1/models").get("data") or [{}]
            except ServerError as exc:
                if exc.status != 404:
                    raise
                cards = [{}]
            self._card = cards[0] if isinstance(cards[0], dict) else {}
        return self._card

    def model_name(self) -> str:
        return str(self.model_card().get("id") or "")

    def ctx_size(self) -> int | None:
        """The server's context size, where it says (llcuda serve does in /v1/models)."""
        ctx = (self.model_card().get("meta") or {}).get("ctx_size")
        return ctx if isinstance(ctx, int) and ctx > 0 else None

    def model_info(self) -> dict:
        card = self.model_card()
        return {"server_url": self.url, "name": card.get("id"), **(card.get("meta") or {})}

    # --- HTTP -----------------------------------------------------------------------------------

    def open(self, method: str, path: str, body: dict | None = None) -> http.client.HTTPResponse:
        """Send a request; the response once its status is 2xx, else a ServerError."""
        if self.closed:
            raise RuntimeError(
                f"the engine's connection to {self.url} is closed (unload_model was called): "
                f"create a new InferenceEngine(server_url=...)"
            )
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=self._headers,
                                     method=method)  # fmt: skip
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                raw = exc.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            finally:
                exc.close()
            raise self._error(path, exc.code, raw) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ServerConnectionError(
                self.url, None, f"cannot reach the server ({method} {path}): {reason}"
            ) from exc

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """A whole JSON answer."""
        with self.open(method, path, body) as response:
            try:
                raw = response.read()
            except (OSError, http.client.HTTPException) as exc:
                msg = f"{path}: reading the answer failed: {exc}"
                raise ServerConnectionError(self.url, None, msg) from exc
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ServerError(self.url, None, f"{path}: not a JSON object: {raw[:200]!r}")
        return answer

    def _error(self, path: str, status: int, raw: bytes) -> ServerError:
        """The server's {"error": {"message", "type", "param"}} (OpenAI, llcuda, llama-server)."""
        try:
            error = json.loads(raw).get("error")
        except (ValueError, AttributeError):
            error = None
        if isinstance(error, dict):
            message = str(error.get("message") or error)
            type_, param = error.get("type"), error.get("param")
        else:
            message = raw.decode("utf-8", errors="replace").strip()[:500] or "(no message)"
            type_ = param = None
        if status == 401:
            message += " (InferenceEngine(server_url=..., api_key=KEY) sends the key)"
        kind = BadRequestError if status in (400, 422) else ServerError
        return kind(self.url + path, status, message, type_, param)


# --- streams ------------------------------------------------------------------------------------


@dataclass
class _Event:
    """What one server-sent event adds to the answer."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens the server's prefix cache held
    logprobs: list[dict] = field(default_factory=list)  # entries of this event's tokens
    last: bool = False  # nothing follows (llama-server's /completion has no [DONE])


def _completion_event(data: dict) -> _Event:
    """POST /completion: {"content", "tokens", "stop"}; the last one adds the summary."""
    event = _Event(text=data.get("content") or "", token_ids=list(data.get("tokens") or []),
                   logprobs=list(data.get("completion_probabilities") or []))  # fmt: skip
    if data.get("stop"):
        event.last = True
        stop_type = data.get("stop_type")
        event.finish_reason = _STOP_TYPES.get(stop_type) or (
            "length" if data.get("stopped_limit") else "stop"  # llama-server before stop_type
        )
        event.prompt_tokens = data.get("tokens_evaluated")
        event.completion_tokens = data.get("tokens_predicted")
        event.cached_tokens = (data.get("timings") or {}).get("cache_n")
    return event


def _chat_event(data: dict) -> _Event:
    """POST /v1/chat/completions chunks: deltas, a finish_reason, then a usage chunk."""
    event = _Event(token_ids=list(data.get("tokens") or []))
    for choice in data.get("choices") or []:
        event.text += (choice.get("delta") or {}).get("content") or ""
        event.logprobs += (choice.get("logprobs") or {}).get("content") or []
        event.finish_reason = choice.get("finish_reason") or event.finish_reason
    usage = data.get("usage") or {}
    event.prompt_tokens = usage.get("prompt_tokens")
    event.completion_tokens = usage.get("completion_tokens")
    # llama-server's timings; OpenAI's usage.prompt_tokens_details
    event.cached_tokens = (data.get("timings") or {}).get("cache_n")
    if event.cached_tokens is None:
        event.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return event


class RemoteStream(ResultStream):
    """Text pieces of one request answered by the server; TextStream's contract.

    When iteration ends, `result` holds the InferResult. `close()` (or dropping the stream
    unfinished) drops the connection, which makes the server abort the request. A broken
    connection or an error event is raised from `next()` after `result` records it with
    success=False. A 4xx or an unreachable server raises from the constructor instead.
    """

    def __init__(self, backend: RemoteBackend, path: str, body: dict,
                 metrics: MetricsCollector, parse: Callable[[dict], _Event],
                 logprobs: int | None = None) -> None:  # fmt: skip
        self.result: InferResult | None = None
        # logprobs=N: the server's entries, each cut to N alternatives (n_probs asks >= 1)
        self._logprobs_k = logprobs
        self._logprob_entries = [] if logprobs is not None else None
        self._url = backend.url + path
        self._metrics = metrics
        self._parse = parse
        self._start = metrics.start()  # latency counts from sending, as locally from submission
        try:
            self._response: Any = backend.open("POST", path, body)
        except BaseException as exc:
            latency = metrics.finish(self._start, prompt_tokens=0, generated_tokens=0,
                                     ttft_ms=None, success=False)  # fmt: skip
            # a finished stream: close() and __del__ have nothing left to do
            self.result = InferResult(success=False, latency_ms=latency,
                                      error_message=f"{type(exc).__name__}: {exc}")  # fmt: skip
            raise
        self._lines = iter(self._response)
        self._ttft_ms = 0.0
        self._pieces: list[str] = []
        self._token_ids: list[int] = []
        self._num_events = 0  # events that carried text: the count when the server gave none
        self._finish_reason: str | None = None
        self._prompt_tokens: int | None = None
        self._completion_tokens: int | None = None
        self._cached_tokens = 0
        self._ended = False

    def __next__(self) -> str:
        while self.result is None:
            try:
                event = None if self._ended else self._next_event()
            except Exception as exc:
                self._close(None, error=exc)
                raise
            if event is None:
                self._close(self._finish_reason)
                break
            if (event.text or event.token_ids) and self._ttft_ms == 0.0:
                self._ttft_ms = (time.perf_counter() - self._start) * 1000.0
            self._token_ids.extend(event.token_ids)
            if self._logprob_entries is not None:
                k = self._logprobs_k
                self._logprob_entries += [{**e, "top_logprobs": e["top_logprobs"][:k]}
                                          for e in event.logprobs]  # fmt: skip
            self._finish_reason = event.finish_reason or self._finish_reason
            if event.prompt_tokens is not None:
                self._prompt_tokens = event.prompt_tokens
            if event.completion_tokens is not None:
                self._completion_tokens = event.completion_tokens
            if event.cached_tokens is not None:
                self._cached_tokens = event.cached_tokens
            self._ended = event.last
            if event.text:
                self._num_events += 1
                self._pieces.append(event.text)
                return event.text
        raise StopIteration

    def _next_event(self) -> _Event | None:
        """The next `data:` payload parsed; None after [DONE] or at the end of the stream."""
        try:
            for raw in self._lines:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                error = data.get("error") if isinstance(data, dict) else None
                if error:
                    message = error.get("message") if isinstance(error, dict) else None
                    status = error.get("code") if isinstance(error, dict) else None
                    raise ServerError(self._url, status if isinstance(status, int) else None,
                                      str(message or error))  # fmt: skip
                return self._parse(data)
        except (OSError, http.client.HTTPException) as exc:
            raise ServerConnectionError(self._url, None, f"the stream broke: {exc}") from exc
        if self._finish_reason is None:
            raise ServerConnectionError(self._url, None, "the stream ended before its answer")
        return None

    def close(self) -> None:
        """Drop the connection if the answer is still coming (the server aborts it)."""
        if self.result is None:
            self._close(self._finish_reason if self._ended else "abort")

    def _close(self, finish_reason: str | None, error: Exception | None = None) -> None:
        if self._response is not None:
            self._response.close()
        self._response = self._lines = None
        n = self._completion_tokens
        if n is None:  # the answer did not say (aborted early, or a server without counts)
            n = len(self._token_ids) or self._num_events
        self._finish(finish_reason, error, n, self._prompt_tokens or 0)
