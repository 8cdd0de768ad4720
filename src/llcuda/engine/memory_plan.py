"""What a model and its KV cache will take on the GPU and in host RAM, checked before anything
is allocated.

A ctx_size / cache_size / n_parallel that cannot fit must fail at once with numbers, not with an
out-of-memory error halfway through loading (or, worse, at the first long request). On the CPU
that error would be the kernel's OOM killer: ctx_size=10**7 on Gemma 3 270M asks for 61 GB of
fp32 K/V, which torch.zeros touches page by page until the process is killed with no message.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from llcuda.config import EngineConfig, ModelConfig
from llcuda.engine.kv_cache_manager import kv_cache_groups
from llcuda.runner.cuda_graphs import PREFILL_BUCKETS

KV_BYTES_PER_ELEMENT = 2  # fp16 cache on the GPU
# Triton repacking stores Q4_K / Q5_K scales unpacked (<= 1.03x the raw blocks), Q3_K and IQ1_M
# their fields apart (1.036x)
WEIGHT_OVERHEAD = 1.04
RESERVE_BYTES = 512 * 2**20  # CUDA context extras, allocator slack, Triton modules
HOST_KV_BYTES_PER_ELEMENT = 4  # fp32 cache on the CPU (loader.py: kv_dtype)
HOST_RESERVE_BYTES = 256 * 2**20  # allocator slack, the scheduler's tensors, Python objects
HOST_BYTES_PER_BLOCK = 128  # a KVBlock (3 slots) and its free-list entry, per block and group


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
    # per cache group: its blocks + 1 scratch block, on the last num_gpu_layers layers
    first_gpu_layer = model.num_layers - num_gpu_layers
    gpu_layers = range(first_gpu_layer, model.num_layers)
    kv = _kv_cache_bytes(model, config, gpu_layers, KV_BYTES_PER_ELEMENT, scratch_blocks=1)
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


def _kv_cache_bytes(
    model: ModelConfig,
    config: EngineConfig,
    layers: Iterable[int],
    bytes_per_element: int,
    scratch_blocks: int,
) -> int:
    """K and V of every cache group (sliding-window layers keep a pool of their own), on each of
    the group's layers that is in `layers`."""
    block_bytes = (config.block_size * model.num_kv_heads * model.head_dim
                   * bytes_per_element * 2)  # fmt: skip
    wanted = set(layers)
    return sum(
        (group.num_blocks + scratch_blocks) * block_bytes * len(wanted.intersection(group.layers))
        for group in kv_cache_groups(model, config)
    )


def plan_host_memory(
    model: ModelConfig,
    config: EngineConfig,
    host_weight_bytes: int,
    host_layers: Iterable[int],
) -> MemoryPlan:
    """What the process will hold in RAM: the weights the CPU computes with (memory-mapped from
    the file, and every step reads them all), the fp32 K/V of the layers on the CPU (no scratch
    block there), and a step's activations and logits plus the block bookkeeping."""
    host_layers = list(host_layers)
    kv = _kv_cache_bytes(model, config, host_layers, HOST_KV_BYTES_PER_ELEMENT, scratch_blocks=0)
    workspace = sum(g.num_blocks for g in kv_cache_groups(model, config)) * HOST_BYTES_PER_BLOCK
    if host_layers:
        widest = max(model.hidden_size, model.q_size + model.kv_size, 2 * model.intermediate_size)
        workspace += config.batch_size * widest * 4 * 8 + config.n_parallel * model.vocab_size * 4
    return MemoryPlan(host_weight_bytes, kv, workspace)


def check_fits(
    plan: MemoryPlan,
    free_bytes: int,
    config: EngineConfig,
    device: str,
    reserve: int = RESERVE_BYTES,
    free_what: str = "free",
) -> None:
    """Raise ValueError naming the knobs to change when the plan needs more than is free."""
    need = plan.total + reserve
    if need <= free_bytes:
        return
    mib = 2**20
    fewer = "offload fewer layers (gpu_layers)" if device != "cpu" else "use a GPU"
    if config.cache_size is None:
        tokens = f"ctx_size {config.ctx_size} x n_parallel {config.n_parallel}"
    else:
        tokens = (f"cache_size {config.cache_size}, shared by n_parallel {config.n_parallel} "
                  f"sequences of up to ctx_size {config.ctx_size}")  # fmt: skip
    raise ValueError(
        f"the model does not fit on {device}: it needs about {need / mib:,.0f} MiB "
        f"({need:,} bytes: weights {plan.weights / mib:,.0f}, KV cache "
        f"{plan.kv_cache / mib:,.0f} for {config.num_cache_tokens:,} tokens = {tokens}, "
        f"workspace {plan.workspace / mib:,.0f}, reserve "
        f"{reserve / mib:,.0f}) but {free_bytes / mib:,.0f} MiB are {free_what} "
        f"({free_bytes:,} bytes); lower ctx_size, cache_size, n_parallel or batch_size, or {fewer}"
    )


def available_host_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes (what can be allocated without swapping, page cache included), or
    None where the file does not exist or has no such line (not Linux)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def weight_bytes_on(
    device_type: str,
    tensors: dict,
    model: ModelConfig,
    block_devices: list[torch.device],
    head_device: torch.device,
) -> int:
    """Bytes of the GGUF tensors (name -> info with .nbytes) that live on devices of device_type
    ("cpu" or "cuda"): each block's where block_devices puts it, the LM head on head_device, the
    rest (an untied embedding, the final norm) on the host."""
    head_name = "token_embd.weight" if model.tie_word_embeddings else "output.weight"
    total = 0
    for name, info in tensors.items():
        if name.startswith("blk."):
            device = block_devices[int(name.split(".")[1])]
        else:
            device = head_device if name == head_name else torch.device("cpu")
        total += info.nbytes if device.type == device_type else 0
    return total


def check_host_memory(
    tensors: dict,
    model: ModelConfig,
    config: EngineConfig,
    block_devices: list[torch.device],
    head_device: torch.device,
    available: int | None = None,
) -> MemoryPlan:
    """The host share of the model (`tensors`: GGUF name -> info with .nbytes), checked against
    MemAvailable before any allocation; returns the plan. `available` overrides /proc/meminfo."""
    host_layers = [i for i, d in enumerate(block_devices) if d.type == "cpu"]
    weight_bytes = weight_bytes_on("cpu", tensors, model, block_devices, head_device)
    plan = plan_host_memory(model, config, weight_bytes, host_layers)
    if available is None:
        available = available_host_memory()
    if available is not None:
        check_fits(plan, available, config, "cpu", HOST_RESERVE_BYTES,
                   "available in RAM (MemAvailable)")  # fmt: skip
    return plan


def warn_beyond_trained_context(model: ModelConfig, config: EngineConfig) -> None:
    """A ctx_size past the model's context_length runs, but positions it never saw in training
    give degraded text (llama.cpp warns the same: n_ctx_seq > n_ctx_train)."""
    trained = model.max_position_embeddings
    if trained and config.ctx_size > trained:
        name = model.name or "the model"
        warnings.warn(
            f"ctx_size {config.ctx_size} is above the {trained} positions {name} was trained "
            f"for (GGUF context_length); text past {trained} tokens may degrade",
            UserWarning,
            stacklevel=3,
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
