"""StructuredOutput / request arguments: malformed schemas and grammars are ValueErrors naming the
problem; good ones compile."""

from __future__ import annotations

import pytest

from llcuda.sampling_params import SamplingParams
from llcuda.structured import StructuredOutput
from llcuda.structured.request_args import constraint_from_args


@pytest.mark.parametrize("kwargs, message", [
    ({"json_schema": {"type": "foo"}}, "Invalid type: foo"),
    ({"json_schema": '{"type": '}, "json_schema is not valid JSON"),
    ({"json_schema": [1, 2]}, "json_schema must be a JSON object"),
    ({"json_schema": {"$ref": "#/nowhere"}}, "does not exist"),
    ({"json_schema": {"enum": []}}, "Unsatisfiable"),
    ({"grammar": 'root ::= missing'}, "Rule 'missing' not found"),
    ({"grammar": 'root ::= "a" ('}, "grammar is not valid GBNF"),
    ({"grammar": ""}, "grammar must be a non-empty string"),
    ({"response_format": {"type": "xml"}}, "response_format.type must be"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
     "response_format.json_schema.schema is invalid"),
    ({"grammar": 'root ::= "a"', "json_schema": {}}, "cannot be combined"),
])  # fmt: skip
def test_bad_constraints_are_value_errors_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        constraint_from_args(**kwargs)


def test_good_constraints_compile():
    assert constraint_from_args(response_format={"type": "text"}) is None
    assert constraint_from_args() is None
    c = constraint_from_args(response_format={"type": "json_object"})
    assert c.kind == "json_object" and c.is_json
    c = constraint_from_args(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}})
    assert c.kind == "json_schema" and '"a"' in c.grammar
    assert constraint_from_args(grammar='root ::= "yes" | "no"').kind == "grammar"


def test_sampling_params_checks_the_field_type():
    with pytest.raises(ValueError, match="structured must be"):
        SamplingParams(structured={"type": "object"})
    assert SamplingParams(structured=StructuredOutput.json_object()).structured.is_json
