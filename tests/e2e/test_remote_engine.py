"""`InferenceEngine(server_url=...)` against a real `llcuda serve` on 127.0.0.1 (tiny model, CPU).

The server's own engine (`server.engine`) is the local reference: with temperature 0 the remote
engine must give the same tokens and text, and an InferResult filled the same way.
"""

from __future__ import annotations

import pytest

from llcuda import InferenceEngine
from llcuda.remote import BadRequestError, ServerConnectionError, ServerError
from tests.e2e.conftest import API_KEY, CTX_SIZE, bound_socket, engine_idle, wait_until

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture
def remote(server):
    with InferenceEngine(server_url=server.url, api_key=API_KEY) as engine:
        yield engine


@pytest.fixture(scope="module")
def dead_url() -> str:
    """A URL where nothing listens (the port was free a moment ago)."""
    sock = bound_socket()
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def assert_same_result(remote_result, local_result) -> None:
    """Everything but the timings is equal; the timings are filled and consistent."""
    assert remote_result.success, remote_result.error_message
    for name in ("text", "token_ids", "tokens_generated", "prompt_tokens", "finish_reason"):
        assert getattr(remote_result, name) == getattr(local_result, name), name
    r = remote_result
    assert 0.0 < r.ttft_ms <= r.latency_ms
    # the request's decode speed: the tokens after the first, from the first to the end
    decode_s = (r.latency_ms - r.ttft_ms) / 1000.0
    assert r.tokens_per_sec == pytest.approx((r.tokens_generated - 1) / decode_s)
    assert r.error_message is None


# --- generation equals local generation -----------------------------------------------------------


def test_remote_infer_equals_local_infer(server, remote):
    local = server.engine.infer("The river", max_tokens=8, **GREEDY)
    result = remote.infer("The river", max_tokens=8, **GREEDY)
    assert len(local.token_ids) == 8 and local.text
    assert_same_result(result, local)
    assert result.finish_reason == "length"


def test_remote_sampling_knobs_reach_the_server(server, remote):
    text = server.engine.infer("The river", max_tokens=12, **GREEDY).text
    stop = text[4:6]
    assert stop, f"need some text to stop on, got {text!r}"
    local = server.engine.infer("The river", max_tokens=12, stop=[stop], **GREEDY)
    assert local.finish_reason == "stop"
    assert_same_result(remote.infer("The river", max_tokens=12, stop=stop, **GREEDY), local)
    # repeat_penalty and its window: repeat_last_n=0 turns the penalty off
    penalized = {"max_tokens": 8, "repeat_penalty": 100.0, **GREEDY}
    on = server.engine.infer("The river", **penalized)
    off = server.engine.infer("The river", repeat_last_n=0, **penalized)
    assert on.token_ids != off.token_ids
    assert_same_result(remote.infer("The river", **penalized), on)
    assert_same_result(remote.infer("The river", repeat_last_n=0, **penalized), off)
    # seeded sampling: the same seed, the same tokens (the tiny model's logits are so peaked
    # that only a huge temperature samples anything but the top token)
    sampled = {"max_tokens": 6, "temperature": 1000.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
               "ignore_eos": True}  # fmt: skip
    seven = server.engine.infer("Once", seed=7, **sampled)
    assert seven.token_ids != server.engine.infer("Once", seed=8, **sampled).token_ids
    assert_same_result(remote.infer("Once", seed=7, **sampled), seven)


def test_remote_stream_yields_the_same_text(server, remote):
    local = server.engine.infer("Once upon", max_tokens=10, **GREEDY)
    stream = remote.infer_stream("Once upon", max_tokens=10, **GREEDY)
    pieces = list(stream)
    assert len(pieces) > 1  # it streamed, not one piece at the end
    assert "".join(pieces) == local.text
    assert_same_result(stream.result, local)


def test_remote_batch_infer_keeps_input_order(server, remote):
    prompts = ["a", "a b c", "The market opened", "z y", "one two three four five"]
    local = [server.engine.infer(p, max_tokens=6, **GREEDY) for p in prompts]
    results = remote.batch_infer(prompts, max_tokens=6, **GREEDY)
    assert [r.prompt_tokens for r in results] == [r.prompt_tokens for r in local]
    assert len({r.text for r in local}) > 1  # distinct answers, so order is visible
    for result, expected in zip(results, local, strict=True):
        assert_same_result(result, expected)
    assert remote.batch_infer([], max_tokens=6) == []


def test_remote_chat_equals_local_chat(server, remote):
    messages = [{"role": "user", "content": "Hello there"}]
    local = server.engine.chat(messages, max_tokens=6, **GREEDY)
    assert_same_result(remote.chat(messages, max_tokens=6, **GREEDY), local)
    stream = remote.chat_stream(messages, max_tokens=6, **GREEDY)
    assert "".join(stream) == local.text
    assert_same_result(stream.result, local)


