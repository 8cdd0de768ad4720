"""Small working vocabularies for the twins: GPT-2 byte-level BPE (llama 3, qwen, smollm) and
SentencePiece-style (llama) with a family's own special tokens.

BPE: the 256 byte characters first, then word pieces each made by one merge of a shorter piece
and one byte character ("Ġ" + every prefix of the common words, then letter n-grams), so every
merge names two tokens and yields a third; the special tokens come last, as in Llama 3 and Qwen.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterator

from llcuda.gguf.synthetic import _WORDS, _word_pieces
from llcuda.gguf.tokenizer_bpe import bytes_to_unicode

NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6

# family -> (special tokens, bos, eos), special ids at the end of the vocabulary
BPE_SPECIALS = {
    "llama-bpe": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>"],
        "<|begin_of_text|>", "<|eot_id|>",
    ),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|im_end|>"),
    "smollm": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>"),
}  # fmt: skip


def _bpe_pieces() -> Iterator[tuple[str, str]]:
    """(left, right) merges in rank order; left + right is the new token."""
    space = bytes_to_unicode()[ord(" ")]  # "Ġ"
    for w in _WORDS:
        yield space, w[0]
        for k in range(2, len(w) + 1):
            yield space + w[: k - 1], w[k - 1]
            yield w[: k - 1], w[k - 1]
    for n in itertools.count(2):
        for chars in itertools.product(string.ascii_lowercase, repeat=n):
            piece = "".join(chars)
            yield piece[:-1], piece[-1]
            yield space + piece[:-1], piece[-1]


def bpe_vocab(vocab_size: int, family: str) -> tuple[list[str], list[int], list[str], int, int]:
    """(tokens, token types, merges "a b", bos id, eos id) for `tokenizer.ggml.model` gpt2."""
    specials, bos, eos = BPE_SPECIALS[family]
    tokens = list(bytes_to_unicode())
    if vocab_size < len(tokens) + len(specials) + 64:
        raise ValueError(f"vocab_size must be at least {len(tokens) + len(specials) + 64}")
    seen, merges = set(tokens), []
    pieces = _bpe_pieces()
    while len(tokens) < vocab_size - len(specials):
        left, right = next(pieces)
        piece = left + right
        if piece not in seen and left in seen and right in seen:
            seen.add(piece)
            tokens.append(piece)
            merges.append(f"{left} {right}")
    types = [NORMAL] * len(tokens) + [CONTROL] * len(specials)
    tokens += specials
    return tokens, types, merges, tokens.index(bos), tokens.index(eos)


def spm_vocab(vocab_size: int, specials: list[str]) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores, types for `tokenizer.ggml.model` llama: <unk> <s> </s> (ids 0, 1, 2), the
    256 byte tokens, word pieces in merge order, then the chat specials (control)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, CONTROL, CONTROL] + [BYTE] * 256  # <unk> is type 2 (unknown)
    scores = [0.0] * len(tokens)
    n_fixed = len(tokens)
    seen = set(tokens) | set(specials)
    pieces = _word_pieces()
    while len(tokens) < vocab_size - len(specials):
        piece = next(pieces)
        if piece not in seen:
            seen.add(piece)
            scores.append(-float(len(tokens) - n_fixed))
            tokens.append(piece)
            types.append(NORMAL)
    tokens += specials
    types += [CONTROL] * len(specials)
    scores += [0.0] * len(specials)
    return tokens, scores, types
