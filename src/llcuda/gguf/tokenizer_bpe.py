"""GPT-2-style byte-level BPE ("gpt2" in `tokenizer.ggml.model`) for one raw-text fragment.

Restates llama.cpp's `llm_tokenizer_bpe` / `llm_tokenizer_bpe_session` (src/llama-vocab.cpp) and
`unicode_regex_split` (src/unicode.cpp):
1. split the text with the pre-tokenizer regexes of `tokenizer.ggml.pre`, applied one after the
   other, each to every piece the previous one produced (unmatched gaps stay pieces of their own);
2. map each piece's UTF-8 bytes to GPT-2's printable byte characters;
3. per piece: with `ignore_merges`, a piece that is a vocab token is emitted whole; otherwise merge
   the adjacent pair with the lowest rank in `tokenizer.ggml.merges` (ties: leftmost) until none
   applies, then emit each symbol's token (an unknown symbol falls back to single-character tokens
   for its ASCII bytes, as llama.cpp does, and is otherwise dropped).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import regex

# Contractions written case-insensitively by hand: llama.cpp's adapted form of `(?i:'s|'t|...)`.
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_STARCODER = (r"\p{N}", _GPT2)


@dataclass(frozen=True)
class BpePre:
    """How one `tokenizer.ggml.pre` value pre-tokenizes, and the flags it sets in llama.cpp."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool | None = None  # None: keep the BPE default (False)
    clean_spaces: bool = True


_LLAMA3_PRE = BpePre((_LLAMA3,), ignore_merges=True, add_bos=True)
_QWEN2_PRE = BpePre((_QWEN2,), clean_spaces=False)
_GPT2_PRE = BpePre((_GPT2,))
_STARCODER_PRE = BpePre(_STARCODER)

# `tokenizer.ggml.pre` -> behaviour, for the families llcuda supports (llama-vocab.cpp's load()).
BPE_PRE_TOKENIZERS: dict[str, BpePre] = {
    "default": BpePre(_DEFAULT),
    "llama3": _LLAMA3_PRE,
    "llama-v3": _LLAMA3_PRE,
    "llama-bpe": _LLAMA3_PRE,
    "falcon3": _LLAMA3_PRE,
    "pixtral": _LLAMA3_PRE,
    "qwen2": _QWEN2_PRE,
    "deepseek-r1-qwen": _QWEN2_PRE,
    "stablelm2": BpePre((_QWEN2,)),
    "gpt-2": _GPT2_PRE,
    "phi-2": _GPT2_PRE,
    "mpt": BpePre((_GPT2,)),
    "olmo": BpePre((_GPT2,)),
    "starcoder": _STARCODER_PRE,
    "refact": _STARCODER_PRE,
    "smollm": BpePre(_STARCODER, clean_spaces=False),
}


def bpe_pre(name: str) -> BpePre:
    """The pre-tokenizer for `tokenizer.ggml.pre`; an empty name means "default" as in llama.cpp."""
    if name == "":
        return BPE_PRE_TOKENIZERS["default"]
    try:
        return BPE_PRE_TOKENIZERS[name]
    except KeyError:
        known = ", ".join(sorted(BPE_PRE_TOKENIZERS))
        raise ValueError(
            f"unknown BPE pre-tokenizer tokenizer.ggml.pre={name!r} (supported: {known})"
        ) from None


@cache
def bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves,
    the other 68 bytes to U+0100 onwards in byte order (so ' ' -> 'Ġ', '\\n' -> 'Ċ')."""
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table: list[str] = []
    extra = 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return tuple(table)


@cache
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in enumerate(bytes_to_unicode())}


def byte_encode(text: str) -> str:
    """The GPT-2 byte-character form of `text`'s UTF-8 bytes."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8", "surrogatepass"))


def byte_decode(token_text: str) -> bytes:
    """Bytes of a NORMAL BPE token (llama.cpp's `llama_decode_text`): characters outside the
    byte table become `[UNK_BYTE_0x<hex>` + the token text + `]`, as llama.cpp writes them."""
    inverse = unicode_to_bytes()
    out = bytearray()
    for ch in token_text:
        b = inverse.get(ch)
        if b is not None:
            out.append(b)
        else:
            utf8 = ch.encode("utf-8", "surrogatepass")
            out += b"[UNK_BYTE_0x" + utf8.hex().encode() + token_text.encode("utf-8") + b"]"
    return bytes(out)


