"""The public API and the CLI end to end on the real Gemma 3 270M, checked against llama.cpp.

Greedy continuations are compared over their first N tokens on prompts where llama.cpp's own
top-2 log-probabilities are never within 0.05 of each other that early (see golden/README.md).
The CPU reference path is slow (it dequantizes every weight each step), so every test here keeps
its number of engine steps small: about 30 steps in all.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from llcuda import InferenceEngine

pytestmark = pytest.mark.slow

N = 4
PROMPTS = [
    "The capital of France is",
    "In 1969, Neil Armstrong",
    "Here is a list of the planets in our solar system:\n1.",
]


@pytest.fixture(scope="module")
def engine(real_model_path):
    e = InferenceEngine()
    e.load_model(real_model_path, ctx_size=1024, n_parallel=4, verbose=False)
    yield e
    e.unload_model()


@pytest.fixture(scope="module")
def golden_greedy(golden):
    return {case["prompt"]: case for case in golden["greedy"]}


def test_model_info(engine):
    info = engine.model_info()
    assert info["architecture"] == "gemma3"
    assert info["num_layers"] == 18
    assert info["vocab_size"] == 262144
    assert info["parameters"] == 268_098_176
    assert info["background_thread"] is True
    report = engine.memory_report()
    assert report["weights"] > 200_000_000
    assert report["kv_cache"] > 0


def test_tokenize_matches_llama_cpp(engine, golden):
    for case in golden["tokenize"]:
        ids = engine.tokenize(
            case["text"], add_special=case["add_special"], parse_special=case["parse_special"]
        )
        assert ids == case["ids"], case["text"]


def test_greedy_batch_matches_llama_cpp(engine, golden_greedy):
    # all three share every step; each must still match llama.cpp run alone
    results = engine.batch_infer(PROMPTS, max_tokens=N, temperature=0.0)
    for prompt, result in zip(PROMPTS, results, strict=True):
        case = golden_greedy[prompt]
        assert result.success, result.error_message
        assert result.prompt_tokens == len(case["prompt_ids"])
        assert result.token_ids == case["output_ids"][:N], prompt
        assert result.finish_reason == "length"
        assert result.text == engine.detokenize(result.token_ids)
        assert 0 < result.ttft_ms <= result.latency_ms


def test_stream_matches_llama_cpp(engine, golden_greedy):
    case = golden_greedy[PROMPTS[1]]
    stream = engine.infer_stream(PROMPTS[1], max_tokens=N, temperature=0.0)
    pieces = list(stream)
    assert len(pieces) > 1
    assert stream.result.token_ids == case["output_ids"][:N]
    assert "".join(pieces) == engine.detokenize(case["output_ids"][:N])


def test_stop_string(engine):
    # llama.cpp continues "The capital of France is" with " the capital of the country ..."
    result = engine.infer(PROMPTS[0], max_tokens=N, temperature=0.0, stop=["of"])
    assert result.finish_reason == "stop"
    assert result.text == " the capital "


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    a, b = engine.batch_infer([PROMPTS[1]] * 2, max_tokens=3, temperature=1.0, seed=1234)
    assert a.token_ids == b.token_ids


def test_chat_completion(engine):
    messages = [{"role": "user", "content": "Say hello."}]
    completion = engine.create_chat_completion(messages, max_tokens=3, temperature=0.0)
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["role"] == "assistant"
    usage = completion["usage"]
    # <bos><start_of_turn>user\nSay hello.<end_of_turn>\n<start_of_turn>model\n, one <bos> only
    ids = engine.tokenize("<start_of_turn>user\nSay hello.<end_of_turn>\n<start_of_turn>model\n")
    assert usage["prompt_tokens"] == len(ids)
    assert 0 < usage["completion_tokens"] <= 3


def test_early_close_frees_the_request_and_metrics(engine):
    engine.reset_metrics()
    stream = engine.infer_stream(PROMPTS[2], max_tokens=64, temperature=0.0)
    next(stream)
    stream.close()
    assert stream.result.finish_reason == "abort"
    result = engine.infer(PROMPTS[0], max_tokens=2, temperature=0.0)  # the engine still works
    assert result.token_ids == [506, 5279]
    snap = engine.get_metrics()
    assert snap["latency"]["count"] == 2
    assert snap["throughput"]["generated_tokens"] == 2 + stream.result.tokens_generated
    assert snap["throughput"]["tokens_per_sec"] > 0


def test_cli_generate_and_info(real_model_path):
    cmd = [sys.executable, "-m", "llcuda.cli"]
    gen = subprocess.run(
        [*cmd, "generate", PROMPTS[1], "-m", str(real_model_path), "-n", "2", "--temp", "0",
         "-c", "256"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip()
    assert "prompt eval time" in gen.stderr and "eval time" in gen.stderr
    info = subprocess.run(
        [*cmd, "info", str(real_model_path)], capture_output=True, text=True, timeout=120
    )
    assert info.returncode == 0, info.stderr
    assert "gemma3" in info.stdout and "Q4_K" in info.stdout


def test_unload_is_idempotent(real_model_path):
    e = InferenceEngine()
    e.load_model(real_model_path, ctx_size=256, verbose=False, auto_start=False)
    assert e.infer(PROMPTS[0], max_tokens=2, temperature=0.0).token_ids == [506, 5279]
    e.unload_model()
    e.unload_model()
    assert not e.is_loaded
    with pytest.raises(RuntimeError, match="load_model"):
        e.infer("x")
