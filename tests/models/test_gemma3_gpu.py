"""The real Gemma 3 270M on the GPU path: against llama.cpp's golden data, as the CPU path is,
and against the CPU path itself; then through the whole engine (CUDA graphs, continuous batching).

The GPU path differs from the CPU one only in rounding: fp16 KV cache, bf16 tensor-core products
for prefill-sized matmuls (fp32 GEMV for decode). Those move log-probs by hundredths of a nat, so
the golden bounds of the CPU test hold unchanged.
"""

from __future__ import annotations

import pytest
import torch

from llcuda import InferenceEngine
from tests.models.forward_helpers import open_gemma, sequence_logits
from tests.models.test_engine_real_model import check_greedy_against_golden
from tests.models.test_gemma3_golden import check_teacher_forced_against_golden

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def gemma_gpu(real_model_path):
    gguf, model = open_gemma(real_model_path, "cuda")
    yield model
    gguf.close()


def test_gpu_teacher_forced_logprobs_match_llama_cpp(golden, gemma_gpu):
    check_teacher_forced_against_golden(golden, gemma_gpu)


def test_gpu_logprobs_close_to_cpu_path(golden, gemma_cpu, gemma_gpu):
    for case in golden["greedy"][:4]:
        tokens = case["prompt_ids"] + case["output_ids"]
        positions = list(range(len(case["prompt_ids"]) - 1, len(tokens)))
        cpu = torch.log_softmax(sequence_logits(gemma_cpu, tokens, positions), dim=-1)
        gpu = torch.log_softmax(sequence_logits(gemma_gpu, tokens, positions).cpu(), dim=-1)
        top = torch.topk(cpu, 5).indices  # [steps, 5]: compare where the probability is
        diff = (cpu.gather(1, top) - gpu.gather(1, top)).abs()
        assert diff.mean().item() < 0.06 and diff.max().item() < 0.6, (
            case["prompt"][:30],
            diff.mean().item(),
            diff.max().item(),
        )
        gap = torch.topk(cpu, 2).values[:, 0] - torch.topk(cpu, 2).values[:, 1]
        differ = cpu.argmax(-1) != gpu.argmax(-1)
        assert (gap[differ] < 0.1).all(), (case["prompt"][:30], gap[differ].tolist())


@pytest.fixture(scope="module")
def gpu_engine(real_model_path):
    e = InferenceEngine()
    e.load_model(
        real_model_path,
        ctx_size=1024,
        n_parallel=4,
        batch_size=256,
        ubatch_size=64,
        device="cuda",
        verbose=False,
    )
    yield e
    e.unload_model()


def test_gpu_engine_greedy_matches_llama_cpp(gpu_engine, golden):
    cases = golden["greedy"]
    results = gpu_engine.batch_infer([c["prompt"] for c in cases], max_tokens=16, temperature=0.0)
    check_greedy_against_golden(results, cases)


def test_gpu_engine_alone_matches_llama_cpp(gpu_engine, golden):
    """Each prompt alone (GEMV decode at M=1) as well as batched (tensor cores at larger M): on a
    GPU the two paths round differently, so both are held to llama.cpp rather than to each other."""
    cases = golden["greedy"][:6]
    results = [gpu_engine.infer(c["prompt"], max_tokens=16, temperature=0.0) for c in cases]
    check_greedy_against_golden(results, cases)
