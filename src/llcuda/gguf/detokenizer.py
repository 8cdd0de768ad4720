"""Streaming detokenization: text for each new token, never a broken UTF-8 character.

A token's bytes may end in the middle of a UTF-8 character (SPM byte tokens such as `<0xF0>`
split emoji and CJK into several tokens; BPE byte characters do the same), so text is released
only once its bytes form whole characters, as llama-server does. Bytes that can never become a
character are released as U+FFFD as soon as that is certain (Python's UTF-8 decoder knows after
at most 4 bytes), so a stream never stalls. Pushing every token of `ids` and then calling
`flush()` yields exactly `tokenizer.decode(ids)`: the same leading-space rule, the same
`clean_spaces` passes (BPE), the same replacement characters.
"""

from __future__ import annotations

import codecs

from llcuda.gguf.tokenizer import Tokenizer
from llcuda.gguf.tokenizer_bpe import apply_clean_spaces

# clean_spaces only looks at a space or apostrophe and up to two characters after it, so a cut
# is safe (cleaning both sides separately equals cleaning the whole) when the 3 bytes before the
# cut hold neither.
_CLEAN_CONTEXT = 3


class IncrementalDetokenizer:
    """Turn a stream of token ids into text, one `push` per token.

    `skip_special=True` (the default) matches `Tokenizer.decode(ids)`: control tokens such as
    `<end_of_turn>` produce no text and a leading BOS is dropped.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._started = False
        self._strip_space = tokenizer.add_space_prefix  # decode() drops one leading space
        self._pending = bytearray()  # raw bytes not yet passed through clean_spaces
        self._tail = b""  # last bytes already cleaned, the context for the next cut
        self._parts: list[str] = []
        self.num_tokens = 0

    @property
    def text(self) -> str:
        """All text released so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        tok = self.tokenizer
        self.num_tokens += 1
        if not self._started:
            self._started = True
            if self.skip_special and tok.add_bos and token_id == tok.bos_id:
                self._strip_space = False  # as decode(): a dropped BOS keeps the next space
                return ""
        piece = tok.token_to_piece(token_id, special=not self.skip_special)
        if self._strip_space:
            self._strip_space = False
            if piece[:1] == b" ":
                piece = piece[1:]
        if not piece:
            return ""
        if not tok.clean_spaces:
            return self._emit(piece, final=False)
        self._pending += piece
        cut = self._safe_cut()
        if cut == 0:
            return ""
        chunk = bytes(self._pending[:cut])
        del self._pending[:cut]
        self._tail = (self._tail + chunk)[-_CLEAN_CONTEXT:]
        return self._emit(apply_clean_spaces(chunk), final=False)

    def flush(self) -> str:
        """Release everything held back (incomplete UTF-8 becomes U+FFFD)."""
        chunk = bytes(self._pending)
        self._pending.clear()
        if chunk:
            self._tail = (self._tail + chunk)[-_CLEAN_CONTEXT:]
            chunk = apply_clean_spaces(chunk)
        return self._emit(chunk, final=True)

    def _safe_cut(self) -> int:
        """Largest prefix of the pending bytes that clean_spaces can process on its own."""
        ctx = self._tail + bytes(self._pending)
        base = len(self._tail)
        for end in range(len(ctx), base, -1):
            window = ctx[max(0, end - _CLEAN_CONTEXT) : end]
            if 0x20 not in window and 0x27 not in window:
                return end - base
        return 0

    def _emit(self, data: bytes, final: bool) -> str:
        out = self._decoder.decode(data, final=final)
        if out:
            self._parts.append(out)
        return out
