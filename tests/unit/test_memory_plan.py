"""Memory planning on the GPU and in host RAM: sizes add up, a context that cannot fit fails
before allocation, and a context past the trained one warns."""

from __future__ import annotations

import warnings

import pytest
import torch

from llcuda.config import EngineConfig, ModelConfig
from llcuda.engine.memory_plan import (
    HOST_RESERVE_BYTES,
    RESERVE_BYTES,
    WEIGHT_OVERHEAD,
    available_host_memory,
    check_fits,
    check_host_memory,
    plan_gpu_memory,
    plan_host_memory,
    warn_beyond_trained_context,
)

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
    assert plan.weights == int(800_000_000 * WEIGHT_OVERHEAD)
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


# ------------------------------------------------------------------- host RAM (the CPU path)

GEMMA_270M = ModelConfig(
    architecture="gemma3", name="Gemma 3 270m", vocab_size=262144, hidden_size=640,
    intermediate_size=2048, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256,
    rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=1e6, rope_theta_local=1e4,
    sliding_window=512, sliding_window_layers=tuple(i % 6 != 5 for i in range(18)),
)  # fmt: skip


class _Info:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


CPU = torch.device("cpu")


def _tensors(num_layers: int) -> dict:
    tensors = {f"blk.{i}.attn_q.weight": _Info(1000) for i in range(num_layers)}
    tensors["token_embd.weight"] = _Info(50_000)
    tensors["output_norm.weight"] = _Info(7)
    return tensors


def test_host_kv_cache_is_fp32_without_a_scratch_block():
    config = EngineConfig(ctx_size=4096, n_parallel=4, block_size=32, device="cpu")
    plan = plan_host_memory(GEMMA_1B, config, host_weight_bytes=123, host_layers=range(26))
    # 16384 / 32 blocks x 32 tokens x 1 head x 256 dims x fp32 x (K and V) x 26 layers
    assert plan.kv_cache == 512 * 32 * 256 * 4 * 2 * 26
    assert plan.weights == 123
    assert plan.workspace > 4 * 262144 * 4  # at least the logits of the n_parallel sequences
    # layers on the GPU keep their cache there
    assert plan_host_memory(GEMMA_1B, config, 0, range(13)).kv_cache == plan.kv_cache // 2


def test_sliding_window_layers_hold_their_own_small_pool_in_ram():
    config = EngineConfig(ctx_size=10**7, n_parallel=1, device="cpu")
    plan = plan_host_memory(GEMMA_270M, config, 0, range(18))
    full_layers = 3  # one in six attends to the whole context: they hold nearly everything
    assert plan.kv_cache // (10**7 * 256 * 4 * 2 * full_layers) == 1
    assert plan.kv_cache > 61 * 10**9  # what killed the process: touched by torch.zeros


def test_check_host_memory_names_the_knobs_and_the_bytes():
    config = EngineConfig(ctx_size=10**7, n_parallel=2, device="cpu")
    with pytest.raises(ValueError) as err:
        check_host_memory(_tensors(18), GEMMA_270M, config, [CPU] * 18, CPU,
                          available=16 * 2**30)  # fmt: skip
    message = str(err.value)
    for words in ("does not fit on cpu", "ctx_size 10000000 x n_parallel 2", "cache_size",
                  "16,384 MiB are available in RAM (MemAvailable) (17,179,869,184 bytes)"):
        assert words in message, message


def test_check_host_memory_counts_only_what_stays_on_the_host():
    config = EngineConfig(ctx_size=2048, n_parallel=1, device="cpu")
    on_cpu = check_host_memory(_tensors(18), GEMMA_270M, config, [CPU] * 18, CPU,
                               available=2**40)  # fmt: skip
    assert on_cpu.weights == 18 * 1000 + 50_000 + 7
    gpu = torch.device("cuda", 0)
    half = check_host_memory(_tensors(18), GEMMA_270M, config, [CPU] * 9 + [gpu] * 9, gpu,
                             available=2**40)  # fmt: skip
    assert half.weights == 9 * 1000 + 7  # the tied head (token_embd) sits on the GPU
    assert 0 < half.kv_cache < on_cpu.kv_cache
    # a plan that fits exactly passes, one byte less does not
    need = on_cpu.total + HOST_RESERVE_BYTES
    check_host_memory(_tensors(18), GEMMA_270M, config, [CPU] * 18, CPU, available=need)
    with pytest.raises(ValueError):
        check_host_memory(_tensors(18), GEMMA_270M, config, [CPU] * 18, CPU,
                          available=need - 1)  # fmt: skip


def test_available_host_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683772 kB\nMemFree:  100 kB\n"
                       "MemAvailable:   23196240 kB\n")  # fmt: skip
    assert available_host_memory(str(meminfo)) == 23196240 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")
    assert available_host_memory(str(meminfo)) is None
    assert available_host_memory(str(tmp_path / "absent")) is None


def test_ctx_size_above_the_trained_context_warns():
    with pytest.warns(UserWarning, match="ctx_size 40000 is above the 32768 positions"):
        warn_beyond_trained_context(GEMMA_270M, EngineConfig(ctx_size=40000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_beyond_trained_context(GEMMA_270M, EngineConfig(ctx_size=32768))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from llcuda.gguf.synthetic import TINY, write_gemma3_gguf

    path = tmp_path_factory.mktemp("m") / "tiny.gguf"
    return write_gemma3_gguf(path, **TINY, context_length=256)


def test_load_refuses_a_context_beyond_ram_before_allocating(tiny_path, monkeypatch):
    """load_model(ctx_size=10**9) on the CPU: a ValueError at once, and neither the model nor a
    KV cache was ever built (this is what OOM-killed the process or failed after 77 s)."""
    from llcuda import InferenceEngine
    from llcuda.engine import loader, memory_plan

    monkeypatch.setattr(memory_plan, "available_host_memory", lambda: 8 * 2**30)

    def must_not_run(*args, **kwargs):
        raise AssertionError("allocation started before the memory check")

    monkeypatch.setattr(loader, "build_model", must_not_run)
    engine = InferenceEngine()
    with pytest.warns(UserWarning, match="above the 256 positions"):
        wanted = "cache_size 1000000000, shared by n_parallel 4 sequences of up to ctx_size 10"
        with pytest.raises(ValueError, match=wanted):
            engine.load_model(str(tiny_path), ctx_size=10**9, device="cpu", verbose=False,
                              auto_start=False)  # fmt: skip


def test_load_within_ram_warns_once_past_the_trained_context(tiny_path):
    from llcuda import InferenceEngine

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        engine = InferenceEngine()
        engine.load_model(str(tiny_path), ctx_size=512, device="cpu", verbose=False,
                          auto_start=False)  # fmt: skip
        engine.unload_model()
    mine = [w for w in seen if "trained for" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in seen]
