"""`llcuda serve` end to end: real HTTP on 127.0.0.1, the openai client, bad input, disconnects,
SIGTERM. The model is a tiny random-weight Gemma 3, so texts are gibberish but deterministic."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import (
    API_KEY,
    CTX_SIZE,
    N_PARALLEL,
    bound_socket,
    engine_idle,
    slow_engine_steps,
    wait_until,
)


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of an SSE response, parsed ([DONE] kept as the string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# --- auth, health, models -------------------------------------------------------------------------


def test_health_is_open_and_everything_else_needs_the_key(server):
    with server.client(key=None) as c:
        assert c.get("/health").json() == {"status": "ok"}
        r = c.get("/v1/models")
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert "missing" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 401
    with server.client(key="wrong") as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and "invalid" in r.json()["error"]["message"]
    with server.client() as c:
        models = c.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "tiny.gguf"
    assert models["data"][0]["meta"]["ctx_size"] == CTX_SIZE


def test_serve_binds_localhost_by_default():
    from llcuda.cli import build_parser

    args = build_parser().parse_args(["serve", "model.gguf"])
    assert args.host == "127.0.0.1"
    assert args.func.__name__ == "_serve"


# --- OpenAI endpoints -----------------------------------------------------------------------------


def test_completion_matches_the_engine(server):
    expected = server.engine.infer("The river", max_tokens=8, temperature=0.0)
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "The river", "max_tokens": 8,
                                            "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": 8,
                             "total_tokens": expected.prompt_tokens + 8,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


def test_streamed_completion_equals_the_whole_one(server):
    req = {"prompt": "Once upon", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    with server.client() as c:
        whole = c.post("/v1/completions", json=req).json()
        stream_req = {**req, "stream": True, "stream_options": {"include_usage": True}}
        with c.stream("POST", "/v1/completions", json=stream_req) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    chunks = events[:-2]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len({e["id"] for e in chunks}) == 1
    text = "".join(e["choices"][0]["text"] for e in chunks)
    assert text == whole["choices"][0]["text"]


def test_chat_completion_and_stream(server):
    messages = [{"role": "user", "content": "Hello there"}]
    expected = server.engine.chat(messages, max_tokens=6, temperature=0.0, ignore_eos=True)
    req = {"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with server.client() as c:
        body = c.post("/v1/chat/completions", json=req).json()
        with c.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
            events = sse_events(r)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert body["usage"]["completion_tokens"] == 6
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == (
        expected.text
    )


def test_max_tokens_defaults_to_the_rest_of_the_context(server):
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "a b c", "temperature": 0,
                                            "ignore_eos": True})  # fmt: skip
    usage = r.json()["usage"]
    assert usage["total_tokens"] == CTX_SIZE  # generation ran until the context was full
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_completion(server):
    text = server.engine.infer("The river", max_tokens=12, temperature=0.0, ignore_eos=True).text
    stop = text[4:6]
    assert stop, f"need some text to stop on, got {text!r}"
    with server.client() as c:
        req = {"prompt": "The river", "max_tokens": 12, "temperature": 0, "stop": [stop]}
        body = c.post("/v1/completions", json=req).json()
    assert body["choices"][0]["text"] == text[: text.find(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


# --- the openai client ----------------------------------------------------------------------------


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny.gguf"]
    done = client.completions.create(model="tiny.gguf", prompt="The mill", max_tokens=5,
                                     temperature=0)  # fmt: skip
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 5
    streamed = client.completions.create(model="tiny.gguf", prompt="The mill", max_tokens=5,
                                         temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    chat = client.chat.completions.create(
        model="tiny.gguf", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 4
    pieces = client.chat.completions.create(
        model="tiny.gguf", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny.gguf", prompt="x", max_tokens=-5)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# --- llama-server endpoints -----------------------------------------------------------------------


def test_llama_completion(server):
    expected = server.engine.infer("The town", max_tokens=7, temperature=0.0, ignore_eos=True)
    req = {"prompt": "The town", "n_predict": 7, "temperature": 0, "top_k": 40, "top_p": 0.9,
           "min_p": 0.0, "seed": 3, "ignore_eos": True}  # fmt: skip
    with server.client() as c:
        body = c.post("/completion", json=req).json()
        with c.stream("POST", "/completion", json={**req, "stream": True}) as r:
            events = sse_events(r)
    assert body["content"] == expected.text
    assert body["stop"] is True and body["stop_type"] == "limit"
    assert body["tokens_predicted"] == 7 and body["tokens_evaluated"] == expected.prompt_tokens
    assert "[DONE]" not in events  # llama-server's /completion stream has no [DONE]
    assert events[-1]["stop"] is True and events[-1]["tokens_predicted"] == 7
    assert "".join(e["content"] for e in events) == expected.text


def test_tokenize_and_detokenize(server):
    with server.client() as c:
        plain = c.post("/tokenize", json={"content": "Hello world"}).json()["tokens"]
        with_bos = c.post("/tokenize", json={"content": "Hello world", "add_special": True}).json()
        text = c.post("/detokenize", json={"tokens": plain}).json()
    assert plain == server.engine.tokenize("Hello world", add_special=False)
    assert with_bos["tokens"] == server.engine.tokenize("Hello world", add_special=True)
    assert len(with_bos["tokens"]) == len(plain) + 1
    assert text == {"content": "Hello world"}


# --- bad input ------------------------------------------------------------------------------------

LONG_PROMPT = " ".join(["river"] * (CTX_SIZE * 2))

BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": ', "not valid JSON"),
    ("/v1/completions", b"", "empty"),
    ("/v1/completions", b'["prompt"]', "JSON object"),
    ("/v1/completions", b'{"prompt": "caf\xe9"}', "not valid UTF-8"),
    ("/v1/completions", {"max_tokens": 4}, "'prompt' is required"),
    ("/v1/completions", {"prompt": 42}, "'prompt' must be a string"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, "'max_tokens' must be an integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "'max_tokens' must be >= 0"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**15}, f"<= {CTX_SIZE}"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, "'max_tokens' must be an integer"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "'temperature' must be a number"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "'temperature' must be >= 0"),
    ("/v1/completions", {"prompt": "hi", "top_p": 3}, "'top_p' must be <= 1"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "'stream' must be true or false"),
    ("/v1/completions", {"prompt": "hi", "stop": 7}, "'stop' must be a string or a list"),
    ("/v1/completions", {"prompt": "hi", "seed": "x"}, "'seed' must be an integer"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, "'n' must be 1"),
    ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 4}, "ctx_size"),
    ("/v1/chat/completions", {"max_tokens": 4}, "'messages' is required"),
    ("/v1/chat/completions", {"messages": "hi"}, "'messages' must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "content"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": LONG_PROMPT}]},
        "ctx_size",
    ),  # fmt: skip
    ("/completion", {"prompt": "hi", "n_predict": -7}, "'n_predict' must be >= -1"),
    ("/completion", {"prompt": "hi", "ignore_eos": 1}, "'ignore_eos' must be true or false"),
    ("/tokenize", {"text": "hi"}, "'content' is required"),
    ("/tokenize", {"content": ["hi"]}, "'content' must be a string"),
    ("/detokenize", {"tokens": "hi"}, "'tokens' must be a list"),
    ("/detokenize", {"tokens": [1, 10**9]}, "'tokens[1]' must be a token id"),
]


@pytest.mark.parametrize(("path", "body", "message"), BAD_REQUESTS)
def test_bad_input_is_a_400_naming_the_problem(server, path, body, message):
    with server.client() as c:
        if isinstance(body, bytes):
            r = c.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = c.post(path, json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert message in error["message"]
        assert error["type"] == "invalid_request_error" and error["code"] == 400
        # and the server keeps serving
        ok = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert ok.status_code == 200
    assert wait_until(lambda: engine_idle(server))


def test_unknown_route_and_method_are_json_errors(server):
    with server.client() as c:
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == 404
        r = c.get("/v1/completions")
        assert r.status_code == 405 and "Method Not Allowed" in r.json()["error"]["message"]


# --- lifecycle ------------------------------------------------------------------------------------


def test_disconnect_mid_stream_aborts_and_frees_kv(server):
    req = {"prompt": "The bridge", "max_tokens": CTX_SIZE - 16, "temperature": 0,
           "ignore_eos": True, "stream": True}  # fmt: skip
    with server.client() as c:
        before = _metric(c, 'llcuda_requests_total{endpoint="completions",finish_reason="abort"}')
        with c.stream("POST", "/v1/completions", json=req) as r:
            lines = r.iter_lines()
            seen = [line for _, line in zip(range(6), lines, strict=False)]
            assert any(line.startswith("data: ") for line in seen)
            assert server.llm_engine.block_manager.num_free_blocks < (
                server.llm_engine.block_manager.num_blocks
            )
        # the response is closed: the connection drops mid-stream
        assert wait_until(lambda: engine_idle(server), timeout=3.0)
        after = _metric(c, 'llcuda_requests_total{endpoint="completions",finish_reason="abort"}')
        assert after == before + 1
        gauges = c.get("/metrics").text
    assert "llcuda_kv_cache_usage_ratio 0.0" in gauges
    assert "llcuda_num_requests_running 0" in gauges


def test_concurrent_streams_all_complete(server):
    n = 3 * N_PARALLEL
    results: list = [None] * n

    def one(i: int) -> None:
        req = {"prompt": f"item {i}", "max_tokens": 8, "temperature": 0.5, "seed": i,
               "ignore_eos": True, "stream": True}  # fmt: skip
        with server.client() as c, c.stream("POST", "/v1/completions", json=req) as r:
            results[i] = sse_events(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for events in results:
        assert events is not None and events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert wait_until(lambda: engine_idle(server))


def test_metrics_count_requests_tokens_and_latency(server):
    with server.client() as c:
        before = _metric(c, "llcuda_generation_tokens_total")
        ttft_before = _metric(c, "llcuda_time_to_first_token_seconds_count")
        c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3, "ignore_eos": True})
        text = c.get("/metrics").text
    assert _parse(text, "llcuda_generation_tokens_total") == before + 3
    assert _parse(text, "llcuda_time_to_first_token_seconds_count") == ttft_before + 1
    for name in ("llcuda_prompt_tokens_total", "llcuda_e2e_request_latency_seconds_bucket",
                 "llcuda_kv_cache_usage_ratio", "llcuda_num_requests_waiting",
                 'llcuda_http_errors_total{endpoint="/v1/completions",status="400"}'):  # fmt: skip
        assert name in text
    assert 'llcuda_requests_total{endpoint="completions",finish_reason="length"}' in text


def _parse(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _metric(client: httpx.Client, name: str) -> float:
    return _parse(client.get("/metrics").text, name)


def test_sigterm_mid_stream_ends_the_stream_and_exits_0(tiny_model):
    sock = bound_socket()
    port = sock.getsockname()[1]
    sock.close()  # the child binds it; a race with another process here is unlikely
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llcuda.cli", "serve", tiny_model, "--port", str(port),
         "--device", "cpu", "-c", str(CTX_SIZE), "-np", "2", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _healthy(url), timeout=60), "llcuda serve did not come up"
        req = {"prompt": "The market", "max_tokens": CTX_SIZE - 16, "temperature": 0,
               "ignore_eos": True, "stream": True}  # fmt: skip
        events = []
        with httpx.Client(base_url=url, timeout=30) as c:  # no --api-key: no header needed
            with c.stream("POST", "/v1/completions", json=req) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    events.append(data if data == "[DONE]" else json.loads(data))
                    if len(events) == 3:
                        t0 = time.monotonic()
                        proc.send_signal(signal.SIGTERM)
        assert time.monotonic() - t0 < 5.0
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "abort"
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
    assert "Traceback" not in log, log
    # the request log (stderr): the aborted stream's line, the health polls'
    line = r"POST /v1/completions 200 prompt_tokens=\d+ generated_tokens=\d+ finish_reason=abort "
    assert re.search(line + r"duration_ms=\d+\.\d", log), log
    assert "GET /health 200 prompt_tokens=-" in log, log


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_client_gone_before_a_whole_answer_aborts_it(server, monkeypatch):
    """A client that stops waiting for a non-streamed answer: the request is aborted (not run to
    its end). Engine steps are slowed (slow_engine_steps): the fast CPU path finished the
    240-token answer inside the 0.5 s the client waits."""
    key = 'llcuda_requests_total{endpoint="chat",finish_reason="abort"}'
    with server.client() as c:
        aborted = _metric(c, key)
    slow_engine_steps(server, monkeypatch)
    req = {"prompt": "The apple", "max_tokens": CTX_SIZE - 16, "temperature": 0,
           "ignore_eos": True}  # fmt: skip
    with server.client(timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json={**req, "messages": [{"role": "user",
                                                                  "content": "x"}]})  # fmt: skip
    assert wait_until(lambda: engine_idle(server), timeout=3.0)
    monkeypatch.undo()
    with server.client() as c:
        assert _metric(c, key) == aborted + 1


def test_many_requests_at_4x_n_parallel_none_lost(server):
    """1,000 requests from 4x n_parallel clients: all complete, none lost, KV use back to zero."""
    n_requests, n_clients = 1000, 4 * N_PARALLEL
    done: list[int] = []
    errors: list[str] = []
    key = 'llcuda_requests_total{endpoint="completions",finish_reason="length"}'

    def client(k: int) -> None:
        with server.client() as c:
            for i in range(k, n_requests, n_clients):
                r = c.post("/v1/completions", json={"prompt": f"n {i}", "max_tokens": 2,
                                                    "ignore_eos": True})  # fmt: skip
                if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != 2:
                    errors.append(r.text)
                done.append(i)

    with server.client() as c:
        before = _metric(c, key)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a client is still waiting after 300 s"
    assert errors == []
    assert sorted(done) == list(range(n_requests))
    assert wait_until(lambda: engine_idle(server))
    with server.client() as c:
        text = c.get("/metrics").text
    assert _parse(text, key) == before + n_requests
    assert _parse(text, "llcuda_kv_cache_blocks_used") == 0
    assert "llcuda_kv_cache_usage_ratio 0.0" in text
    assert "llcuda_num_requests_running 0" in text and "llcuda_num_requests_waiting 0" in text


def test_shared_prefix_is_served_from_the_prefix_cache(server):
    block_size = server.llm_engine.block_manager.block_size
    system = "You are the miller by the river; answer in one word. " * 4
    req = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    cached_before = server.engine.get_metrics()["prefix_cache"]["cached_tokens"]
    with server.client() as c:
        hits_before = _metric(c, "llcuda_prefix_cache_hits_total")
        queries_before = _metric(c, "llcuda_prefix_cache_queries_total")
        first = c.post("/v1/completions", json={"prompt": system + "Who?", **req}).json()
        again = c.post("/v1/completions", json={"prompt": system + "Who?", **req}).json()
        other = c.post("/v1/completions", json={"prompt": system + "Why?", **req}).json()
        assert wait_until(lambda: engine_idle(server))
        text = c.get("/metrics").text
    n_prompt = first["usage"]["prompt_tokens"]
    assert n_prompt > 2 * block_size
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert other["usage"]["completion_tokens"] == 4
    hits = _parse(text, "llcuda_prefix_cache_hits_total") - hits_before
    queries = _parse(text, "llcuda_prefix_cache_queries_total") - queries_before
    assert queries == n_prompt + n_prompt + other["usage"]["prompt_tokens"]
    # the repeat reuses every full block but the one holding its last token; the other prompt
    # at least the blocks of the shared system text
    assert hits >= (n_prompt - 1) // block_size * block_size + 2 * block_size
    assert 0.0 < _parse(text, "llcuda_prefix_cache_hit_ratio") <= 1.0
    assert _parse(text, "llcuda_prefix_cache_blocks") >= 2  # left behind, free, evictable
    assert "llcuda_kv_cache_usage_ratio 0.0" in text  # KV use: blocks live requests hold
    assert server.engine.get_metrics()["prefix_cache"]["cached_tokens"] - cached_before == hits
    # OpenAI's usage.prompt_tokens_details.cached_tokens tells each request its share
    cached = [b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in (first, again, other)]
    assert sum(cached) == hits and cached[1] >= (n_prompt - 1) // block_size * block_size
