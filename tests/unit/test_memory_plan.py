"""GPU memory planning: sizes add up, and a context that cannot fit fails before allocation."""

from __future__ import annotations

import pytest

from llcuda.config import EngineConfig, ModelConfig
from llcuda.engine.memory_plan import RESERVE_BYTES, check_fits, plan_gpu_memory

GEMMA_1B = ModelConfig(
    architecture="gemma3", name="g", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
    num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256, rms_norm_eps=1e-6,
    max_position_embeddings=32768, rope_theta=1e6, rope_theta_local=1e4,
)  # fmt: skip


def test_kv_cache_bytes_follow_the_cache_size():
    config = EngineConfig(ctx_size=4096, n_parallel=4, block_size=32)
    plan = plan_gpu_memory(
        GEMMA_1B, config, gpu_weight_bytes=800_000_000, num_gpu_layers=26, head_on_gpu=True
    )
    # (16384 / 32 + 1 scratch) blocks x 32 tokens x 1 head x 256 dims x fp16 x (K and V) x 26
    assert plan.kv_cache == 513 * 32 * 256 * 2 * 2 * 26
    assert plan.weights == int(800_000_000 * 1.03)
    assert plan.workspace > 2 * 4 * 262144 * 4  # at least the decode logits buffers


def test_a_context_that_cannot_fit_names_the_knobs():
    config = EngineConfig(ctx_size=131072, n_parallel=64)
    plan = plan_gpu_memory(GEMMA_1B, config, 800_000_000, 26, True)
    with pytest.raises(ValueError, match="ctx_size 131072 x n_parallel 64") as err:
        check_fits(plan, free_bytes=80 * 2**30, config=config, device="cuda:0")
    assert "MiB are free" in str(err.value)


def test_a_plan_that_fits_passes():
    config = EngineConfig(ctx_size=2048, n_parallel=8)
    plan = plan_gpu_memory(GEMMA_1B, config, 800_000_000, 26, True)
    check_fits(plan, free_bytes=plan.total + RESERVE_BYTES, config=config, device="cuda:0")
    with pytest.raises(ValueError):
        check_fits(plan, free_bytes=plan.total + RESERVE_BYTES - 1, config=config, device="cuda:0")


def test_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    import torch

    from llcuda.engine.memory_plan import use_expandable_segments

    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append,
                        raising=False)  # fmt: skip
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    assert use_expandable_segments() and calls == ["expandable_segments:True"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert not use_expandable_segments() and len(calls) == 1
