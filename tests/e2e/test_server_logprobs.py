"""Log-probs over HTTP: /v1/chat/completions `logprobs` + `top_logprobs`, /v1/completions
`logprobs` (the legacy shape), /completion `n_probs` (llama-server's completion_probabilities),
whole and streamed (each chunk carrying its own tokens'), the openai client reading them, and a
400 naming the field for every value out of range. Greedy requests: whole and streamed answers
are the same tokens, so their log-probs must agree entry for entry."""

from __future__ import annotations

import pytest

from llcuda.api import InferenceEngine
from tests.e2e.conftest import API_KEY
from tests.e2e.test_server import sse_events

MESSAGES = [{"role": "user", "content": "hi"}]
GREEDY = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}


def _post(server, path: str, body: dict):
    with server.client() as c:
        return c.post(path, json=body)


def _stream(server, path: str, body: dict) -> list:
    with server.client() as c, c.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return sse_events(r)


def _check_sorted(tops: list[dict]) -> None:
    values = [t["logprob"] for t in tops]
    assert values == sorted(values, reverse=True)
    assert all(v <= 0.0 for v in values)


def test_chat_logprobs_whole_and_streamed(server):
    body = {"messages": MESSAGES, **GREEDY, "logprobs": True, "top_logprobs": 3}
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(entry["top_logprobs"]) == 3
        _check_sorted(entry["top_logprobs"])
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy
    events = _stream(server, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    streamed = [x for ch in chunks if ch["choices"][0]["logprobs"]
                for x in ch["choices"][0]["logprobs"]["content"]]  # fmt: skip
    assert streamed == content
    assert sum(bool(ch["choices"][0]["logprobs"]) for ch in chunks) > 1  # not all at the end
    assert (
        "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
        == (choice["message"]["content"])
    )
    plain = _post(server, "/v1/chat/completions", {"messages": MESSAGES, **GREEDY})
    assert plain.json()["choices"][0]["logprobs"] is None


def test_completion_legacy_logprobs_whole_and_streamed(server):
    body = {"prompt": "Once upon", **GREEDY, "logprobs": 2}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 4
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                 strict=True):  # fmt: skip
        assert top[token] == value and 1 <= len(top) <= 3
    events = _stream(server, "/v1/completions", body)
    parts = [e["choices"][0]["logprobs"] for e in events[:-1] if e["choices"][0]["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in parts for x in p[key]] == lp[key]
    r = _post(server, "/v1/completions", {"prompt": "Once upon", **GREEDY, "logprobs": 0})
    lp0 = r.json()["choices"][0]["logprobs"]  # 0: the sampled token's only
    assert lp0["token_logprobs"] == lp["token_logprobs"]
    assert all(list(top) == [t] for t, top in zip(lp0["tokens"], lp0["top_logprobs"],
                                                   strict=True))  # fmt: skip


def test_llama_completion_n_probs_whole_and_streamed(server):
    body = {"prompt": "Once upon", "n_predict": 4, "temperature": 0.0, "ignore_eos": True,
            "n_probs": 5, "return_tokens": True}  # fmt: skip
    r = _post(server, "/completion", body)
    assert r.status_code == 200, r.text
    data = r.json()
    probs = data["completion_probabilities"]
    assert [p["id"] for p in probs] == data["tokens"]
    for p in probs:
        assert set(p) == {"id", "token", "bytes", "logprob", "top_logprobs"}
        assert len(p["top_logprobs"]) == 5
        assert set(p["top_logprobs"][0]) == {"id", "token", "bytes", "logprob"}
        _check_sorted(p["top_logprobs"])
    events = _stream(server, "/completion", body)
    streamed = [p for e in events for p in e.get("completion_probabilities", [])]
    assert streamed == probs
    assert sum("completion_probabilities" in e for e in events) > 1  # chunk by chunk
    plain = _post(server, "/completion", {"prompt": "Once upon", "n_predict": 2})
    assert "completion_probabilities" not in plain.json()


def test_openai_client_reads_logprobs(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=3,
        temperature=0.0,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0.0 for t in content)
    chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3,
                                            temperature=0.0, logprobs=True, top_logprobs=2,
                                            stream=True)  # fmt: skip
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]  # fmt: skip
    assert [t.logprob for t in streamed] == [t.logprob for t in content]
    completion = client.completions.create(model="tiny", prompt="Once upon", max_tokens=3,
                                           temperature=0.0, logprobs=1)  # fmt: skip
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 3


def test_server_url_engine_gets_the_servers_logprobs(server):
    """InferenceEngine(server_url=...) asks /completion for n_probs and chat for top_logprobs:
    the entries of the engine behind the server, cut to the count asked (0: n_probs 1, cut)."""
    local = server.engine
    with InferenceEngine(server_url=server.url, api_key=API_KEY) as remote:
        for k in (0, 3):
            args = dict(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=k)
            got, want = remote.infer("Once upon", **args), local.infer("Once upon", **args)
            assert got.token_ids == want.token_ids
            assert got.logprobs == want.logprobs
        chat = remote.create_chat_completion(MESSAGES, max_tokens=3, temperature=0.0,
                                             logprobs=True, top_logprobs=2)  # fmt: skip
        want = local.create_chat_completion(MESSAGES, max_tokens=3, temperature=0.0,
                                            logprobs=True, top_logprobs=2)  # fmt: skip
        assert chat["choices"][0]["logprobs"] == want["choices"][0]["logprobs"]
        assert remote.infer("Once upon", max_tokens=2).logprobs is None


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "logprobs": True, "top_logprobs": -1},
            "top_logprobs",
        ),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": 3}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 1, "echo": True}, "logprobs"),
        ("/completion", {"prompt": "hi", "n_probs": 101}, "n_probs"),
        ("/completion", {"prompt": "hi", "n_probs": "5"}, "n_probs"),
        (
            "/completion",
            {"prompt": "hi", "n_probs": 2, "post_sampling_probs": True},
            "post_sampling_probs",
        ),
    ],
)
def test_out_of_range_logprob_fields_are_a_400_naming_them(server, path, body, param):
    r = _post(server, path, {**body, "max_tokens": 1, "n_predict": 1})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]