def parse_merges(merges: Sequence[str]) -> dict[tuple[str, str], int]:
    """`tokenizer.ggml.merges` ("left right" per rank) -> {(left, right): rank}, first wins.

    The split is at the first space after position 0, so a left side may itself be a space;
    a line without one maps to ("", ""), which never matches (both as in llama.cpp)."""
    ranks: dict[tuple[str, str], int] = {}
    for rank, line in enumerate(merges):
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        pos = line.find(" ", 1)
        pair = (line[:pos], line[pos + 1 :]) if pos != -1 else ("", "")
        ranks.setdefault(pair, rank)
    return ranks


class BpeModel:
    """Pre-tokenization plus merges for one vocabulary; `tokenize` handles one raw fragment."""

    def __init__(
        self,
        pre: BpePre,
        token_to_id: Mapping[str, int],
        merge_ranks: Mapping[tuple[str, str], int],
    ) -> None:
        self.pre = pre
        self.token_to_id = token_to_id
        self.merge_ranks = merge_ranks
        self._regexes = [regex.compile(r) for r in pre.regexes]

    def split(self, text: str) -> list[str]:
        """Pre-tokenizer pieces of `text` (before byte encoding)."""
        pieces = [text]
        for rx in self._regexes:
            out: list[str] = []
            for piece in pieces:
                pos = 0
                for m in rx.finditer(piece):
                    s, e = m.span()
                    if s > pos:
                        out.append(piece[pos:s])
                    if e > s:
                        out.append(piece[s:e])
                    pos = e
                if pos < len(piece):
                    out.append(piece[pos:])
            pieces = out
        return pieces

    def tokenize(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in self.split(text):
            self._tokenize_word(byte_encode(piece), out)
        return out

    def _tokenize_word(self, word: str, out: list[int]) -> None:
        get = self.token_to_id.get
        if self.pre.ignore_merges:
            tok = get(word)
            if tok is not None:
                out.append(tok)
                return
        for sym in self._merge(word):
            tok = get(sym)
            if tok is not None:
                out.append(tok)
                continue
            # llama.cpp looks each raw byte of the symbol up as a one-byte string; only ASCII
            # bytes can be vocab strings, the rest are dropped.
            for b in sym.encode("utf-8"):
                if b < 0x80:
                    tok = get(chr(b))
                    if tok is not None:
                        out.append(tok)

    def _merge(self, word: str) -> list[str]:
        syms = list(word)  # one symbol per character; merged-away symbols become ""
        n = len(syms)
        if n < 2:
            return syms
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        ranks = self.merge_ranks
        heap: list[tuple[int, int, int, str]] = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            rank = ranks.get((syms[left], syms[right]))
            if rank is not None:
                heapq.heappush(heap, (rank, left, right, syms[left] + syms[right]))

        for i in range(n - 1):
            add(i, i + 1)
        while heap:
            _, left, right, text = heapq.heappop(heap)
            # Stale when either side changed since the pair was queued.
            if not syms[left] or not syms[right] or syms[left] + syms[right] != text:
                continue
            syms[left] = text
            syms[right] = ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prev[after] = left
            add(prev[left], left)
            add(left, after)
        return [s for s in syms if s]


def apply_clean_spaces(text: bytes) -> bytes:
    """llama.cpp's three `clean_spaces` passes over detokenized bytes, restated literally:
    drop the space before ? ! . , ; turn " ' " into "'"; drop the space before 's 'm 're 've."""
    src = text
    if not src:
        return src
    # Pass 1: " ?", " !", " .", " ," lose their space.
    out = bytearray(src[:1])
    for i in range(1, len(src)):
        x = src[i]
        if src[i - 1] == 0x20 and x in b"?!.,":
            out.pop()
        out.append(x)
    # Pass 2: a single apostrophe between spaces loses both spaces. llama.cpp overwrites the
    # following space with NUL and skips it, so that NUL (not a space) is what the next
    # iteration sees as its left neighbour.
    src = bytearray(out)
    out = bytearray(src[:1])
    i = 1
    while i < len(src):
        x = src[i]
        if x == 0x27 and i + 1 < len(src) and src[i - 1] == 0x20 and src[i + 1] == 0x20:
            out.pop()
            i += 1
            src[i] = 0
        out.append(x)
        i += 1
    # Pass 3: " 's", " 'm", " 're", " 've" lose their space (" 't", " 'd", " 'll" keep it).
    src = out
    out = bytearray(src[:1])
    n = len(src)
    for i in range(1, n):
        x = src[i]
        if src[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = src[i + 1]
            if x1 in b"sm" or (i + 2 < n and (x1, src[i + 2]) in ((0x72, 0x65), (0x76, 0x65))):
                out.pop()
        out.append(x)
    return bytes(out)
