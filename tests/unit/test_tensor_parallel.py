"""Tensor parallelism on the CPU (gloo): sharding exact, TP=2/4 equal to TP=1, failures clear.

The twins: llama (4 heads, 1 KV head: KV replicated at TP 2 and 4; a vocabulary of 1001 rows
that no TP size divides) and qwen3 (8 heads, 2 KV heads: split at TP 2, replicated at TP 4),
written in 32-element legacy quant types so that their row-parallel layers split at TP 4, and
qwen3 in the twins' K-quant mix at TP 2 (its attn_output and ffn_down inputs of 512 split into
whole 256-element blocks).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import time

import pytest
import torch

import llcuda.runner.model_runner as model_runner
from llcuda.api import InferenceEngine
from llcuda.config import EngineConfig
from llcuda.engine.loader import load
from llcuda.gguf.constants import GGMLType
from llcuda.gguf.model_config import model_config_from_gguf
from llcuda.gguf.reader import GGUFFile
from llcuda.gguf.twins import TWINS, write_spec, write_twin
from llcuda.layers.quant_tensor import QuantTensor
from llcuda.parallel.sharding import ShardPlan
from llcuda.sampling_params import SamplingParams

LEGACY = (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.F16)
PROMPTS = [[1, 5, 9, 33, 100, 7], [2, 7, 300]]
KV_WEIGHTS = ("attn_k.weight", "attn_v.weight", "attn_qkv.weight")  # KV rows may repeat


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp_twins")
    # a vocabulary of 1001 rows: the embedding and head shards are 501 + 500 rows at TP 2 and
    # 251 + 251 + 251 + 248 at TP 4 (the last logits shard padded for the gather)
    llama = dataclasses.replace(TWINS["llama"], vocab_size=1001)
    return {
        "llama": str(write_spec(root / "llama.gguf", llama, type_cycle=LEGACY)),
        "qwen3": str(write_twin(root / "qwen3.gguf", "qwen3", type_cycle=LEGACY)),
        "qwen3_kquant": str(write_twin(root / "qwen3_k.gguf", "qwen3")),
        # fused attn_qkv [q | k | v] and ffn_up [gate | up]: each rank takes a slice of each part
        "phi3": str(write_twin(root / "phi3.gguf", "phi3", type_cycle=LEGACY)),
    }


def _plans(path: str, tp: int) -> tuple[GGUFFile, list[ShardPlan]]:
    g = GGUFFile(path)
    config = model_config_from_gguf(g)
    return g, [ShardPlan(config, r, tp, g.tensors) for r in range(tp)]


# ------------------------------------------------------------------------ sharding, no processes


@pytest.mark.parametrize(
    ("twin", "tp"), [("qwen3_kquant", 2), ("llama", 4), ("qwen3", 4), ("phi3", 2)]
)
def test_shards_reassemble_the_tensor(twins, twin, tp):
    """Every rank's slice, dequantized, is the matching slice of the dequantized whole; the
    column-split ones concatenate back to it."""
    g, plans = _plans(twins[twin], tp)
    kv_replicated = plans[0].local_kv_heads * tp > plans[0].config.num_kv_heads
    with g:
        for name in g.tensors:
            if name.endswith("norm.weight") or name.endswith(".bias"):
                continue
            whole = QuantTensor.from_gguf(g, name)
            full = whole.dequantize()  # [rows, cols]
            parts = [plan.weight(name, whole) for plan in plans]
            split = plans[0].split(name)
            if split is None:
                assert all(p is whole for p in parts), name
                continue
            for plan, part in zip(plans, parts, strict=True):
                s = plan.split(name)
                expected = full
                if s.rows is not None:
                    expected = torch.cat([expected[a:b] for a, b in s.rows])
                if s.cols is not None:
                    expected = expected[:, s.cols[0] : s.cols[1]]
                assert torch.equal(part.dequantize(), expected), (name, plan.rank)
                # what the GPU memory check counts is what the rank holds
                assert plan.nbytes(name, g.tensors[name]) == part.nbytes, (name, plan.rank)
            if split.cols is not None:
                assert torch.equal(torch.cat([p.dequantize() for p in parts], dim=1), full)
            elif not (kv_replicated and name.endswith(KV_WEIGHTS)):
                # every row on exactly one rank
                rows = sorted(r for p in plans for a, b in p.split(name).rows for r in range(a, b))
                assert rows == list(range(full.shape[0])), name


def test_kv_heads_split_or_replicated(twins):
    g, plans = _plans(twins["qwen3"], 2)  # 2 KV heads: one each
    g.close()
    assert [(p.local_heads, p.local_kv_heads, p.first_kv_head) for p in plans] == [
        (4, 1, 0), (4, 1, 1),
    ]  # fmt: skip
    g, plans = _plans(twins["qwen3"], 4)  # replicated: ranks 0, 1 read KV head 0; 2, 3 head 1
    g.close()
    assert [p.first_kv_head for p in plans] == [0, 0, 1, 1]
    assert all(p.local_config.num_kv_heads == 1 for p in plans)
    g, plans = _plans(twins["llama"], 4)  # one KV head on every rank
    g.close()
    assert {(p.local_kv_heads, p.first_kv_head) for p in plans} == {(1, 0)}
    assert [(p.vocab_start, p.vocab_end) for p in plans] == [
        (0, 251), (251, 502), (502, 753), (753, 1001),
    ]  # fmt: skip


def test_shapes_that_do_not_split_are_named(twins):
    g = GGUFFile(twins["qwen3_kquant"])
    with g:
        config = model_config_from_gguf(g)
        plan = ShardPlan(config, 0, 4, g.tensors)  # 512 / 4 = 128: half a K-quant block
        with pytest.raises(ValueError, match=r"blk\.0\.\w+\.weight.*128 per rank.*blocks of 256"):
            plan.check(g.tensors)
        with pytest.raises(ValueError, match="does not divide the model's 8 attention heads"):
            ShardPlan(config, 0, 3, g.tensors)
        with pytest.raises(ValueError, match="rank 2 is outside"):
            ShardPlan(config, 2, 2, g.tensors)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(tensor_parallel_size=0)


def test_load_refuses_a_bad_split_before_starting_workers(twins):
    config = EngineConfig(ctx_size=64, device="cpu", tensor_parallel_size=4)
    with pytest.raises(ValueError, match="quant-block boundaries"):
        load(twins["qwen3_kquant"], config, verbose=False)


# ------------------------------------------------------------------------ whole engines, gloo


def _run(path: str, tp: int, monkeypatch) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of PROMPTS batched, and the log-probs of every sampling step."""
    logprobs: list[torch.Tensor] = []
    real = model_runner.sample  # both runners sample through ModelRunner.sample_requests

    def recording_sample(logits, *args, **kwargs):
        logprobs.append(torch.log_softmax(logits.float(), dim=-1).clone())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(model_runner, "sample", recording_sample)
    # ubatch 2: the prompts are fed in chunks of 2, and the first step samples nothing (every
    # rank then skips the head alike)
    config = EngineConfig(ctx_size=64, n_parallel=2, ubatch_size=2, device="cpu",
                          tensor_parallel_size=tp, extra={"tp_timeout_s": 60})  # fmt: skip
    loaded = load(path, config, verbose=False)
    try:
        outs = loaded.llm_engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4))
    finally:
        loaded.close()
    monkeypatch.undo()
    return [o.new_token_ids for o in outs], logprobs


