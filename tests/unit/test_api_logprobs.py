"""Log-probs through the Python API: infer(logprobs=N), create_completion(logprobs=N) and
create_chat_completion(logprobs=True, top_logprobs=N), whole and streamed, and their bad values.
The numbers themselves are checked against the model in test_logprobs.py; here, their shapes and
that every generated token gets exactly one entry, in order."""

from __future__ import annotations

import math

import pytest

from llcuda.api import InferenceEngine
from llcuda.gguf.synthetic import TINY, write_gemma3_gguf

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_gemma3_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", **TINY)
    e = InferenceEngine()
    e.load_model(str(path), ctx_size=96, n_parallel=2, device="cpu", auto_start=False,
                 verbose=False)  # fmt: skip
    yield e
    e.unload_model()


def _check_entry(entry: dict, k: int, with_id: bool = True) -> None:
    keys = {"token", "logprob", "bytes", "top_logprobs"} | ({"id"} if with_id else set())
    assert set(entry) == keys
    assert entry["logprob"] <= 0.0 and math.isfinite(entry["logprob"])
    assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
    assert len(entry["top_logprobs"]) == k
    values = [t["logprob"] for t in entry["top_logprobs"]]
    assert values == sorted(values, reverse=True)


def test_infer_reports_one_entry_per_token(engine):
    r = engine.infer("hello", max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)
    assert len(r.logprobs) == len(r.token_ids) == 4
    for entry, token_id in zip(r.logprobs, r.token_ids, strict=True):
        _check_entry(entry, 3)
        assert entry["id"] == token_id
        assert entry["top_logprobs"][0]["id"] == token_id  # greedy: the most likely token
        piece = engine._loaded.tokenizer.token_to_piece(token_id)  # llama.cpp's token text
        assert bytes(entry["bytes"]) == piece
    assert engine.infer("hello", max_tokens=2, temperature=0.0).logprobs is None


def test_infer_stream_result_carries_the_logprobs(engine):
    stream = engine.infer_stream("hello", max_tokens=3, temperature=0.0, logprobs=0)
    text = "".join(stream)
    assert text == stream.result.text
    assert [e["id"] for e in stream.result.logprobs] == stream.result.token_ids
    assert all(e["top_logprobs"] == [] for e in stream.result.logprobs)


def test_chat_completion_logprobs_content(engine):
    c = engine.create_chat_completion(MESSAGES, max_tokens=3, temperature=0.0, logprobs=True,
                                      top_logprobs=2)  # fmt: skip
    content = c["choices"][0]["logprobs"]["content"]
    assert len(content) == c["usage"]["completion_tokens"]
    for entry in content:
        _check_entry(entry, 2, with_id=False)
        assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    c = engine.create_chat_completion(MESSAGES, max_tokens=2, logprobs=True)  # top_logprobs: 0
    assert all(e["top_logprobs"] == [] for e in c["choices"][0]["logprobs"]["content"])
    assert engine.create_chat_completion(MESSAGES, max_tokens=2)["choices"][0]["logprobs"] is None


def test_chat_completion_chunks_carry_their_tokens_logprobs(engine):
    whole = engine.create_chat_completion(MESSAGES, max_tokens=4, temperature=0.0,
                                          logprobs=True, top_logprobs=1)  # fmt: skip
    chunks = list(
        engine.create_chat_completion(
            MESSAGES, max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=1, stream=True
        )
    )
    streamed = [e for ch in chunks if ch["choices"][0]["logprobs"]
                for e in ch["choices"][0]["logprobs"]["content"]]  # fmt: skip
    assert streamed == whole["choices"][0]["logprobs"]["content"]
    assert chunks[0]["choices"][0]["logprobs"] is None  # the role chunk has no tokens


def test_completion_legacy_logprobs(engine):
    c = engine.create_completion("hi", max_tokens=4, temperature=0.0, logprobs=2)
    choice = c["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                 strict=True):  # fmt: skip
        assert top[token] == value  # the sampled token is always among them
        assert 1 <= len(top) <= 3
    chunks = list(engine.create_completion("hi", max_tokens=4, temperature=0.0, logprobs=2,
                                           stream=True))  # fmt: skip
    parts = [ch["choices"][0]["logprobs"] for ch in chunks if ch["choices"][0]["logprobs"]]
    assert [t for p in parts for t in p["tokens"]] == lp["tokens"]
    assert [o for p in parts for o in p["text_offset"]] == lp["text_offset"]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda e: e.infer("hi", logprobs=-1), "logprobs"),
        (lambda e: e.infer("hi", logprobs=101), "logprobs"),
        (lambda e: e.create_completion("hi", logprobs=21), "logprobs"),
        (lambda e: e.create_completion("hi", logprobs=1, echo=True), "echo"),
        (
            lambda e: e.create_chat_completion(MESSAGES, logprobs=True, top_logprobs=21),
            "top_logprobs",
        ),
        (lambda e: e.create_chat_completion(MESSAGES, top_logprobs=2), "top_logprobs"),
        (lambda e: e.create_chat_completion(MESSAGES, logprobs=1), "logprobs"),
    ],
)
def test_bad_logprob_arguments_raise_naming_them(engine, call, match):
    with pytest.raises(ValueError, match=match):
        call(engine)
