"""Tool calls: the chat formats our architectures' models write them in, parsed into OpenAI's
`tool_calls`, and the grammar that forces one (tool_choice "required" or a named function).

Formats (`tool_format` picks one from the chat template's source):
- "qwen": Qwen2.5 / Qwen3 / Hermes:
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, possibly several; the text
  around them is content.
- "llama3": Llama 3.1-3.3 JSON tool calling: `<|python_tag|>` (a control token, absent from the
  text) then `{"name": ..., "parameters": {...}}`, several separated by ";".
- "json": everything else (Gemma, SmolLM2, templates without tools): the answer is a JSON object
  `{"name": ..., "arguments": {...}}` (or a list of them), possibly in a ```json fence.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llcuda.engine.llm_engine import partial_stop_len
from llcuda.structured.constraint import JSON_OPTIONS, StructuredOutput

FORMATS = ("qwen", "llama3", "json")
_ARGS_KEY = {"qwen": "arguments", "llama3": "parameters", "json": "arguments"}
_QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def tool_format(template_source: str | None) -> str:
    """The tool-call format a chat template's model writes."""
    source = template_source or ""
    if "<tool_call>" in source:
        return "qwen"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3"
    return "json"


@dataclass
class ToolSpec:
    """The checked `tools` and `tool_choice` of one request."""

    tools: list[dict]  # OpenAI's [{"type": "function", "function": {name, description, ...}}]
    choice: str  # "auto" | "none" | "required" | a function's name

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]


