"""Our GGUF vocabulary as llguidance sees it: each token's bytes, the EOG tokens, a tokenizer.

Built once per tokenizer (Gemma 3's 262,144 tokens: ~2 s on one core) and kept on it. Control
tokens (<bos>, <end_of_turn>, <|eot_id|>) get llguidance's 0xFF prefix, as its llama.cpp binding
does: they can then never spell grammar text; so do tokens that write nothing (<unused0>), which
a grammar would otherwise allow anywhere, and a model could repeat without end. Every other
token is its text as our detokenizer writes it, user-defined ones (Qwen's <tool_call>) included,
so a grammar literal "<tool_call>" matches the one token or its pieces alike, and the text the
tool-call parser reads.
"""

from __future__ import annotations

import threading
from typing import Any

from llguidance import LLTokenizer, TokenizerWrapper

from llcuda.gguf.tokenizer import TokenAttr

_lock = threading.Lock()


class _GGUFVocab:
    """The duck type llguidance.TokenizerWrapper reads: tokens, eos/bos ids, a tokenize call."""

    def __init__(self, tokenizer: Any, eog_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        pieces = []
        for tid in range(tokenizer.vocab_size):
            piece = tokenizer.token_to_piece(tid, special=True)
            if tokenizer.token_attr(tid) & TokenAttr.CONTROL or not piece:
                # control tokens, and those that write nothing (unused, undefined): never text
                piece = b"\xff" + (piece or tokenizer.token_text(tid).encode("utf-8"))
            pieces.append(piece)
        self.tokens = pieces
        self.eos_token_id = eog_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i, p in enumerate(pieces) if p[:1] == b"\xff"]

    def __call__(self, text: bytes | str) -> list[int]:
        # llguidance tokenizes grammar text to find canonical tokens; the text is plain (no
        # special tokens), possibly cut inside a UTF-8 character
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tokenizer.encode(text, add_special=False, parse_special=False)


def llg_tokenizer(tokenizer: Any, eog_ids: frozenset[int] | set[int]) -> LLTokenizer:
    """The LLTokenizer of `tokenizer` (a llcuda.gguf.tokenizer.Tokenizer), made once and cached
    on it; EOS is allowed wherever the grammar may end, as any of `eog_ids`."""
    with _lock:
        cached = getattr(tokenizer, "_llg_tokenizer", None)
        if cached is not None:
            return cached
        if not eog_ids:
            raise ValueError("structured output needs an end-of-generation token; the "
                             "vocabulary has none")  # fmt: skip
        eog = sorted(eog_ids)
        llg = LLTokenizer(TokenizerWrapper(_GGUFVocab(tokenizer, eog)), eos_token=eog)
        tokenizer._llg_tokenizer = llg
        return llg
