"""Log-probs as the APIs show them.

One entry per generated token, the Python API's shape and llama-server's (`completion_probabilities`
of /completion, `n_probs`):

    {"id": 9, "token": " the", "bytes": [32, 116, 104, 101], "logprob": -0.12,
     "top_logprobs": [{"id": 9, "token": " the", "bytes": [...], "logprob": -0.12}, ...]}

and from it OpenAI's two shapes: chat's `choices[].logprobs.content` (the same entries without
ids) and the legacy completions' `choices[].logprobs` (parallel lists `tokens`, `token_logprobs`,
`top_logprobs` as {token: logprob} dicts that always hold the sampled token, as OpenAI documents,
and `text_offset`). The numbers are the model's raw distribution (llcuda.runner.logprobs says why).

A token's text is its piece as llama.cpp's `token_to_piece` renders it (control tokens: ''); a
piece that is not whole UTF-8 (a byte-fallback token, part of a character) shows U+FFFD in
`token` and its real bytes in `bytes`. A log-prob that is not finite is reported as OpenAI's
-9999.0 ("very unlikely"): JSON has no -Infinity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # llcuda.runner imports torch; the API's modules import without it
    from llcuda.runner.logprobs import TokenLogprob

# OpenAI's bound on top_logprobs (chat) and logprobs (legacy completions: OpenAI's own model
# takes 5 there, vLLM 20; one bound for both)
OPENAI_MAX_LOGPROBS = 20
UNLIKELY = -9999.0  # OpenAI's value for a token too unlikely to have a finite log-prob


class TokenLogprobFormat:
    """Turns TokenLogprobs (ids) into entries (texts and bytes) with one model's tokenizer.

    One per loaded model: each token's text and bytes are made once (a request with 20
    alternatives formats 21 tokens per generated one, on the server's event loop)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._pieces: dict[int, tuple[str, tuple[int, ...]]] = {}

    def _token(self, token_id: int, logprob: float) -> dict:
        piece = self._pieces.get(token_id)
        if piece is None:
            raw = bytes(self._tokenizer.token_to_piece(token_id))
            piece = self._pieces[token_id] = (raw.decode("utf-8", "replace"), tuple(raw))
        return {
            "id": token_id,
            "token": piece[0],
            "bytes": list(piece[1]),  # a list of its own: callers may change their entries
            "logprob": logprob if math.isfinite(logprob) else UNLIKELY,
        }

    def entry(self, lp: TokenLogprob) -> dict:
        top = [self._token(t, v) for t, v in lp.top]
        return {**self._token(lp.token_id, lp.logprob), "top_logprobs": top}

    def entries(self, lps: Sequence[TokenLogprob]) -> list[dict]:
        return [self.entry(lp) for lp in lps]


def _without_id(token: dict) -> dict:
    return {"token": token["token"], "logprob": token["logprob"], "bytes": token["bytes"]}


def chat_logprobs(entries: Sequence[dict]) -> dict:
    """OpenAI chat's `choices[].logprobs` (also of a stream chunk: its tokens only)."""
    content = [{**_without_id(e), "top_logprobs": [_without_id(t) for t in e["top_logprobs"]]}
               for e in entries]  # fmt: skip
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Sequence[dict], text_offset: int = 0) -> dict:
    """OpenAI's legacy completions `choices[].logprobs`; text_offset: where the first token's
    text starts in the choice's text (a stream chunk: after the text sent before it)."""
    offsets = []
    for e in entries:
        offsets.append(text_offset)
        text_offset += len(e["token"])
    top = []
    for e in entries:
        alternatives = {t["token"]: t["logprob"] for t in e["top_logprobs"]}
        alternatives.setdefault(e["token"], e["logprob"])  # the sampled token is always there
        top.append(alternatives)
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def next_offset(entries: Sequence[dict], text_offset: int) -> int:
    """The text_offset after `entries` (a stream's next chunk starts there)."""
    return text_offset + sum(len(e["token"]) for e in entries)


class ChunkLogprobs:
    """Each stream chunk's log-probs: the entries of the tokens the stream (a TextStream or a
    RemoteStream) delivered since the previous chunk. Taken right after the piece those tokens
    made is handed over (the server's _Pump.pieces: nothing runs in between that could feed the
    stream more), a chunk carries its own tokens'. OpenAI's chat and legacy shapes, or
    llama-server's `completion_probabilities`; a chunk without tokens keeps `logprobs: null`
    (llama-server's: no field)."""

    def __init__(self, stream: Any, shape: str) -> None:
        self.stream = stream
        self.shape = shape
        self.text_offset = 0  # legacy completions: where the next chunk's first token starts

    @classmethod
    def of(cls, stream: Any, shape: str) -> ChunkLogprobs | None:
        """None when the request asked for no log-probs (the pre-encoded fast path)."""
        return None if getattr(stream, "_logprob_entries", None) is None else cls(stream, shape)

    def added(self, chunk: dict) -> dict:
        entries = self.stream.take_logprobs()
        if not entries:
            return chunk
        if self.shape == "llama":
            return {**chunk, "completion_probabilities": entries}
        if self.shape == "chat":
            logprobs = chat_logprobs(entries)
        else:
            logprobs = completion_logprobs(entries, self.text_offset)
            self.text_offset = next_offset(entries, self.text_offset)
        chunk["choices"][0]["logprobs"] = logprobs
        return chunk
