"""Tool-call formats: parsing each architecture's output, the streaming holder, tools checks."""

from __future__ import annotations

import json

import pytest

from llcuda.structured.tool_calls import (
    ToolCallStream,
    check_tools,
    parse_tool_calls,
    tool_constraint,
    tool_format,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _calls(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_qwen_calls_and_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}'
            "\n</tool_call>")
    content, calls = parse_tool_calls(text, "qwen")
    assert content == "Let me check."
    assert _calls(calls) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)


def test_qwen_broken_call_stays_content():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    assert parse_tool_calls(text, "qwen") == (text, [])


def test_qwen_without_markers_falls_back_to_json():
    content, calls = parse_tool_calls('{"name": "f", "arguments": {"a": 1}}', "qwen")
    assert content is None and _calls(calls) == [("f", {"a": 1})]


def test_llama3_json_calls_with_parameters_and_semicolons():
    text = (' {"name": "get_weather", "parameters": {"city": "Oslo"}};'
            ' {"name": "f", "parameters": {}}')
    content, calls = parse_tool_calls(text, "llama3")
    assert content is None
    assert _calls(calls) == [("get_weather", {"city": "Oslo"}), ("f", {})]


def test_generic_json_fenced_list_and_unknown_names():
    text = '```json\n[{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\"}"}]\n```'
    assert _calls(parse_tool_calls(text, "json")[1]) == [("get_weather", {"city": "Lima"})]
    assert parse_tool_calls(text, "json", names=["other"]) == (text, [])
    assert parse_tool_calls("The weather is fine.", "json") == ("The weather is fine.", [])


def test_tool_format_from_template():
    assert tool_format("{% if tools %}<tool_call>{% endif %}") == "qwen"
    assert tool_format("<|python_tag|>{{ x }}") == "llama3"
    assert tool_format("<start_of_turn>") == "json"


@pytest.mark.parametrize("fmt", ["qwen", "json"])
def test_stream_holds_back_a_call_and_streams_plain_text(fmt):
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    text = f"Sure.<tool_call>\n{call}\n</tool_call>" if fmt == "qwen" else call
    stream = ToolCallStream(fmt, ["get_weather"])
    sent = "".join(stream.feed(text[i : i + 3]) for i in range(0, len(text), 3))
    rest, calls = stream.finish()
    assert sent == ("Sure." if fmt == "qwen" else "")
    assert rest == "" and _calls(calls) == [("get_weather", {"city": "Paris"})]
    plain = ToolCallStream(fmt, ["get_weather"])
    assert "".join(plain.feed(p) for p in ["Hello", " <tool", " world"]) + plain.finish()[0] == (
        "Hello <tool world")


def test_check_tools_errors_name_the_field():
    with pytest.raises(ValueError, match=r"tools\[0\].function.name"):
        check_tools([{"type": "function", "function": {"name": "bad name"}}])
    with pytest.raises(ValueError, match=r"tools\[0\].function.parameters: json_schema is "):
        check_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}])
    with pytest.raises(ValueError, match="tool_choice names function"):
        check_tools([WEATHER], {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="needs tools"):
        check_tools(None, "required")
    assert check_tools([WEATHER], "auto").choice == "auto"


def test_required_choice_builds_a_grammar_in_each_format():
    spec = check_tools([WEATHER], "required")
    for fmt in ("qwen", "llama3", "json"):
        c = tool_constraint(spec, fmt)
        assert "get_weather" in c.grammar
    assert tool_constraint(check_tools([WEATHER], "auto"), "json") is None


def test_tool_history_becomes_plain_turns_for_a_template_without_tools():
    from llcuda.structured.tool_calls import chat_with_tools

    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
               {"role": "tool", "tool_call_id": "c2", "content": "windy"}]  # fmt: skip
    messages, kwargs = chat_with_tools("<start_of_turn>", history, check_tools([WEATHER]))
    assert kwargs == {}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "get_weather" in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == {"name": "get_weather",
                                                  "arguments": {"city": "Paris"}}
    assert messages[3]["content"] == "Result of c1: 18 C\n\nResult of c2: windy"
    # a template with tools gets them, and the history as it is
    same, kwargs = chat_with_tools("{{ tools }}", history, check_tools([WEATHER]))
    assert same is history and kwargs["tools"][0]["function"]["name"] == "get_weather"
    assert chat_with_tools("{{ tools }}", history, check_tools([WEATHER], "none"))[1] == {}