def test_remote_openai_shaped_results(server, remote):
    local = server.engine.create_completion("The mill", max_tokens=5, temperature=0)
    body = remote.create_completion("The mill", max_tokens=5, temperature=0)
    assert body["object"] == "text_completion" and body["model"] == "tiny.gguf"
    assert body["choices"][0]["text"] == local["choices"][0]["text"]
    assert body["choices"][0]["finish_reason"] == local["choices"][0]["finish_reason"]
    assert body["usage"] == local["usage"]
    chunks = list(remote.create_completion("The mill", max_tokens=5, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == local["choices"][0]["text"]
    echoed = remote.create_completion("The mill", max_tokens=5, temperature=0, echo=True)
    assert echoed["choices"][0]["text"] == "The mill" + local["choices"][0]["text"]

    messages = [{"role": "user", "content": "hi"}]
    local_chat = server.engine.create_chat_completion(messages, max_tokens=4, temperature=0)
    chat = remote.create_chat_completion(messages, max_tokens=4, temperature=0)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == local_chat["choices"][0]["message"]
    assert chat["usage"] == local_chat["usage"]


def test_remote_max_tokens_beyond_the_context_runs_until_it_is_full(server, remote):
    # locally a max_tokens over ctx_size means "until the context is full"; the server refuses
    # one over ctx_size, so the client must not send it
    prompt = " ".join(["river"] * ((CTX_SIZE - 24) // 4))  # a few tokens short of full
    room = CTX_SIZE - len(server.engine.tokenize(prompt))
    assert 0 < room <= 32
    result = remote.infer(prompt, max_tokens=10 * CTX_SIZE, **GREEDY)
    assert result.finish_reason == "length"
    assert result.tokens_generated == len(result.token_ids) == room
    body = remote.create_completion(prompt, max_tokens=None, temperature=0)
    assert body["usage"]["total_tokens"] <= CTX_SIZE


def test_remote_cached_tokens_come_from_the_servers_prefix_cache(server, remote):
    block_size = server.llm_engine.block_manager.block_size
    prompt = "The miller by the river counts his sacks of flour. " * 3
    assert len(server.engine.tokenize(prompt)) > 2 * block_size
    remote.reset_metrics()
    remote.infer(prompt, max_tokens=2, **GREEDY)  # leaves the prompt's blocks in the cache
    second = remote.infer(prompt, max_tokens=2, **GREEDY)
    local = server.engine.infer(prompt, max_tokens=2, **GREEDY)
    assert second.cached_tokens >= 2 * block_size
    assert second.cached_tokens == local.cached_tokens
    assert remote.get_metrics()["prefix_cache"]["cached_tokens"] >= second.cached_tokens
    chat = [{"role": "user", "content": prompt}]
    remote.chat(chat, max_tokens=2, **GREEDY)
    cached = remote.chat(chat, max_tokens=2, **GREEDY).cached_tokens
    assert cached >= 2 * block_size
    assert cached == server.engine.chat(chat, max_tokens=2, **GREEDY).cached_tokens


def test_closing_a_remote_stream_aborts_the_request(server, remote):
    stream = remote.infer_stream("The bridge", max_tokens=CTX_SIZE - 16, **GREEDY)
    assert next(stream) and next(stream)
    stream.close()
    assert stream.result.finish_reason == "abort" and stream.result.success
    assert wait_until(lambda: engine_idle(server), timeout=3.0)


# --- tokens, metrics, model, lifecycle ------------------------------------------------------------


def test_remote_tokenize_round_trip(server, remote):
    text = "Hello world, river"
    with_bos = remote.tokenize(text)
    plain = remote.tokenize(text, add_special=False)
    assert with_bos == server.engine.tokenize(text)
    assert plain == server.engine.tokenize(text, add_special=False)
    assert len(with_bos) == len(plain) + 1
    assert remote.detokenize(plain) == text == server.engine.detokenize(plain)


def test_remote_metrics_are_recorded_as_locally(remote):
    remote.reset_metrics()
    results = [remote.infer(p, max_tokens=4, **GREEDY) for p in ("one", "two words")]
    metrics = remote.get_metrics()
    assert metrics["throughput"]["total_requests"] == 2
    assert metrics["throughput"]["generated_tokens"] == 8
    assert metrics["throughput"]["prompt_tokens"] == sum(r.prompt_tokens for r in results)
    assert metrics["latency"]["count"] == 2 and metrics["latency"]["ttft_mean_ms"] > 0
    assert metrics["latency"]["max_ms"] == pytest.approx(max(r.latency_ms for r in results))
    assert metrics["requests"] == {"in_flight": 0, "failed": 0}
    remote.reset_metrics()
    assert remote.get_metrics()["throughput"]["total_requests"] == 0


def test_remote_model_info_and_lifecycle(server):
    engine = InferenceEngine(server_url=server.url + "/", api_key=API_KEY)
    info = engine.model_info()
    assert info["server_url"] == server.url and info["name"] == "tiny.gguf"
    assert info["ctx_size"] == CTX_SIZE
    assert engine.is_loaded
    with pytest.raises(RuntimeError, match="load_model is not used with server_url"):
        engine.load_model("some.gguf")
    with pytest.raises(RuntimeError, match="GET /metrics"):
        engine.memory_report()
    with engine:
        assert engine.infer("hi", max_tokens=2, **GREEDY).tokens_generated == 2
    assert not engine.is_loaded  # the with block closed the client; the server runs on
    with pytest.raises(RuntimeError, match="closed"):
        engine.infer("hi", max_tokens=2)
    engine.unload_model()  # idempotent
    assert server.engine.is_loaded


# --- errors ---------------------------------------------------------------------------------------


def test_missing_or_wrong_api_key_is_a_clear_error(server):
    with InferenceEngine(server_url=server.url) as engine:
        with pytest.raises(ServerError, match="missing API key") as info:
            engine.infer("hi", max_tokens=2)
    assert info.value.status == 401 and "api_key" in str(info.value)
    assert not isinstance(info.value, ValueError)
    with InferenceEngine(server_url=server.url, api_key="wrong") as engine:
        with pytest.raises(ServerError, match="invalid API key"):
            engine.tokenize("hi")
    with pytest.raises(ValueError, match="api_key is only used with server_url"):
        InferenceEngine(api_key=API_KEY)


BAD_CALLS = [
    (lambda e: e.infer("hi", temperature=-1), "temperature"),
    (lambda e: e.infer("hi", max_tokens=-1), "max_tokens"),
    (lambda e: e.infer("hi", top_p=2), "top_p"),
    (lambda e: e.infer("hi", stop=7), "stop"),
    (lambda e: e.infer("hi", typical_p=0.5), "typical_p"),
    (lambda e: e.infer(42), "prompt must be a string"),
    (lambda e: e.infer_stream(["hi"]), "prompt must be a string"),
    (lambda e: e.batch_infer("hi"), "prompts must be a list"),
    (lambda e: e.batch_infer(["a", 3]), r"prompts\[1\]"),
    (lambda e: e.chat("hi"), "messages must be a non-empty list"),
    (lambda e: e.chat_stream([{"content": "x"}]), r"messages\[0\]"),
    (lambda e: e.create_completion([1, -2]), r"prompt\[1\]"),
    (lambda e: e.create_chat_completion([{"role": "user", "content": 5}]), "content"),
    (lambda e: e.tokenize(5), "text must be a string"),
    (lambda e: e.detokenize([1, "x"]), r"ids\[1\]"),
]


@pytest.mark.parametrize(("call", "message"), BAD_CALLS)
def test_bad_argument_is_a_value_error_before_any_request(dead_url, call, message):
    # nothing listens at dead_url: a request would raise ServerConnectionError, not ValueError
    engine = InferenceEngine(server_url=dead_url)
    with pytest.raises(ValueError, match=message) as info:
        call(engine)
    assert not isinstance(info.value, ServerError)
    assert engine.get_metrics()["requests"]["failed"] == 0


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="server_url must be an http"):
        InferenceEngine(server_url="127.0.0.1:8080")
    with pytest.raises(ValueError, match="timeout"):
        InferenceEngine(server_url="http://127.0.0.1:8080", timeout=0)


def test_a_server_side_400_is_a_value_error_with_the_servers_message(server, remote):
    long_prompt = " ".join(["river"] * (CTX_SIZE * 2))
    with pytest.raises(ValueError, match="ctx_size") as local:
        server.engine.infer(long_prompt, max_tokens=4)
    with pytest.raises(BadRequestError, match="ctx_size") as info:
        remote.infer(long_prompt, max_tokens=4)
    assert info.value.status == 400 and info.value.message == str(local.value)
    with pytest.raises(BadRequestError, match=r"'tokens\[0\]' must be a token id"):
        remote.detokenize([10**9])


def test_server_down_is_a_clear_error_naming_the_url(dead_url):
    engine = InferenceEngine(server_url=dead_url)
    calls = [
        lambda: engine.infer("hi"),
        lambda: engine.chat([{"role": "user", "content": "hi"}]),
        lambda: engine.tokenize("hi"),
        lambda: engine.model_info(),
    ]
    for call in calls:
        with pytest.raises(ServerConnectionError, match="cannot reach the server") as info:
            call()
        assert dead_url in str(info.value)
        assert isinstance(info.value, ConnectionError)
