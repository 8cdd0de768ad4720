"""What a request's output must match: any JSON object, a JSON schema, or a grammar.

`StructuredOutput` is checked when it is made (a SamplingParams field, so at request time): a
malformed schema or grammar is a ValueError naming the problem, never a failure mid-generation.
The check needs no vocabulary; the matcher for a model's tokens is made when the engine admits the
request (grammar_state.py). Grammars are llguidance's: a JSON schema, GBNF (llama.cpp's grammar
format, what llama-server's `grammar` field takes) or Lark (used for tool-call formats).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import llguidance
from llguidance import LLMatcher

# JSON as json.dumps writes it ("a, b" and "k: v") and nothing else: no free whitespace, which a
# model can otherwise emit without end, and the separators most models write by themselves
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

KINDS = ("json_object", "json_schema", "grammar", "lark")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on one request's output.

    kind: "json_object" (any JSON object), "json_schema" (spec: the schema, a dict or its JSON
    text), "grammar" (spec: GBNF text) or "lark" (spec: llguidance Lark text).
    `grammar` is llguidance's serialized grammar, derived and validated on construction.
    """

    kind: str
    spec: Any = None
    grammar: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grammar", _compile(self.kind, self.spec))

    @classmethod
    def json_object(cls) -> StructuredOutput:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict | str) -> StructuredOutput:
        return cls("json_schema", schema)

    @classmethod
    def gbnf(cls, text: str) -> StructuredOutput:
        return cls("grammar", text)

    @property
    def is_json(self) -> bool:
        return self.kind in ("json_object", "json_schema")


def _compile(kind: str, spec: Any) -> str:
    if kind == "json_object":
        if spec is not None:
            raise ValueError("a json_object constraint takes no schema (use json_schema)")
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "json_schema":
        return _check("json_schema", LLMatcher.grammar_from_json_schema(
            _schema(spec), defaults=JSON_OPTIONS))  # fmt: skip
    if kind in ("grammar", "lark"):
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"{kind} must be a non-empty string, got {_show(spec)}")
        if kind == "lark":
            return _check("lark grammar", LLMatcher.grammar_from_lark(spec))
        try:
            grammar = llguidance.grammar_from("gbnf", spec)
        except ValueError as exc:  # "Failed to convert the grammar from GBNF to Lark: ..."
            raise ValueError(f"grammar is not valid GBNF: {exc}") from None
        return _check("grammar", grammar)
    raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {kind!r}")


def _schema(spec: Any) -> dict:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ValueError(f"json_schema is not valid JSON: {exc}") from None
    if isinstance(spec, bool):  # true / false are schemas too, but not of an object output
        raise ValueError(f"json_schema must be a JSON object (a schema), got {_show(spec)}")
    if not isinstance(spec, dict):
        raise ValueError(f"json_schema must be a JSON object (a schema), got {_show(spec)}")
    return spec


def _check(name: str, grammar: str) -> str:
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"{name} is invalid: {messages[0] if messages else 'unknown error'}")
    return grammar


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
