"""GPT-2 byte-level BPE ("gpt2") on a hand-made vocabulary; expected ids worked out by hand."""

from __future__ import annotations

import pytest

from llcuda.gguf.tokenizer import Tokenizer
from llcuda.gguf.tokenizer_bpe import BPE_PRE_TOKENIZERS, BpeModel, byte_encode, bytes_to_unicode

NORMAL, CONTROL = 1, 3

TOKENS = [
    "<|endoftext|>", "!", "h", "e", "l", "o", "w", "r", "d", "Ġ",  # 0-9
    "he", "ll", "llo", "hello", "Ġw", "or", "Ġwor", "Ġworld", "ld", "hel",  # 10-19
    "'", "s", "?", "1", "2", "3", "12", "123", "Ã©", "Ċ",  # 20-29
    "<|im_end|>", "Ã", "4", "5", "→",  # 30-34
]  # fmt: skip
TYPES = [CONTROL if t.startswith("<|") else NORMAL for t in TOKENS]
MERGES = [
    "h e", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "12 3", "Ã ©",
]  # fmt: skip


def make(pre: str | None = "gpt-2", **overrides) -> dict:
    md = {
        "general.architecture": "gpt2",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.token_type": TYPES,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }
    md.update(overrides)
    return {k: v for k, v in md.items() if v is not None}


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.from_metadata(make("gpt-2"))


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    return Tokenizer.from_metadata(make("llama-bpe"))


@pytest.fixture(scope="module")
def qwen2() -> Tokenizer:
    return Tokenizer.from_metadata(make("qwen2"))


def test_byte_table():
    table = bytes_to_unicode()
    assert len(set(table)) == 256
    assert (table[ord(" ")], table[ord("\n")], table[ord("a")], table[0]) == ("Ġ", "Ċ", "a", "Ā")
    assert byte_encode("é") == "Ã©"


def test_merges_by_rank(gpt2: Tokenizer):
    # hello: h e l l o -> he(r0) l l o -> he ll(r1) o -> he llo(r2) -> hello(r3)
    # Ġworld: Ġw(r4), or(r5), Ġwor(r6), ld(r7), Ġworld(r8)
    assert gpt2.encode("hello world") == [13, 17]
    assert gpt2.encode("hello world!") == [13, 17, 1]
    # equal ranks: leftmost first -> ll l
    assert gpt2.encode("lll") == [11, 4]
    assert gpt2.encode("é") == [28]
    # a symbol with no token falls back to its ASCII bytes; others are dropped (as llama.cpp)
    assert gpt2.encode("hz") == [2]
    assert gpt2.encode("ü") == [31]  # "Ã¼": "Ã" is a token, "¼" is not and is dropped


def test_ignore_merges(gpt2: Tokenizer, llama3: Tokenizer):
    # "hel" is a token but no merge path reaches it: only llama3 (ignore_merges) emits it
    assert gpt2.encode("hel") == [10, 4]
    assert llama3.encode("hel", add_special=False) == [19]


def test_digit_splitting(gpt2: Tokenizer, llama3: Tokenizer, qwen2: Tokenizer):
    # gpt-2: one piece "4123" -> 4 1 2 3 -> 4 12 3 -> 4 123
    assert gpt2.encode("4123") == [32, 27]
    # llama3: \p{N}{1,3} -> "412" "3"; "412" -> 4 12
    assert llama3.encode("4123", add_special=False) == [32, 26, 25]
    # qwen2: single digits
    assert qwen2.encode("4123") == [32, 23, 24, 25]


@pytest.mark.parametrize(
    "pre, text, pieces",
    [
        ("gpt-2", "4123", ["4123"]),
        ("llama3", "4123", ["412", "3"]),
        ("qwen2", "4123", ["4", "1", "2", "3"]),
        ("default", "4123", ["412", "3"]),
        ("gpt-2", "he's  here!!", ["he", "'s", " ", " here", "!!"]),
        ("llama3", "he's  here!!\n", ["he", "'s", " ", " here", "!!\n"]),
        ("llama3", "HE'S x\n\n y", ["HE", "'S", " x", "\n\n", " y"]),
        ("qwen2", "a  b", ["a", " ", " b"]),
        ("default", "x+=1", ["x", "+=", "1"]),
    ],
)
def test_pre_tokenizer_split(pre: str, text: str, pieces: list[str]):
    model = BpeModel(BPE_PRE_TOKENIZERS[pre], {}, {})
    assert model.split(text) == pieces


def test_special_and_flags(gpt2: Tokenizer, llama3: Tokenizer):
    assert gpt2.encode("hello<|im_end|>") == [13, 30]
    assert gpt2.eog_ids == frozenset({0, 30})
    assert not gpt2.add_bos and gpt2.encode("hello") == [13]
    assert llama3.add_bos and llama3.encode("hello") == [0, 13]
    assert not gpt2.add_space_prefix
    # defaults without ids in the file: BOS = EOS = 11
    t = Tokenizer.from_metadata(
        make(**{"tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.eos_token_id": None})
    )
    assert (t.bos_id, t.eos_id) == (11, 11) and 11 in t.eog_ids
    t = Tokenizer.from_metadata(make("llama3", **{"tokenizer.ggml.add_bos_token": False}))
    assert t.encode("hello") == [13]


def test_pieces(gpt2: Tokenizer):
    assert gpt2.token_to_piece(9) == b" "
    assert gpt2.token_to_piece(29) == b"\n"
    assert gpt2.token_to_piece(28) == b"\xc3\xa9"
    assert gpt2.token_to_piece(31) == b"\xc3"  # half a character
    assert gpt2.token_to_piece(0) == b""
    assert gpt2.token_to_piece(0, special=True) == b"<|endoftext|>"
    # a character outside the byte table: llama.cpp's marker text
    assert gpt2.token_to_piece(34) == b"[UNK_BYTE_0xe28692\xe2\x86\x92]"


def test_clean_spaces(gpt2: Tokenizer, qwen2: Tokenizer):
    assert gpt2.clean_spaces and not qwen2.clean_spaces
    assert gpt2.decode([13, 9, 22]) == "hello?"
    assert qwen2.decode([13, 9, 22]) == "hello ?"
    assert gpt2.decode([13, 9, 20, 21]) == "hello's"  # " 's" loses its space
    assert gpt2.decode([13, 9, 20, 9, 13]) == "hello'hello"  # " ' " -> "'"
    assert gpt2.decode([13, 17, 1]) == "hello world!"
    assert gpt2.decode([13, 0, 17], skip_special=False) == "hello<|endoftext|> world"


def test_round_trip(gpt2: Tokenizer, llama3: Tokenizer):
    for text in ["hello world", "hello\nhello", "é é", "12 3"]:
        assert gpt2.decode(gpt2.encode(text)) == text
        assert llama3.decode(llama3.encode(text)) == text


def test_errors():
    with pytest.raises(ValueError, match="'foo'"):
        Tokenizer.from_metadata(make("foo"))
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_metadata(make(**{"tokenizer.ggml.merges": None}))
    # a missing pre-tokenizer name means "default", as in llama.cpp
    t = Tokenizer.from_metadata(make(None))
    assert t.encode("4123") == [32, 26, 25]
