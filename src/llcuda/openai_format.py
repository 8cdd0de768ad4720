"""OpenAI-shaped bodies (text_completion, chat.completion and their stream chunks).

The same shapes llama-cpp-python's `Llama.create_completion` / `create_chat_completion` return,
so code written against it carries over to `InferenceEngine`. `stream` is a TextStream or a
llcuda.remote.RemoteStream (the same contract).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from llcuda.logprobs_format import ChunkLogprobs, chat_logprobs, completion_logprobs
from llcuda.streams import InferResult, TextStream


def usage(result: InferResult) -> dict:
    """OpenAI's `usage`, with `prompt_tokens_details.cached_tokens`: the prompt tokens whose KV
    blocks came from the prefix cache."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.tokens_generated,
        "total_tokens": result.prompt_tokens + result.tokens_generated,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def _header(kind: str, model: str) -> dict:
    prefix = "cmpl" if kind.startswith("text") else "chatcmpl"
    return {
        "id": f"{prefix}-{os.urandom(12).hex()}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
    }


def _finished(stream: TextStream) -> InferResult:
    result = stream.consume()
    if not result.success:
        raise RuntimeError(f"generation failed: {result.error_message}")
    return result


def completion(stream: TextStream, prefix: str, model: str) -> dict:
    result = _finished(stream)
    logprobs = None if result.logprobs is None else completion_logprobs(result.logprobs)
    choice = {"text": prefix + result.text, "index": 0, "logprobs": logprobs,
              "finish_reason": result.finish_reason}  # fmt: skip
    return {**_header("text_completion", model), "choices": [choice],
            "usage": usage(result)}  # fmt: skip


def completion_chunks(stream: TextStream, prefix: str, model: str):
    header = _header("text_completion", model)
    logprobs = ChunkLogprobs.of(stream, "completion")  # None unless asked for

    def chunk(text: str, finish_reason: str | None) -> dict:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        out = {**header, "choices": [choice]}
        return out if logprobs is None else logprobs.added(out)

    def gen() -> Iterator[dict]:
        try:
            if prefix:
                yield chunk(prefix, None)
            for piece in stream:
                yield chunk(piece, None)
            yield chunk("", stream.result.finish_reason)
        finally:
            stream.close()

    return gen()


def chat_completion(stream: TextStream, model: str, tool_stream: Any = None) -> dict:
    """tool_stream: a llcuda.structured ToolCallStream where the request had tools."""
    result = _finished(stream)
    message, finish_reason = chat_message(result.text, result.finish_reason, tool_stream)
    logprobs = None if result.logprobs is None else chat_logprobs(result.logprobs)
    choice = {"index": 0, "message": message, "logprobs": logprobs,
              "finish_reason": finish_reason}  # fmt: skip
    return {**_header("chat.completion", model), "choices": [choice],
            "usage": usage(result)}  # fmt: skip


def chat_chunks(stream: TextStream, model: str, tool_stream: Any = None):
    header = _header("chat.completion.chunk", model)

    logprobs = ChunkLogprobs.of(stream, "chat")  # None unless asked for

    def chunk(delta: dict, finish_reason: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        out = {**header, "choices": [choice]}
        return out if logprobs is None else logprobs.added(out)

    def gen() -> Iterator[dict]:
        try:
            yield chunk({"role": "assistant"}, None)
            for piece in stream:
                if tool_stream is not None:
                    piece = tool_stream.feed(piece)
                if piece:
                    yield chunk({"content": piece}, None)
            finish_reason = stream.result.finish_reason
            if tool_stream is not None:
                content, calls = tool_stream.finish()
                if content:
                    yield chunk({"content": content}, None)
                if calls:
                    yield chunk({"tool_calls": tool_call_deltas(calls)}, None)
                    finish_reason = "tool_calls"
            yield chunk({}, finish_reason)
        finally:
            stream.close()

    return gen()


def chat_message(text: str, finish_reason: str | None, tool_stream: Any = None
                 ) -> tuple[dict, str | None]:  # fmt: skip
    """A whole answer's assistant `message` and finish_reason: with tool_stream (the request's
    ToolCallStream), the tool calls parsed from `text` and finish_reason "tool_calls"."""
    if tool_stream is not None:
        tool_stream.feed(text)
        content, calls = tool_stream.finish()
        if calls:
            message = {"role": "assistant", "content": content or None, "tool_calls": calls}
            return message, "tool_calls"
    return {"role": "assistant", "content": text}, finish_reason


def tool_call_deltas(calls: list[dict]) -> list[dict]:
    """OpenAI's streamed `delta.tool_calls`: each call whole, with its index."""
    return [{"index": i, **call} for i, call in enumerate(calls)]
