"""The real SmolLM2-135M-Instruct tokenizer (gpt2-style BPE, pre-tokenizer `smollm`) against
llama.cpp's golden ids, pieces and text (tests/data/golden/README.md)."""

from __future__ import annotations

import pytest

from llcuda.gguf.detokenizer import IncrementalDetokenizer
from llcuda.gguf.reader import GGUFFile
from llcuda.gguf.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(smollm2_path) -> Tokenizer:
    with GGUFFile(smollm2_path) as f:
        return Tokenizer.from_metadata(dict(f.metadata))


def _piece_bytes(piece) -> bytes:
    # llama-server gives a piece that is not whole UTF-8 as its list of bytes
    return bytes(piece) if isinstance(piece, list) else piece.encode("utf-8")


def test_vocab_facts(tok: Tokenizer, smollm2_golden: dict):
    facts = smollm2_golden["meta"]["model_facts"]
    assert tok.model == facts["tokenizer.ggml.model"] == "gpt2"
    assert tok.vocab_size == facts["vocab"] == 49152
    assert (tok.bos_id, tok.eos_id) == (facts["bos_token_id"], facts["eos_token_id"]) == (1, 2)
    assert not tok.add_bos and not tok.add_eos  # "add_special" adds nothing to this model
    assert tok.eos_id in tok.eog_ids and tok.token_text(2) == "<|im_end|>"


def test_every_golden_tokenization(tok: Tokenizer, smollm2_golden: dict):
    cases = smollm2_golden["tokenize"] + smollm2_golden["tokenize_literal_special"]
    assert len(cases) == 42
    wrong = [
        (c["text"], c["add_special"], c["parse_special"], ids, c["ids"])
        for c in cases
        if (ids := tok.encode(c["text"], c["add_special"], c["parse_special"])) != c["ids"]
    ]
    assert not wrong


def test_golden_pieces_and_detokenization(tok: Tokenizer, smollm2_golden: dict):
    for c in smollm2_golden["tokenize"] + smollm2_golden["tokenize_literal_special"]:
        pieces = [tok.token_to_piece(i, special=True) for i in c["ids"]]
        assert pieces == [_piece_bytes(p) for p in c["pieces"]], c["text"]
        assert tok.decode(c["ids"], skip_special=False) == c["detokenized"], c["text"]


def test_golden_prompt_ids(tok: Tokenizer, smollm2_golden: dict):
    for case in smollm2_golden["greedy"]:
        assert tok.encode(case["prompt"]) == case["prompt_ids"], case["prompt"][:60]
        assert len(case["prompt_ids"]) == case["n_prompt_tokens"]


def test_golden_decode(tok: Tokenizer, smollm2_golden: dict):
    # llama-server's generated text is llama.cpp's detokenization of output_ids
    for case in smollm2_golden["greedy"]:
        assert tok.decode(case["output_ids"]) == case["text"]
        d = IncrementalDetokenizer(tok)
        streamed = "".join(d.push(t) for t in case["output_ids"]) + d.flush()
        assert streamed == case["text"]


def test_golden_top5_pieces(tok: Tokenizer, smollm2_golden: dict):
    checked = 0
    for case in smollm2_golden["greedy"]:
        for step in case["steps"]:
            for top in step["top"]:
                try:
                    text = tok.token_to_piece(top["id"]).decode("utf-8")
                except UnicodeDecodeError:
                    continue  # llama-server shows partial characters its own way
                assert text == top["token"], top
                checked += 1
    assert checked > 900
