"""Constrained decoding in the engine on the tiny synthetic Gemma 3 (CPU): many random schemas,
every output parses and validates; constrained and free requests share a batch; a grammar's EOS
comes only where it may end."""

from __future__ import annotations

import json
import random

import pytest

from llcuda.api import InferenceEngine
from llcuda.config import EngineConfig
from llcuda.engine.loader import load
from llcuda.gguf.synthetic import TINY, write_gemma3_gguf
from llcuda.sampling_params import SamplingParams
from llcuda.structured import StructuredOutput

NUM_SCHEMAS = 16


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_gemma3_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", **TINY)


@pytest.fixture(scope="module")
def loaded(tiny_path):
    """A bare engine, stepped by the test alone (an InferenceEngine's loop thread steps its own)."""
    config = EngineConfig(ctx_size=512, n_parallel=16, batch_size=512, ubatch_size=128,
                          device="cpu", gpu_layers=0)  # fmt: skip
    model = load(str(tiny_path), config, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def engine(tiny_path):
    eng = InferenceEngine()
    eng.load_model(str(tiny_path), ctx_size=512, n_parallel=4, device="cpu", verbose=False)
    yield eng
    eng.unload_model()


# --- a generator of schemas, and a validator for the subset it writes ---------------------------

_STRINGS = ['plain', 'quo"te', 'back\\slash', 'new\nline', 'tab\t', 'unicodé ✓']


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["enum", "integer", "number", "string", "boolean"]
    if depth < 2:
        kinds += ["object", "object", "array"]
    kind = rng.choice(kinds)
    if kind == "enum":
        return {"enum": rng.sample(_STRINGS, rng.randint(1, 3)) + rng.sample([1, 2.5, None], 1)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        # multipleOf bounds the fraction's digits: the tiny model would write 5.4444... forever
        return {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.25}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 8)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1),
                "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}  # fmt: skip
    names = rng.sample(["id", "name", "tags", "x y", 'q"k', "nested", "value"], rng.randint(1, 4))
    props = {n: random_schema(rng, depth + 1) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}  # fmt: skip


def validate(value, schema: dict, path: str = "$") -> None:
    """Raise AssertionError where `value` breaks `schema` (the generator's subset)."""
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
        return
    kind = schema["type"]
    if kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: {value!r}"
        assert schema["minimum"] <= value <= schema["maximum"], f"{path}: {value} out of range"
    elif kind == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{path}"
        assert schema["minimum"] <= value <= schema["maximum"], f"{path}: {value} out of range"
        assert (value / schema["multipleOf"]).is_integer(), f"{path}: {value}"
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema["maxLength"], f"{path}: {value!r}"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{path}: {value!r}"
    elif kind == "array":
        assert isinstance(value, list), f"{path}: {value!r}"
        assert schema["minItems"] <= len(value) <= schema["maxItems"], f"{path}: {len(value)}"
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]")
    else:
        assert isinstance(value, dict), f"{path}: {value!r}"
        assert set(value) <= set(schema["properties"]), f"{path}: extra keys {set(value)}"
        assert set(schema["required"]) <= set(value), f"{path}: missing keys"
        for key, item in value.items():
            validate(item, schema["properties"][key], f"{path}.{key}")


def test_validator_catches_a_wrong_value():
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
              "maximum": 3}}, "required": ["a"], "additionalProperties": False}  # fmt: skip
    validate({"a": 2}, schema)
    for bad in ({"a": 7}, {}, {"a": 1, "b": 2}, {"a": "1"}):
        with pytest.raises(AssertionError):
            validate(bad, schema)


def test_random_schemas_all_give_valid_json(loaded):
    rng = random.Random(19)
    schemas = [random_schema(rng) for _ in range(NUM_SCHEMAS)]
    tok, llm = loaded.tokenizer, loaded.llm_engine
    prompts = [tok.encode(f"schema {i}:") for i in range(NUM_SCHEMAS)]
    params = [SamplingParams(max_tokens=200, temperature=1.0, seed=i, top_k=0, top_p=1.0,
                             min_p=0.0, structured=StructuredOutput.json_schema(s))
              for i, s in enumerate(schemas)]  # fmt: skip
    outs = llm.generate(prompts, params)
    for schema, out in zip(schemas, outs, strict=True):
        text = tok.decode(out.new_token_ids)
        assert out.finish_reason == "stop", (schema, text)
        validate(json.loads(text), schema)


def test_constrained_and_free_rows_share_a_batch(loaded):
    tok, llm = loaded.tokenizer, loaded.llm_engine
    prompt = tok.encode("mixed batch")
    free = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = llm.generate([prompt], [free])[0].new_token_ids
    constraint = StructuredOutput.gbnf('root ::= "yes" | "no" | [0-9] [0-9]')
    params = [free, SamplingParams(max_tokens=24, temperature=0.0, structured=constraint)] * 3
    outs = llm.generate([prompt] * 6, params)
    for out in outs[0::2]:  # the free rows are what they are alone
        assert out.new_token_ids == alone
    for out in outs[1::2]:
        text = tok.decode(out.new_token_ids)
        assert text in ("yes", "no") or (len(text) == 2 and text.isdigit()), text
        assert out.finish_reason == "stop"


def test_eos_only_where_the_grammar_may_end(loaded):
    """The free row ends by EOS early (ignore_eos off); "a"{5,} must run five tokens at least."""
    tok, llm = loaded.tokenizer, loaded.llm_engine
    constraint = StructuredOutput.gbnf('root ::= "a" "a" "a" "a" "a" ("a")*')
    out = llm.generate([tok.encode("eos")], [SamplingParams(max_tokens=40, temperature=0.0,
                                                            structured=constraint)])[0]
    text = tok.decode(out.new_token_ids)
    assert set(text) == {"a"} and len(text) >= 5
    if out.finish_reason == "stop":
        assert out.new_token_ids[-1] in llm.eog_ids


def test_infer_and_chat_return_parsed_json_and_tool_calls(engine):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}  # fmt: skip
    r = engine.infer("json please", max_tokens=40, temperature=0.0, json_schema=schema)
    assert r.finish_reason == "stop" and r.parsed in ({"ok": True}, {"ok": False})
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"enum": ["a", "b"]}}, "required": ["q"],
        "additionalProperties": False}}}  # fmt: skip
    r = engine.chat([{"role": "user", "content": "hi"}], max_tokens=60, temperature=0.0,
                    tools=[tool], tool_choice="required")  # fmt: skip
    assert r.tool_calls and r.tool_calls[0]["function"]["name"] == "lookup"
    assert json.loads(r.tool_calls[0]["function"]["arguments"])["q"] in ("a", "b")
    with pytest.raises(ValueError, match="cannot be combined"):
        engine.chat([{"role": "user", "content": "hi"}], tools=[tool], tool_choice="required",
                    response_format={"type": "json_object"})  # fmt: skip