def check_tools(tools: Any, tool_choice: Any = None) -> ToolSpec | None:
    """`tools` / `tool_choice` as OpenAI sends them, checked; None without tools. ValueError
    names the field: "tools[1].function.name must be a non-empty string", ..."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise ValueError(f"tool_choice {_short(tool_choice)} needs tools")
        return None
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of {type: function, function: {...}}")
    checked = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] must be an object with type 'function'")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"tools[{i}].function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -, "
                             f"got {_short(name)}")  # fmt: skip
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        try:
            StructuredOutput.json_schema(params)
        except ValueError as exc:
            raise ValueError(f"tools[{i}].function.parameters: {exc}") from None
        checked.append({"type": "function", "function": {**fn, "parameters": params}})
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise ValueError(f"tools: function names must be unique, got {names}")
    if tool_choice is None:
        choice = "auto"
    elif tool_choice in ("auto", "none", "required"):
        choice = tool_choice
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        choice = tool_choice["function"].get("name")
        if choice not in names:
            raise ValueError(f"tool_choice names function {_short(choice)}, not one of {names}")
    else:
        raise ValueError("tool_choice must be 'auto', 'none', 'required' or "
                         f"{{type: function, function: {{name}}}}, got {_short(tool_choice)}")
    return ToolSpec(checked, choice)


def tool_constraint(spec: ToolSpec, fmt: str) -> StructuredOutput | None:
    """The grammar of one call, in format `fmt`, to the named function or (required) any of
    them; None for auto / none (the model chooses; its output is parsed afterwards)."""
    if spec.choice in ("auto", "none"):
        return None
    tools = [t for t in spec.tools if spec.choice == "required" or t["function"]["name"] ==
             spec.choice]  # fmt: skip
    key = _ARGS_KEY[fmt]
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                key: t["function"]["parameters"]},
              "required": ["name", key], "additionalProperties": False} for t in tools]  # fmt: skip
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if fmt != "qwen":
        return StructuredOutput.json_schema(schema)
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    return StructuredOutput("lark", f'start: "<tool_call>\\n" call "\\n</tool_call>"\n'
                                    f"call: %json {json.dumps(schema)}\n")  # fmt: skip


def tools_system_prompt(spec: ToolSpec) -> str:
    """For a chat template that takes no tools: what the model is told (the "json" format)."""
    listing = "\n".join(json.dumps(t["function"]) for t in spec.tools)
    return ("You can call these functions:\n" + listing + "\nTo call one, answer with only a "
            'JSON object {"name": <function name>, "arguments": <its arguments>}.')  # fmt: skip


def parse_tool_calls(text: str, fmt: str, names: Sequence[str] | None = None
                     ) -> tuple[str | None, list[dict]]:  # fmt: skip
    """(content, tool_calls) of a model's answer in format `fmt`.

    tool_calls are OpenAI's [{"id", "type": "function", "function": {"name", "arguments"}}]
    with arguments as JSON text. A call whose JSON does not parse, or (with `names`) names no
    known function, is left in the content: the answer is then plain text, as the model wrote it.
    """
    if fmt == "qwen":
        calls, spans = [], []
        for m in _QWEN_CALL.finditer(text):
            call = _as_call(m.group(1), names)
            if call is not None:
                calls.append(call)
                spans.append(m.span())
        if not calls:  # a model that left the markers out: a bare JSON call, as "json"
            return parse_tool_calls(text, "json", names)
        content, last = [], 0
        for start, end in spans:
            content.append(text[last:start])
            last = end
        content.append(text[last:])
        rest = "".join(content).strip()
        return rest or None, calls
    body = text.strip()
    fence = _FENCE.match(body)
    if fence:
        body = fence.group(1)
    parts = [body]
    if fmt == "llama3" and ";" in body:
        parts = [p for p in (s.strip() for s in body.split(";")) if p]
    calls = []
    for part in parts:
        found = _as_calls(part, names)
        if found is None:
            return text, []
        calls.extend(found)
    return None, calls


def _as_calls(text: str, names: Sequence[str] | None) -> list[dict] | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    items = value if isinstance(value, list) else [value]
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        items = value["tool_calls"]
    calls = [_call_of(item, names) for item in items]
    return None if not calls or any(c is None for c in calls) else calls


def _as_call(text: str, names: Sequence[str] | None) -> dict | None:
    calls = _as_calls(text, names)
    return calls[0] if calls and len(calls) == 1 else None


def _call_of(item: Any, names: Sequence[str] | None) -> dict | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):  # OpenAI's own shape, echoed by some models
        item = item["function"]
    name = item.get("name")
    if not isinstance(name, str) or (names is not None and name not in names):
        return None
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    arguments = json.dumps(args, ensure_ascii=False)
    return {"id": f"call_{os.urandom(12).hex()}", "type": "function",
            "function": {"name": name, "arguments": arguments}}  # fmt: skip


class ToolCallStream:
    """Streams content while it cannot be a tool call, holds back what may be one.

    feed(piece) -> content to send now; finish() -> (content left, tool_calls). A "qwen" answer
    streams until `<tool_call>` starts; a "json"/"llama3" one is held if it starts with `{`,
    `[` or a fence (a call is the whole answer), else streamed as it comes.
    """

    def __init__(self, fmt: str, names: Sequence[str] | None = None) -> None:
        self.fmt, self.names = fmt, names
        self._text = ""  # everything so far
        self._sent = 0  # characters of it already sent as content
        self._held = False  # from _sent on, the text may be a tool call

    def feed(self, piece: str) -> str:
        self._text += piece
        if self._held:
            return ""
        if self.fmt == "qwen":
            marker = "<tool_call>"
            at = self._text.find(marker, self._sent)
            if at >= 0:
                out, self._sent, self._held = self._text[self._sent : at], at, True
                return out
            keep = partial_stop_len(self._text, [marker])  # may be the marker's beginning
            end = max(len(self._text) - keep, self._sent)
            out, self._sent = self._text[self._sent : end], end
            return out
        head = self._text.lstrip()
        if not head:
            return ""
        if head[0] in "{[`" and self._sent == 0:
            self._held = True
            return ""
        out, self._sent = self._text[self._sent :], len(self._text)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        rest = self._text[self._sent :]
        if not self._held:
            return rest, []
        content, calls = parse_tool_calls(rest, self.fmt, self.names)
        return (content or "") if calls else rest, calls


def _short(value: Any) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:60] + "..."


def chat_with_tools(template_source: str, messages: list[dict], spec: ToolSpec | None
                    ) -> tuple[list[dict], dict]:  # fmt: skip
    """(messages, render keyword arguments) that show `spec`'s tools to the model: through the
    template's own `tools` variable where it has one, else as a system message (the "json"
    format's instructions), with earlier calls and their results written as plain turns (such
    templates refuse a "tool" role). tool_choice "none" shows no tools."""
    if "tools" in template_source:
        return messages, ({"tools": spec.tools} if spec is not None and spec.choice != "none"
                          else {})  # fmt: skip
    messages = _history_as_text(messages)
    if spec is None or spec.choice == "none":
        return messages, {}
    prompt = tools_system_prompt(spec)
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{prompt}"}
        return [first, *messages[1:]], {}
    return [{"role": "system", "content": prompt}, *messages], {}


def _history_as_text(messages: list[dict]) -> list[dict]:
    """Assistant tool_calls as the JSON the model was asked to write, "tool" results as user
    turns; consecutive turns of one role joined (templates that want user/model alternation)."""
    out: list[dict] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls:
            written = [json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)},
                                  ensure_ascii=False) for c in calls]  # fmt: skip
            content = "\n".join([content, *written]) if content else "\n".join(written)
            m = {"role": "assistant", "content": content}
        elif role == "tool":
            name = m.get("name") or m.get("tool_call_id") or "the tool"
            m = {"role": "user", "content": f"Result of {name}: {content}"}
        elif "tool_calls" in m:
            m = {k: v for k, v in m.items() if k != "tool_calls"}
        if out and out[-1]["role"] == m["role"] and m["role"] != "system":
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{m['content']}"}
        else:
            out.append(m)
    return out


def _arguments(call: dict) -> Any:
    args = call.get("function", {}).get("arguments", {})
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args
