"""What a model and its KV cache will take on the GPU, checked before anything is allocated.

A ctx_size / cache_size / n_parallel that cannot fit must fail at once with numbers, not with an
out-of-memory error halfway through loading (or, worse, at the first long request).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from llcuda.config import EngineConfig, ModelConfig
from llcuda.engine.kv_cache_manager import kv_cache_groups
from llcuda.runner.cuda_graphs import PREFILL_BUCKETS

KV_BYTES_PER_ELEMENT = 2  # fp16 cache on the GPU
# Triton repacking stores Q4_K / Q5_K scales unpacked (<= 1.03x the raw blocks)
WEIGHT_OVERHEAD = 1.03
RESERVE_BYTES = 512 * 2**20  # CUDA context extras, allocator slack, Triton modules


@dataclass(frozen=True)
class MemoryPlan:
    weights: int  # bytes of weights placed on the GPU
    kv_cache: int  # bytes of the paged K/V cache on the GPU
    workspace: int  # activations of the largest step and the decode graphs' logits buffers

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace


def plan_gpu_memory(
    model: ModelConfig,
    config: EngineConfig,
    gpu_weight_bytes: int,
    num_gpu_layers: int,
    head_on_gpu: bool,
) -> MemoryPlan:
    # per cache group (sliding-window layers keep a pool of their own): its blocks + 1 scratch
    # block, on each of its layers that sits on the GPU (the last num_gpu_layers)
    block_bytes = (config.block_size * model.num_kv_heads * model.head_dim
                   * KV_BYTES_PER_ELEMENT * 2)  # fmt: skip
    first_gpu_layer = model.num_layers - num_gpu_layers
    kv = sum(
        (group.num_blocks + 1) * block_bytes * sum(1 for i in group.layers if i >= first_gpu_layer)
        for group in kv_cache_groups(model, config)
    )
    # fp32 activations of one step: residual, norm, q|k|v, attention, gate|up, GEGLU (~8 rows of
    # the widest tensor per token), and the decode graphs' logits buffers: one per batch bucket,
    # all kept alive, summing to < 4x the largest (runner/cuda_graphs.py BUCKETS)
    widest = max(model.hidden_size, model.q_size + model.kv_size, 2 * model.intermediate_size)
    activations = config.batch_size * widest * 4 * 8
    # The prefill graphs' pool holds the same for their largest chunk, apart from the allocator's
    # blocks that eager steps use (runner/cuda_graphs.py PREFILL_BUCKETS).
    graph_tokens = min(config.ubatch_size, config.batch_size, config.ctx_size,
                       PREFILL_BUCKETS[-1])
    activations += graph_tokens * widest * 4 * 8 if head_on_gpu else 0
    logits = 4 * config.n_parallel * model.vocab_size * 4 if head_on_gpu else 0
    weights = int(gpu_weight_bytes * WEIGHT_OVERHEAD)
    return MemoryPlan(weights, kv, activations + logits)


def check_fits(plan: MemoryPlan, free_bytes: int, config: EngineConfig, device: str) -> None:
    """Raise ValueError naming the knobs to change when the plan needs more than is free."""
    need = plan.total + RESERVE_BYTES
    if need <= free_bytes:
        return
    mib = 2**20
    raise ValueError(
        f"the model does not fit on {device}: it needs about {need / mib:,.0f} MiB "
        f"(weights {plan.weights / mib:,.0f}, KV cache {plan.kv_cache / mib:,.0f} for "
        f"{config.num_cache_tokens:,} tokens = ctx_size {config.ctx_size} x n_parallel "
        f"{config.n_parallel} or cache_size, workspace {plan.workspace / mib:,.0f}, reserve "
        f"{RESERVE_BYTES / mib:,.0f}) but {free_bytes / mib:,.0f} MiB are free; lower ctx_size, "
        f"cache_size, n_parallel or batch_size, or offload fewer layers (gpu_layers)"
    )


def use_expandable_segments() -> bool:
    """Let torch's CUDA allocator grow segments in place (expandable_segments) unless the user set
    PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF; returns whether it did. Loading packs weights
    through short-lived buffers between the long-lived ones, which leaves fixed-size segments
    partly used; expandable ones map memory in 2 MiB pages. H100, 1B twin at ctx 4096 (llcuda
    serve, nvidia-smi): 1,620 -> 1,600 MiB. It changes only segments allocated from now on."""
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return False
    set_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if set_settings is None:  # torch < 2.9
        set_settings = torch.cuda.memory._set_allocator_settings
    set_settings("expandable_segments:True")
    return True