@pytest.mark.parametrize(
    ("twin", "sizes"), [("llama", (2, 4)), ("qwen3", (4,)), ("qwen3_kquant", (2,))]
)
def test_tp_matches_tp1(twins, twin, sizes, monkeypatch):
    tokens, logprobs = _run(twins[twin], 1, monkeypatch)
    assert len(logprobs) >= 4 and all(len(t) == 4 for t in tokens)
    for tp in sizes:
        tp_tokens, tp_logprobs = _run(twins[twin], tp, monkeypatch)
        assert tp_tokens == tokens, tp
        assert len(tp_logprobs) == len(logprobs)
        for step, (a, b) in enumerate(zip(tp_logprobs, logprobs, strict=True)):
            # the same fp32 math in another summation order (row-parallel partial sums)
            torch.testing.assert_close(a, b, atol=2e-4, rtol=0, msg=f"tp={tp} step {step}")


def test_worker_death_is_a_clear_error(twins):
    """Through the public API: load_model(tensor_parallel_size=2), a worker killed mid-life."""
    engine = InferenceEngine()
    engine.load_model(twins["llama"], ctx_size=64, device="cpu", tensor_parallel_size=2,
                      verbose=False)  # fmt: skip
    try:
        assert engine.model_info()["tensor_parallel_size"] == 2
        assert engine.infer("hello", max_tokens=2, temperature=0).success
        (worker,) = engine._loaded.llm_engine.model_runner.workers.processes
        worker.kill()
        worker.join(10)
        result = engine.infer("hello", max_tokens=2, temperature=0)
        assert not result.success
        assert re.search(r"tensor-parallel step failed: rank 1 exited with code -9",
                         result.error_message)  # fmt: skip
        result = engine.infer("hello", max_tokens=2, temperature=0)
        assert not result.success and "shut down" in result.error_message
    finally:
        engine.unload_model()
    assert worker.exitcode is not None


def test_a_stalled_worker_times_out(twins):
    """A worker that stops answering (SIGSTOP) fails the step after tp_timeout_s, not never;
    a server idle for longer than that is fine (the workers wait for rank 0's next step as
    long as it lives)."""
    config = EngineConfig(ctx_size=64, device="cpu", tensor_parallel_size=2,
                          extra={"tp_timeout_s": 2})  # fmt: skip
    loaded = load(twins["llama"], config, verbose=False)
    (worker,) = loaded.llm_engine.model_runner.workers.processes
    try:
        time.sleep(3.0)  # idle past the timeout
        out = loaded.llm_engine.generate([PROMPTS[0]], SamplingParams(temperature=0,
                                                                      max_tokens=2))  # fmt: skip
        assert len(out[0].new_token_ids) == 2 and worker.exitcode is None
        os.kill(worker.pid, signal.SIGSTOP)
        with pytest.raises(RuntimeError, match="tensor-parallel step failed"):
            loaded.llm_engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=2))
    finally:
        worker.kill()  # SIGKILL ends a stopped process too
        loaded.close()
    assert worker.exitcode is not None
