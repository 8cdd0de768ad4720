"""SPM ("llama") tokenizer on a hand-made vocabulary; expected ids worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from llcuda.gguf.tokenizer import TokenAttr, Tokenizer

NORMAL, UNKNOWN, CONTROL, USER, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ids 0-2 specials, 3-258 byte tokens <0x00>..<0xFF> (byte b -> id 3 + b), then the rest.
_BASE = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
_BYTES = [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
_REST = [
    ("▁", -5.0, NORMAL),  # 259
    ("a", -4.0, NORMAL),  # 260
    ("b", -4.0, NORMAL),  # 261
    ("c", -4.0, NORMAL),  # 262
    ("ab", -1.0, NORMAL),  # 263
    ("bc", -1.0, NORMAL),  # 264  (same score as "ab": leftmost wins)
    ("aa", -3.0, NORMAL),  # 265
    ("▁a", -2.0, NORMAL),  # 266
    ("<|ctl|>", 0.0, CONTROL),  # 267
    ("[A]", 0.0, CONTROL),  # 268
    ("A]BB", 0.0, USER),  # 269  (longer: split out before "[A]")
    ("<end_of_turn>", 0.0, NORMAL),  # 270  (made CONTROL and EOG by its text)
    ("<unused0>", 0.0, CONTROL),  # 271
    ("▁▁", -0.5, NORMAL),  # 272
    ("<0xZZ>", 0.0, UNUSED),  # 273
]
VOCAB = _BASE + _BYTES + _REST


def byte(b: int) -> int:
    return 3 + b


def make(**overrides) -> dict:
    md = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [t for t, _, _ in VOCAB],
        "tokenizer.ggml.scores": np.array([s for _, s, _ in VOCAB], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([k for _, _, k in VOCAB], dtype=np.int32),
    }
    md.update(overrides)
    return {k: v for k, v in md.items() if v is not None}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_metadata(make())


def test_defaults(tok: Tokenizer):
    # SPM defaults: BOS 1, EOS 2, add_bos, no add_eos, add_space_prefix
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.add_bos and not tok.add_eos and tok.add_space_prefix
    assert tok.vocab_size == len(VOCAB)
    assert tok.eog_ids == frozenset({2, 270})
    assert tok.is_control(270) and tok.token_attr(270) & TokenAttr.CONTROL
    assert tok.token_attr(271) & TokenAttr.UNUSED  # control named "unused"


def test_highest_score_then_leftmost(tok: Tokenizer):
    e = lambda s: tok.encode(s, add_special=False)  # noqa: E731
    # "▁abc": ▁a(-2) vs ab(-1) vs bc(-1): ab and bc tie, leftmost "ab" merges first
    assert e("abc") == [259, 263, 262]
    # "▁aab": ▁a(-2), aa(-3), ab(-1): ab first -> ▁ a ab -> ▁a ab
    assert e("aab") == [266, 263]
    # "▁bca": bc(-1); "ca" is not a token
    assert e("bca") == [259, 264, 260]


def test_space_prefix_and_escaping(tok: Tokenizer):
    assert tok.encode("a b") == [1, 266, 259, 261]
    # "  a" -> "▁▁▁a": ▁▁(-0.5) leftmost, then ▁a(-2) -> ▁▁ ▁a
    assert tok.encode("  a", add_special=False) == [272, 266]
    no_prefix = Tokenizer.from_metadata(make(**{"tokenizer.ggml.add_space_prefix": False}))
    assert no_prefix.encode("a b") == [1, 260, 259, 261]
    assert tok.encode("") == [1]
    assert tok.encode("", add_special=False) == []


def test_byte_fallback(tok: Tokenizer):
    # é = C3 A9; 🙂 = F0 9F 99 82; "x" is not in the vocabulary either
    assert tok.encode("é", add_special=False) == [259, byte(0xC3), byte(0xA9)]
    assert tok.encode("a🙂x", add_special=False) == [
        266, byte(0xF0), byte(0x9F), byte(0x99), byte(0x82), byte(ord("x"))
    ]  # fmt: skip


def test_special_tokens(tok: Tokenizer):
    # the text after a special token gets the space prefix too
    assert tok.encode("a<|ctl|>a") == [1, 266, 267, 266]
    # not parsed: the control text is ordinary text (bytes), user-defined still splits
    # ("c" is a vocabulary token; the other characters fall back to bytes)
    assert tok.encode("<|ctl|>", add_special=False, parse_special=False) == [
        259, byte(ord("<")), byte(ord("|")), 262, byte(ord("t")), byte(ord("l")),
        byte(ord("|")), byte(ord(">")),
    ]  # fmt: skip
    assert tok.encode("A]BB", add_special=False, parse_special=False) == [269]
    # longest special text first: "A]BB" is split out before "[A]" is looked for
    assert tok.encode("[A]BB", add_special=False) == [259, byte(ord("[")), 269]
    assert tok.encode("[A]", add_special=False) == [268]


def test_bos_eos_flags():
    t = Tokenizer.from_metadata(
        make(**{"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True})
    )
    assert t.encode("a") == [266, 2]
    assert t.encode("a", add_special=False) == [266]
    t = Tokenizer.from_metadata(
        make(**{"tokenizer.ggml.bos_token_id": 260, "tokenizer.ggml.eos_token_id": 261})
    )
    assert (t.bos_id, t.eos_id) == (260, 261) and 261 in t.eog_ids
    # out-of-range metadata ids are ignored (llama.cpp keeps the default)
    t = Tokenizer.from_metadata(make(**{"tokenizer.ggml.bos_token_id": 10**6}))
    assert t.bos_id == 1


def test_metadata_variants():
    # int32 scores, no token types (everything NORMAL), byte strings as tokens
    md = make(
        **{
            "tokenizer.ggml.scores": [int(s) for _, s, _ in VOCAB],
            "tokenizer.ggml.token_type": None,
            "tokenizer.ggml.tokens": [t.encode() for t, _, _ in VOCAB],
        }
    )
    t = Tokenizer.from_metadata(md)
    assert t.encode("ab", add_special=False) == [259, 263]  # ▁a(-2) loses to ab(-1)
    assert not t.is_control(1)
    # with all tokens NORMAL "<|ctl|>" is plain text now, and "<0x41>" renders literally
    assert t.token_to_piece(byte(0x41)) == b"<0x41>"


def test_piece_rules(tok: Tokenizer):
    assert tok.token_to_piece(266) == b" a"
    assert tok.token_to_piece(byte(0xF0)) == b"\xf0"
    assert tok.token_to_piece(1) == b""
    assert tok.token_to_piece(1, special=True) == b"<s>"
    assert tok.token_to_piece(269) == b"A]BB"  # user-defined: literal
    assert tok.token_to_piece(273) == b""  # unused type
    assert tok.token_text(266) == "▁a"
    with pytest.raises(ValueError, match="out of range"):
        tok.token_to_piece(len(VOCAB))


def test_decode_leading_space_rule(tok: Tokenizer):
    # add_space_prefix: the first piece loses one leading space, unless a BOS came first
    assert tok.decode([266, 266]) == "a a"
    assert tok.decode([1, 266, 266]) == " a a"
    assert tok.decode([1, 266, 267, 266], skip_special=False) == "<s> a<|ctl|> a"
    assert tok.decode([272, 260]) == " a"  # only one space is removed
    assert tok.decode([byte(0xC3), byte(0xA9)]) == "é"
    assert tok.decode([byte(0xC3)]) == "\ufffd"
    assert tok.decode([]) == ""


def test_round_trip(tok: Tokenizer):
    for text in ["a b c", "abc aab", "é🙂 x", "a<|ctl|>b", "  lead", "tail  "]:
        ids = tok.encode(text, add_special=False, parse_special=False)
        assert tok.decode(ids) == text


def test_errors():
    with pytest.raises(ValueError, match="'t5'"):
        Tokenizer.from_metadata(make(**{"tokenizer.ggml.model": "t5"}))
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_metadata(make(**{"tokenizer.ggml.model": None}))
    with pytest.raises(ValueError, match="tokenizer.ggml.scores"):
        Tokenizer.from_metadata(make(**{"tokenizer.ggml.scores": [0.0]}))
    t = Tokenizer.from_metadata(make())
    with pytest.raises(TypeError):
        t.encode(b"bytes")  # type: ignore[arg-type]
    # no byte token and no one-character token: llama.cpp fails too
    small = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    md = make(
        **{
            "tokenizer.ggml.tokens": [t for t, _, _ in small],
            "tokenizer.ggml.scores": [s for _, s, _ in small],
            "tokenizer.ggml.token_type": [k for _, _, k in small],
            "tokenizer.ggml.add_space_prefix": False,
        }
    )
    with pytest.raises(ValueError, match="0x7A"):
        Tokenizer.from_metadata(md).encode("z")


def test_phi3_rstrip():
    md = make(**{"general.name": "Phi-3 mini"})
    t = Tokenizer.from_metadata(md)
    # every special token eats the whitespace after it, except <unk>/<s>/<|endoftext|>
    assert t.encode("<|ctl|>  a", add_special=False) == [267, 266]
    assert Tokenizer.from_metadata(make()).encode("<|ctl|>  a", add_special=False) == [
        267, 272, 266
    ]  # fmt: skip


def test_word_pieces_never_split_a_spanning_token():
    """SpmEncoder cuts the text at word starts, except inside an occurrence of a vocab token that
    crosses one ('b▁a' here, score -0.1: it must win over '▁a'), and its ids equal the one-pass
    merge's, cached or not."""
    from llcuda.gguf.tokenizer_spm import SpmEncoder, spm_tokenize

    vocab = VOCAB + [("b▁a", -0.1, NORMAL)]  # id 274
    t = Tokenizer.from_metadata(make(**{
        "tokenizer.ggml.tokens": [s for s, _, _ in vocab],
        "tokenizer.ggml.scores": np.array([s for _, s, _ in vocab], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([k for _, _, k in vocab], dtype=np.int32),
    }))  # fmt: skip
    enc = SpmEncoder(t._token_to_id, t._scores, t._byte_to_token)
    assert enc.pieces("▁ab▁ca▁▁a") == ["▁ab", "▁ca", "▁▁a"]
    assert enc.pieces("▁ab▁a▁c") == ["▁ab▁a", "▁c"]  # 'b▁a' covers the cut before '▁a'
    assert enc.pieces("abc") == ["abc"] and enc.pieces("") == [""]
    for text in ("▁ab▁a▁c", "▁ab▁ca▁▁a", "b▁ab▁a", "▁cb▁a", "▁▁▁", "a▁", "é▁a🙂▁b▁ax"):
        one_pass = spm_tokenize(text, t._token_to_id, t._scores, t._byte_to_token)
        assert enc(text) == one_pass == enc(text), text  # second call: from the cache
    # "▁cb▁a": ▁a merges, then b + ▁a -> b▁a; cut at the word start it would be ▁ c b ▁a
    assert t.encode("cb a", add_special=False) == [259, 262, 274]
