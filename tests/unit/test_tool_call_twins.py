"""tool_choice "required" end to end on the Qwen2.5 and Llama 3 twins (BPE vocabularies), each
with a chat template in its family's tool format: the forced call parses into tool_calls."""

from __future__ import annotations

import json

import pytest

from llcuda.api import InferenceEngine
from llcuda.gguf.twins import write_twin

# the families' tool sections, cut to what selects the format (the real templates are longer)
QWEN_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}\nAnswer with <tool_call>\n"
    '{"name": ..., "arguments": ...}\n</tool_call><|im_end|>\n{%- endif %}'
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "<|begin_of_text|>{%- if tools %}<|start_header_id|>system<|end_header_id|>\n\n"
    "Environment: ipython\n{{ tools | tojson }}<|eot_id|>{%- endif %}"
    "{%- for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content }}<|eot_id|>{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {
        "type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}  # fmt: skip


@pytest.mark.parametrize("twin, template, fmt", [("qwen2", QWEN_TEMPLATE, "qwen"),
                                                 ("llama3", LLAMA3_TEMPLATE, "llama3")])
def test_required_tool_call_parses_on_the_twin(tmp_path, twin, template, fmt):
    path = write_twin(tmp_path / f"{twin}.gguf", twin)
    engine = InferenceEngine()
    engine.load_model(str(path), ctx_size=1024, n_parallel=2, device="cpu", verbose=False,
                      chat_template=template)  # fmt: skip
    try:
        assert engine._tool_format() == fmt
        out = engine.create_chat_completion([{"role": "user", "content": "weather?"}],
                                            tools=[TOOL], tool_choice="required", max_tokens=80)
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        call = choice["message"]["tool_calls"][0]["function"]
        args = json.loads(call["arguments"])
        assert call["name"] == "get_weather" and args["city"] in ("Paris", "Rome")
        assert 1 <= args["days"] <= 7
        streamed = list(engine.create_chat_completion(
            [{"role": "user", "content": "weather?"}], tools=[TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=80, stream=True))  # fmt: skip
        deltas = [c["choices"][0]["delta"] for c in streamed]
        assert not "".join(d.get("content") or "" for d in deltas)
        assert [d["tool_calls"][0]["function"]["name"] for d in deltas if "tool_calls" in d] == [
            "get_weather"]
        assert streamed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    finally:
        engine.unload_model()
