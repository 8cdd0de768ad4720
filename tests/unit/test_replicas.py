"""Data-parallel replicas (server/replicas.py): least-outstanding routing, totals on /metrics."""

from __future__ import annotations

import re

import pytest

from llcuda import cli
from llcuda.gguf.synthetic import TINY, write_gemma3_gguf
from llcuda.server.metrics import engine_gauges, vllm_gauges
from llcuda.server.replicas import ReplicaSet


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    path = write_gemma3_gguf(tmp_path_factory.mktemp("replicas") / "tiny.gguf", **TINY)
    # not started: each stream's engine steps when the stream is consumed, so what is
    # outstanding is exactly what the test has not consumed yet
    rs = ReplicaSet.load(str(path), 2, verbose=False, ctx_size=64, n_parallel=4, device="cpu",
                         auto_start=False)  # fmt: skip
    yield rs
    rs.unload_model()


def test_requests_go_to_the_least_loaded_replica(replicas):
    streams = [replicas.infer_stream("hello", max_tokens=2, temperature=0) for _ in range(4)]
    assert replicas.outstanding() == [2, 2]
    # replica 0 finishes its two; the next two requests both go there, not round-robin
    for s in streams:
        if s in replicas._outstanding[0]:
            s.consume()
    assert replicas.outstanding() == [0, 2]
    more = [replicas.infer_stream("hi", max_tokens=2, temperature=0) for _ in range(2)]
    assert replicas.outstanding() == [2, 2]
    for s in streams + more:
        result = s.consume()
        assert result.success and result.tokens_generated == 2
    assert replicas.outstanding() == [0, 0]
    # both replicas really ran their requests
    assert all(e.num_steps > 0 for e in replicas.llm_engines)


def test_replicas_report_totals(replicas):
    one = engine_gauges(replicas.llm_engines[0], lambda: 0)
    both = engine_gauges(replicas.llm_engines, lambda: 0)
    assert both["llcuda_kv_cache_blocks_total"][1] == 2 * one["llcuda_kv_cache_blocks_total"][1]
    s = replicas.infer_stream("hello", max_tokens=4, temperature=0)
    (replica,) = [i for i in range(2) if s in replicas._outstanding[i]]
    replicas.engines[replica]._loop.run_once()  # admitted, prompt computed, one token out
    text = vllm_gauges(replicas.llm_engines, 'tiny "q"')
    assert 'vllm:num_requests_running{model_name="tiny \\"q\\""} 1' in text
    assert re.search(r'^vllm:num_requests_waiting\{model_name=".*"\} 0$', text, re.M)
    usage = re.search(r"^vllm:kv_cache_usage_perc\{.*\} (.*)$", text, re.M).group(1)
    assert 0 < float(usage) < 1
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        assert f"# TYPE {name} gauge" in text
    s.consume()
    info = replicas.model_info()
    assert (info["replicas"], info["replica_devices"]) == (2, ["cpu", "cpu"])
    assert replicas.tokenize("hello") == replicas.engines[1].tokenize("hello")


def test_bad_replica_counts_are_refused():
    with pytest.raises(ValueError, match="replicas must be an integer >= 1"):
        ReplicaSet.load("unused.gguf", 0)
    with pytest.raises(ValueError, match="at least one loaded engine"):
        ReplicaSet([])


def test_cli_flags():
    args = cli.build_parser().parse_args(["serve", "m.gguf", "--replicas", "3", "-tp", "2"])
    assert (args.replicas, args.tensor_parallel_size) == (3, 2)
    args = cli.build_parser().parse_args(["generate", "x", "-tp", "4"])
    assert cli._engine_extra(args)["tensor_parallel_size"] == 4
    assert "tensor_parallel_size" not in cli._engine_extra(
        cli.build_parser().parse_args(["generate", "x"])
    )


def test_a_chat_with_tools_gets_its_parser(replicas):
    """The server asks its engine for the tool-call parser; a ReplicaSet answers for all."""
    from llcuda.structured.tool_calls import ToolCallStream, check_tools

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    assert isinstance(replicas._tool_call_stream(check_tools(tools, "auto")), ToolCallStream)
    assert replicas._tool_call_stream(check_tools(tools, "none")) is None
    assert replicas._tool_call_stream(None) is None
