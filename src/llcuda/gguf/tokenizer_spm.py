"""SentencePiece-style (llama.cpp "SPM") merge tokenizer for one raw-text fragment.

Restates llama.cpp's `llm_tokenizer_spm_session` (src/llama-vocab.cpp): start from one symbol per
Unicode character, repeatedly merge the adjacent pair whose concatenation is a vocab token with
the highest score (ties: leftmost), then emit each final symbol as its token or, failing that, as
byte tokens `<0xNN>` for each of its UTF-8 bytes.

llama.cpp keeps a `rev_merge` map to re-segment symbols that are not tokens; a merged symbol is
always a token (a pair is only queued when its text is one), so only unmerged single characters
ever fall back, and they fall back to bytes. This file implements that outcome directly.

`SpmEncoder` is what the tokenizer calls: the same ids, from word pieces that it tokenizes once
and remembers.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Mapping, Sequence


def spm_tokenize(
    text: str,
    token_to_id: Mapping[str, int],
    scores: Sequence[float],
    byte_to_token: Callable[[int], int],
) -> list[int]:
    """Token ids for `text`, which is already space-escaped (' ' -> '▁') by the caller."""
    n = len(text)
    if n == 0:
        return []
    # Symbols are spans text[start[i] : start[i] + size[i]] in a doubly linked list; a symbol
    # merged into its left neighbour gets size 0. Every symbol starts as one character.
    start = list(range(n))
    size = [1] * n
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1

    # Max-heap on (score, -left) via negation: highest score first, then leftmost.
    heap: list[tuple[float, int, int, int]] = []
    get = token_to_id.get
    for i in range(n - 1):
        tok = get(text[i : i + 2])
        if tok is not None:
            heap.append((-scores[tok], i, i + 1, 2))
    heapq.heapify(heap)

    push = heapq.heappush
    pop = heapq.heappop
    while heap:
        _, left, right, pair_size = pop(heap)
        # A queued pair is stale once either side was merged into something else.
        if size[left] == 0 or size[right] == 0 or size[left] + size[right] != pair_size:
            continue
        size[left] = pair_size
        size[right] = 0
        after = nxt[right]
        nxt[left] = after
        if after >= 0:
            prev[after] = left
        before = prev[left]
        if before >= 0:
            merged = size[before] + pair_size
            tok = get(text[start[before] : start[before] + merged])
            if tok is not None:
                push(heap, (-scores[tok], before, left, merged))
        if after >= 0:
            merged = pair_size + size[after]
            tok = get(text[start[left] : start[left] + merged])
            if tok is not None:
                push(heap, (-scores[tok], left, after, merged))

    out: list[int] = []
    i = 0
    while i != -1:
        piece = text[start[i] : start[i] + size[i]]
        tok = get(piece)
        if tok is not None:
            out.append(tok)
        else:
            # surrogatepass: a lone surrogate in a Python str still has a 3-byte encoding, as
            # llama.cpp would see it in raw bytes.
            out.extend(byte_to_token(b) for b in piece.encode("utf-8", "surrogatepass"))
        i = nxt[i]
    return out


class SpmEncoder:
    """spm_tokenize over independent pieces of the text, each piece's ids memoized.

    A merge joins two adjacent symbols only when their concatenation is a vocab token, so a
    boundary between a non-'▁' character and a '▁' (the start of a word) can only be crossed by
    a token that itself holds such a pair ("spanning" tokens: Gemma 3's 262k vocabulary has one,
    '>▁</'). Cutting the text at every such boundary that no occurrence of a spanning token
    covers gives pieces whose merges never interact, so each piece tokenizes alone to exactly
    the ids it gets in the whole text (ties stay leftmost: order within a piece is kept). Words
    repeat, so most pieces come from the cache: 0.23 against 2.4 ms for a 100-word prompt
    (benchmarks/bench_tokenizer.py), time an HTTP server otherwise spends on its event loop.
    """

    MAX_CACHED = 1 << 16  # entries; the cache is emptied when full
    MAX_PIECE = 64  # characters; longer pieces are tokenized each time

    def __init__(self, token_to_id: Mapping[str, int], scores: Sequence[float],
                 byte_to_token: Callable[[int], int]):
        self._args = (token_to_id, scores, byte_to_token)
        self._spanning = [t for t in token_to_id if "▁" in t[1:] and _SPANS_WORDS.search(t)]
        self._cache: dict[str, list[int]] = {}

    def pieces(self, text: str) -> list[str]:
        """`text` (space-escaped) cut at every word start no spanning token covers."""
        cuts = [m.start() for m in _WORD_START.finditer(text)]
        if not cuts:
            return [text]
        blocked = set()
        for token in self._spanning:
            at = text.find(token)
            while at >= 0:
                blocked.update(range(at + 1, at + len(token)))
                at = text.find(token, at + 1)
        bounds = [0] + [c for c in cuts if c not in blocked] + [len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]

    def __call__(self, text: str) -> list[int]:
        """Token ids for `text`, already space-escaped (' ' -> '▁'): spm_tokenize's ids."""
        out: list[int] = []
        cache = self._cache
        for piece in self.pieces(text):
            ids = cache.get(piece)
            if ids is None:
                ids = spm_tokenize(piece, *self._args)
                if len(piece) <= self.MAX_PIECE:
                    if len(cache) >= self.MAX_CACHED:
                        cache.clear()
                    cache[piece] = ids
            out += ids
        return out


_WORD_START = re.compile(r"(?<=[^▁])▁")  # a '▁' right after another character
_SPANS_WORDS = re.compile(r"[^▁]▁")
