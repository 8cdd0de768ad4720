"""`llcuda serve -tp 2` on the CPU: the HTTP server over a tensor-parallel engine (gloo), its
answers those of the same model at TP 1."""

from __future__ import annotations

import pytest

from llcuda.gguf.constants import GGMLType
from llcuda.gguf.twins import write_twin
from tests.e2e.conftest import start_server


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> str:
    # 32-element quant blocks: the row-parallel layers split at TP 2
    types = (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.F16)
    return str(write_twin(tmp_path_factory.mktemp("tp") / "qwen3.gguf", "qwen3", type_cycle=types))


def _complete(server, stream: bool) -> str:
    body = {"prompt": "hello there", "max_tokens": 6, "temperature": 0, "stream": stream}
    with server.client() as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        if not stream:
            return r.json()["choices"][0]["text"]
        assert r.text.rstrip().endswith("data: [DONE]")
        return r.text


def test_tp2_server_answers_as_tp1(qwen3):
    tp1 = start_server(qwen3)
    server = next(tp1)
    expected = _complete(server, stream=False)
    assert expected  # six tokens of text
    next(tp1, None)  # stop it
    tp2 = start_server(qwen3, tensor_parallel_size=2)
    server = next(tp2)
    try:
        assert server.engine.model_info()["tensor_parallel_size"] == 2
        assert _complete(server, stream=False) == expected
        assert "data: " in _complete(server, stream=True)
        with server.client() as c:
            assert "vllm:num_requests_running" in c.get("/metrics").text
    finally:
        next(tp2, None)
