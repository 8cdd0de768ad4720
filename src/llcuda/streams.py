"""One request's stream of text and its result.

`TextStream` turns the `RequestOutput` deltas of an `EngineLoop` request handle into text pieces
and, at the end, an `InferResult` with latency and TTFT measured from submission and the
request's own decode speed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llcuda.metrics import MetricsCollector


@dataclass
class InferResult:
    """One finished request.

    latency_ms runs from submission to the end, ttft_ms from submission to the first token: both
    include any time queued behind other requests. tokens_per_sec is the request's own decode
    speed: the tokens after the first over the time from its first token to its last (llama.cpp's
    "eval" rate; the first token's cost is in ttft_ms), so neither the queue nor the prefill
    counts. 0.0 with fewer than two tokens, or when all of them arrived at once.
    """

    success: bool
    text: str = ""
    tokens_generated: int = 0
    prompt_tokens: int = 0
    latency_ms: float = 0.0
    ttft_ms: float = 0.0  # time to first token; 0.0 when no token was generated
    tokens_per_sec: float = 0.0
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None on error
    error_message: str | None = None
    token_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose KV blocks came from the prefix cache
    # structured output (set by InferenceEngine): the output as JSON where the request asked for
    # JSON and it completed; the tool calls parsed from it where the request had tools
    parsed: Any = None
    tool_calls: list[dict] | None = None
    # with logprobs=N: one entry per generated token, {id, token, bytes, logprob, top_logprobs}
    # (llcuda.logprobs_format); None when the request asked for none
    logprobs: list[dict] | None = None


class ResultStream(Iterator[str]):
    """What a local and a remote stream share: text pieces, then `result`; `consume()`; closing
    (aborting) when dropped unfinished; metrics and InferResult built the same way at the end.

    Subclasses set `result`, `_metrics`, `_start`, `_ttft_ms`, `_pieces`, `_token_ids` and
    `_cached_tokens`, and define `__next__` and `close`.
    """

    result: InferResult | None
    # ms from _start to the last generated token; a subclass that does not track it gets the
    # end of the stream instead (a remote stream: its last event carries the last token)
    _last_token_ms: float = 0.0
    # with logprobs asked for: every token's entry so far (a subclass that reports them fills it)
    _logprob_entries: list[dict] | None = None
    _logprobs_taken = 0  # of those, handed out by take_logprobs

    def take_logprobs(self) -> list[dict]:
        """The log-prob entries of the tokens that arrived since the last call, for a stream
        chunk: right after a piece, those of the tokens that made it (and any whose text is
        held back)."""
        if self._logprob_entries is None:
            return []
        taken = self._logprob_entries[self._logprobs_taken :]
        self._logprobs_taken = len(self._logprob_entries)
        return taken

    def close(self) -> None:
        raise NotImplementedError

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass  # interpreter shutdown: the engine or the connection may already be gone

    def consume(self) -> InferResult:
        """Run to the end and return the result; an error becomes success=False."""
        try:
            for _ in self:
                pass
        except Exception:
            pass
        assert self.result is not None
        return self.result

    def _finish(
        self,
        finish_reason: str | None,
        error: Exception | None,
        generated_tokens: int,
        prompt_tokens: int,
    ) -> None:
        n = generated_tokens
        latency = self._metrics.finish(
            self._start, prompt_tokens=prompt_tokens, generated_tokens=n,
            ttft_ms=self._ttft_ms if n else None, success=error is None,
            cached_tokens=self._cached_tokens,
        )  # fmt: skip
        decode_ms = (self._last_token_ms or latency) - self._ttft_ms
        self.result = InferResult(
            success=error is None, text="".join(self._pieces), tokens_generated=n,
            prompt_tokens=prompt_tokens, latency_ms=latency, ttft_ms=self._ttft_ms,
            tokens_per_sec=(n - 1) / (decode_ms / 1000.0) if n > 1 and decode_ms > 0 else 0.0,
            finish_reason=finish_reason if error is None else None,
            error_message=None if error is None else f"{type(error).__name__}: {error}",
            token_ids=list(self._token_ids), cached_tokens=self._cached_tokens,
            logprobs=None if self._logprob_entries is None else list(self._logprob_entries),
        )  # fmt: skip


class TextStream(ResultStream):
    """Text pieces of one request as the engine produces them.

    When iteration ends, `result` holds the InferResult. Closing the stream early (`close()`,
    or dropping it unfinished) aborts the request. An engine error is raised from `next()`
    after `result` records it with success=False.
    """

    def __init__(self, handle: Any, prompt_tokens: int, metrics: MetricsCollector,
                 logprob_format: Any = None) -> None:  # fmt: skip
        self.result: InferResult | None = None
        self._handle = handle
        self._outputs = iter(handle)
        self._prompt_tokens = prompt_tokens
        self._metrics = metrics
        self._start = metrics.start()  # latency counts from submission, not from first next()
        self._ttft_ms = 0.0
        self._pieces: list[str] = []
        self._token_ids: list[int] = []
        self._finish_reason: str | None = None
        self._engine_finished = False
        self._cached_tokens = 0
        # a request that asked for log-probs: a TokenLogprobFormat turns them into entries
        self._logprob_format = logprob_format
        self._logprob_entries = [] if logprob_format is not None else None

    def __next__(self) -> str:
        while self.result is None:
            if self._engine_finished:
                self._close(self._finish_reason)
                break
            try:
                out = next(self._outputs)
            except StopIteration:
                self._close(self._finish_reason)
                break
            except Exception as exc:
                self._close(None, error=exc)
                raise
            piece = self.feed(out)
            if piece:
                return piece
        raise StopIteration

    def feed(self, out: Any) -> str:
        """Take one RequestOutput delta of this request; returns its new text ('' if none).

        For consumers that receive the deltas themselves (`RequestHandle.listen`, as the HTTP
        server's event loop does) instead of iterating; they call `end()` after the finished one.
        """
        if out.new_token_ids:
            self._last_token_ms = (time.perf_counter() - self._start) * 1000.0
            if not self._token_ids:
                self._ttft_ms = self._last_token_ms
        self._token_ids.extend(out.new_token_ids)
        if self._logprob_entries is not None and out.new_logprobs:
            self._logprob_entries.extend(self._logprob_format.entries(out.new_logprobs))
        self._cached_tokens = max(self._cached_tokens, out.num_cached_tokens)
        if out.finished:
            self._engine_finished = True
            self._finish_reason = out.finish_reason
        if out.new_text:
            self._pieces.append(out.new_text)
        return out.new_text

    def end(self, error: Exception | None = None) -> None:
        """Build `result` after the last fed delta, or record `error` (the engine step failed)."""
        if self.result is None:
            self._close(None if error else self._finish_reason, error=error)

    def close(self) -> None:
        """Abort the request if it is still running; `result` then has finish_reason 'abort'."""
        if self.result is None:
            if not self._engine_finished and self._handle is not None:
                self._handle.abort()
            self._close(self._finish_reason if self._engine_finished else "abort")

    def _close(self, finish_reason: str | None, error: Exception | None = None) -> None:
        # a finished stream lets go of its handle: a stream the caller keeps must not pin the
        # engine (and its GPU memory) after unload_model()
        self._handle = self._outputs = None
        self._finish(finish_reason, error, len(self._token_ids), self._prompt_tokens)
