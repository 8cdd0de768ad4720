"""Tensor parallelism on two GPUs (NCCL): TP 2 against TP 1 on the same GPU path.

tests/unit/test_tensor_parallel.py checks the same on the CPU (gloo) to float rounding. Here the
ranks' matmuls have other shapes than TP 1's (the GPU kernels pick split-K and tile sizes by
shape, prefill-sized products round to bf16), so log-probs move by the GPU path's own spread
(tests/kernels/test_gpu_archs.py's bounds); a greedy pick may differ only at a near-tie.
Needs two CUDA devices (a multi-GPU device kind): skipped on one.
"""

from __future__ import annotations

import pytest
import torch

import llcuda.parallel.runner as tp_runner
import llcuda.runner.model_runner as model_runner
from llcuda.api import InferenceEngine
from llcuda.config import EngineConfig
from llcuda.engine.loader import load
from llcuda.gguf.twins import write_twin
from llcuda.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
    ),
]

GPU_MEAN_TOL = 0.05
GPU_MAX_TOL = 0.3
NEAR_TIE = 0.1
PROMPTS = [[1, 5, 9, 33, 100, 7, 8, 200, 31], [2, 7, 300]]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> str:
    # the twins' K-quant mix: attn_output's and ffn_down's 512 inputs split into 256-blocks
    return str(write_twin(tmp_path_factory.mktemp("tp_gpu") / "qwen3.gguf", "qwen3"))


def _run(path: str, tp: int, monkeypatch) -> tuple[list[list[int]], list[torch.Tensor]]:
    logprobs: list[torch.Tensor] = []
    module = tp_runner if tp > 1 else model_runner
    real = module.sample

    def recording_sample(logits, *args):
        logprobs.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        return real(logits, *args)

    monkeypatch.setattr(module, "sample", recording_sample)
    # one token per step at TP 1 too (no bursts, no graphs), so the steps pair up
    config = EngineConfig(ctx_size=128, n_parallel=2, device="cuda", tensor_parallel_size=tp,
                          num_scheduler_steps=1, extra={"warm_up": False, "cuda_graphs": False,
                                                         "tp_timeout_s": 120})  # fmt: skip
    loaded = load(path, config, verbose=False)
    try:
        outs = loaded.llm_engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))
    finally:
        loaded.close()
    monkeypatch.undo()
    return [o.new_token_ids for o in outs], logprobs


def test_tp2_matches_tp1_on_gpus(qwen3, monkeypatch):
    tokens, logprobs = _run(qwen3, 1, monkeypatch)
    tp_tokens, tp_logprobs = _run(qwen3, 2, monkeypatch)
    assert len(tp_logprobs) == len(logprobs)
    diffs = []
    for a, b in zip(tp_logprobs, logprobs, strict=True):  # [num_seqs, vocab] per step
        top = torch.topk(b, 5).indices
        diffs.append((a.gather(1, top) - b.gather(1, top)).abs())
        picked_a, picked_b = a.argmax(-1), b.argmax(-1)
        if not torch.equal(picked_a, picked_b):  # allowed at a near-tie, then paths diverge
            gaps = b.gather(1, picked_b[:, None]) - b.gather(1, picked_a[:, None])
            assert gaps.max().item() < NEAR_TIE
            break
    diff = torch.cat(diffs)
    assert diff.mean().item() < GPU_MEAN_TOL and diff.max().item() < GPU_MAX_TOL, (
        diff.mean().item(), diff.max().item())  # fmt: skip


def test_a_dead_gpu_worker_is_a_clear_error(qwen3):
    engine = InferenceEngine()
    engine.load_model(qwen3, ctx_size=128, device="cuda", tensor_parallel_size=2, verbose=False)
    try:
        assert engine.infer("hello", max_tokens=2, temperature=0).success
        (worker,) = engine._loaded.llm_engine.model_runner.workers.processes
        worker.kill()
        worker.join(10)
        result = engine.infer("hello", max_tokens=2, temperature=0)
        assert not result.success and "rank 1 exited" in result.error_message
    finally:
        engine.unload_model()
