"""Structured output and tools over HTTP: response_format, json_schema and grammar constrain the
answer, tools give tool_calls (streamed too), bad schemas and grammars are 400s naming the field."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import start_server
from tests.e2e.test_server import sse_events

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
          "s": {"enum": ["x", 'y"z']}}, "required": ["n", "s"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"enum": ["a", "b"]}}, "required": ["q"],
    "additionalProperties": False}}}  # fmt: skip
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_model):
    yield from start_server(tiny_model, ctx_size=1024)


def _check(obj: dict) -> None:
    assert set(obj) == {"n", "s"} and 0 <= obj["n"] <= 9 and obj["s"] in ("x", 'y"z')


def test_chat_json_schema_and_json_object(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": CHAT, "response_format": fmt,
                                                 "max_tokens": 60, "temperature": 0})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        _check(json.loads(choice["message"]["content"]))
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 60, "seed": 4,
                                            "response_format": {"type": "json_object"}})
        assert r.status_code == 200, r.text
        assert isinstance(json.loads(r.json()["choices"][0]["text"]), dict)


def test_llama_completion_grammar_and_json_schema(server):
    with server.client() as c:
        r = c.post("/completion", json={"prompt": "x", "n_predict": 20, "temperature": 0,
                                        "grammar": 'root ::= ("ab" | "cd") [0-9]'})
        assert r.status_code == 200, r.text
        content = r.json()["content"]
        assert content[:2] in ("ab", "cd") and content[2:].isdigit() and len(content) == 3
        r = c.post("/completion", json={"prompt": "x", "n_predict": 60, "json_schema": SCHEMA})
        _check(json.loads(r.json()["content"]))


def test_openai_routes_take_llama_server_constraint_fields(server):
    """llama-server takes grammar / json_schema on its OpenAI routes too; clients send them."""
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 60, "seed": 2,
                                            "json_schema": SCHEMA})
        assert r.status_code == 200, r.text
        _check(json.loads(r.json()["choices"][0]["text"]))
        r = c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 20,
                                                 "grammar": 'root ::= "ok" [0-9]'})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert text[:2] == "ok" and text[2:].isdigit() and len(text) == 3
        r = c.post("/v1/completions", json={"prompt": "x", "json_schema": SCHEMA,
                                            "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and "cannot be combined" in r.text


def test_streamed_json_schema_joins_to_valid_json(server):
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json={
            "messages": CHAT, "stream": True, "max_tokens": 60, "seed": 1,
            "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}) as r:
        events = sse_events(r)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    _check(json.loads(text))


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "lookup"}}])
def test_tool_choice_forces_a_parseable_call(server, choice):
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": CHAT, "tools": [TOOL],
                                                 "tool_choice": choice, "max_tokens": 80})
        assert r.status_code == 200, r.text
        choice_ = r.json()["choices"][0]
        assert choice_["finish_reason"] == "tool_calls"
        call = choice_["message"]["tool_calls"][0]
        assert call["function"]["name"] == "lookup"
        assert json.loads(call["function"]["arguments"])["q"] in ("a", "b")


def test_streamed_tool_call_comes_as_delta_tool_calls(server):
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json={
            "messages": CHAT, "tools": [TOOL], "tool_choice": "required", "stream": True,
            "max_tokens": 80}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert not "".join(d.get("content") or "" for d in deltas)  # nothing leaked as content
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["function"]["name"] == "lookup"
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_openai_client_tool_call(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="test-key-123")
    out = client.chat.completions.create(model="m", messages=CHAT, tools=[TOOL],
                                         tool_choice="required", max_tokens=80)  # fmt: skip
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup" and json.loads(call.function.arguments)["q"] in "ab"


@pytest.mark.parametrize("route, body, param, message", [
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema",
     "json_schema": {"schema": {"type": "nope"}}}}, "response_format", "Invalid type: nope"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "yaml"}},
     "response_format", "response_format.type"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema",
     "json_schema": {"schema": {"$ref": "#/x"}}}}, "response_format", "does not exist"),
    ("/completion", {"prompt": "x", "grammar": "root ::= undefined"}, "grammar", "not found"),
    ("/completion", {"prompt": "x", "grammar": 'root ::= "a'}, "grammar", "not valid GBNF"),
    ("/completion", {"prompt": "x", "json_schema": {"type": "object", "minProperties": "x"}},
     "json_schema", "minProperties"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function",
     "function": {"name": ""}}]}, "tools", "tools[0].function.name"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [TOOL],
     "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice",
     "tool_choice names function"),
])  # fmt: skip
def test_malformed_schema_grammar_or_tools_is_a_400(server, route, body, param, message):
    with server.client() as c:
        r = c.post(route, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
