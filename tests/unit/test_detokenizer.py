"""IncrementalDetokenizer: whole characters only, nothing stalls, same text as decode()."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llcuda.gguf.detokenizer import IncrementalDetokenizer
from llcuda.gguf.reader import GGUFFile
from llcuda.gguf.tokenizer import Tokenizer

# module-scoped tokenizers are shared across examples on purpose
_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def gemma(real_model_path) -> Tokenizer:
    with GGUFFile(real_model_path) as f:
        return Tokenizer.from_metadata(dict(f.metadata))


def byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    return [tok.text_to_token(f"<0x{b:02X}>") for b in data]


def stream(tok: Tokenizer, ids: list[int], skip_special: bool = True) -> list[str]:
    d = IncrementalDetokenizer(tok, skip_special=skip_special)
    outs = [d.push(t) for t in ids]
    outs.append(d.flush())
    assert "".join(outs) == d.text
    return outs


def test_multibyte_split_across_byte_tokens(gemma: Tokenizer):
    assert stream(gemma, byte_ids(gemma, "🙂".encode())) == ["", "", "", "🙂", ""]
    # 日 = E6 97 A5, 本 = E6 9C AC
    assert stream(gemma, byte_ids(gemma, "日本".encode())) == ["", "", "日", "", "", "本", ""]
    hello = gemma.text_to_token("Hello")
    ids = [hello, *byte_ids(gemma, "🚀".encode()), hello]
    assert stream(gemma, ids) == ["Hello", "", "", "", "🚀", "Hello", ""]


def test_invalid_bytes_never_stall(gemma: Tokenizer):
    hello = gemma.text_to_token("Hello")
    # a byte that can never start a character is released at once
    assert stream(gemma, byte_ids(gemma, b"\xff") + [hello]) == ["\ufffd", "Hello", ""]
    # a broken sequence is released as soon as the next byte shows it cannot complete
    assert stream(gemma, byte_ids(gemma, b"\xf0") + [hello]) == ["", "\ufffdHello", ""]
    # lone continuation bytes: one replacement each, immediately
    assert stream(gemma, byte_ids(gemma, b"\x80\x80\x80\x80")) == ["\ufffd"] * 4 + [""]
    # an unfinished character at the end comes out on flush
    assert stream(gemma, byte_ids(gemma, b"\xf0\x9f\x99")) == ["", "", "", "\ufffd"]


def test_control_tokens_and_text(gemma: Tokenizer):
    ids = gemma.encode("<start_of_turn>model\nHi there<end_of_turn>")
    outs = stream(gemma, ids)
    assert "".join(outs) == "model\nHi there"
    assert outs[0] == "" and outs[1] == ""  # <bos>, <start_of_turn>
    assert outs[-2] == ""  # <end_of_turn>
    shown = stream(gemma, ids, skip_special=False)
    assert "".join(shown) == "<bos><start_of_turn>model\nHi there<end_of_turn>"


def _gemma_pool(tok: Tokenizer) -> list[int]:
    words = ["Hello", "▁world", "▁", "▁▁", "日本", "<0xE6>", "<0x97>", "<0xA5>", "<0xF0>"]
    pool = [tok.text_to_token(w) for w in words]
    pool += [1, 2, 3, 105, 106, 107, 108, 212, 6]  # control, unknown, user-defined, unused
    pool += list(range(238, 238 + 256, 7))  # a spread of byte tokens
    return [t for t in pool if t is not None]


@settings(**_SETTINGS, max_examples=300)
@given(data=st.data(), skip=st.booleans())
def test_stream_equals_decode_gemma(gemma: Tokenizer, data, skip: bool):
    ids = data.draw(st.lists(st.sampled_from(_gemma_pool(gemma)), max_size=24))
    assert "".join(stream(gemma, ids, skip)) == gemma.decode(ids, skip_special=skip)


# A small SPM vocabulary with add_space_prefix (the leading-space rule) and byte tokens.
_SPM_TOKENS = ["<unk>", "<s>", "</s>", "▁", "▁a", "b", "▁▁", "<0xC3>", "<0xA9>", "<0xFF>"]
_SPM_TYPES = [2, 3, 3, 1, 1, 1, 1, 6, 6, 6]

# A small BPE vocabulary with clean_spaces (gpt-2): spaces, apostrophes, punctuation.
_BPE_TOKENS = ["<|endoftext|>", "Ġ", "'", "s", "m", "r", "e", "v", "t", "?", "!", ".", ",", "a",
               "Ġ'", "'s", "Ã", "©", "ĠĠ", "Ã©"]  # fmt: skip


@pytest.fixture(scope="module")
def toy_spm() -> Tokenizer:
    return Tokenizer.from_metadata(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": _SPM_TOKENS,
            "tokenizer.ggml.token_type": _SPM_TYPES,
        }
    )


@pytest.fixture(scope="module")
def toy_bpe() -> Tokenizer:
    return Tokenizer.from_metadata(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": _BPE_TOKENS,
            "tokenizer.ggml.token_type": [3] + [1] * (len(_BPE_TOKENS) - 1),
            "tokenizer.ggml.merges": ["Ã ©"],
            "tokenizer.ggml.eos_token_id": 0,
        }
    )


def test_leading_space_rule(toy_spm: Tokenizer):
    assert stream(toy_spm, [4, 4]) == ["a", " a", ""]
    assert stream(toy_spm, [1, 4, 4]) == ["", " a", " a", ""]
    assert stream(toy_spm, [6, 5]) == [" ", "b", ""]


def test_clean_spaces_streaming(toy_bpe: Tokenizer):
    # " ?" must wait: the space is dropped once the "?" arrives
    assert "".join(stream(toy_bpe, [13, 1, 9])) == "a?" == toy_bpe.decode([13, 1, 9])
    outs = stream(toy_bpe, [13, 1, 2, 3])  # "a 's" -> "a's"
    assert "".join(outs) == "a's"
    assert outs[1] == ""  # the space is held until its fate is known


@settings(**_SETTINGS, max_examples=400)
@given(ids=st.lists(st.integers(0, len(_SPM_TOKENS) - 1), max_size=16), skip=st.booleans())
def test_stream_equals_decode_spm(toy_spm: Tokenizer, ids: list[int], skip: bool):
    assert "".join(stream(toy_spm, ids, skip)) == toy_spm.decode(ids, skip_special=skip)


@settings(**_SETTINGS, max_examples=600)
@given(ids=st.lists(st.integers(0, len(_BPE_TOKENS) - 1), max_size=20), skip=st.booleans())
def test_stream_equals_decode_bpe(toy_bpe: Tokenizer, ids: list[int], skip: bool):
    assert "".join(stream(toy_bpe, ids, skip)) == toy_bpe.decode(ids, skip_special=skip)
