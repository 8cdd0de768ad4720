"""The ways a request names its constraint (OpenAI's response_format, llama-server's grammar and
json_schema, our StructuredOutput) turned into one StructuredOutput, or a ValueError naming the
argument."""

from __future__ import annotations

from typing import Any

from llcuda.structured.constraint import StructuredOutput


def constraint_from_args(response_format: Any = None, grammar: Any = None,
                         json_schema: Any = None) -> StructuredOutput | None:  # fmt: skip
    """At most one of: response_format ({"type": "text" | "json_object" | "json_schema"}),
    grammar (GBNF text), json_schema (a schema)."""
    given = [n for n, v in (("response_format", response_format), ("grammar", grammar),
                            ("json_schema", json_schema)) if v is not None]  # fmt: skip
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} cannot be combined: give one constraint")
    if grammar is not None:
        return StructuredOutput.gbnf(grammar)  # its errors start with "grammar"
    if json_schema is not None:
        return _schema("json_schema", json_schema)
    if response_format is None:
        return None
    return _response_format(response_format)


def _response_format(value: Any) -> StructuredOutput | None:
    if not isinstance(value, dict):
        raise ValueError(f"response_format must be an object with a 'type', got {value!r:.60}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        # llama-server's extension: {"type": "json_object", "schema": {...}}
        schema = value.get("schema")
        if schema is None:
            return StructuredOutput.json_object()
        return _schema("response_format.schema", schema)
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict):
            raise ValueError("response_format.json_schema must be an object "
                             '{"name": ..., "schema": {...}}')  # fmt: skip
        schema = inner.get("schema", inner.get("schema_"))
        if schema is None:
            raise ValueError("response_format.json_schema.schema is required")
        return _schema("response_format.json_schema.schema", schema)
    raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', "
                     f"got {kind!r:.60}")  # fmt: skip


def _schema(name: str, schema: Any) -> StructuredOutput:
    try:
        return StructuredOutput.json_schema(schema)
    except ValueError as exc:
        message = str(exc).removeprefix("json_schema ")
        raise ValueError(f"{name} {message}") from None
