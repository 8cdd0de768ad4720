"""Kernel dispatch: Triton kernels for CUDA tensors, the pure-torch reference everywhere else.

Model code calls only these functions, so the CPU path and the GPU path run the same model file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llcuda.kernels import reference as ref
from llcuda.layers.quant_tensor import QuantTensor

if TYPE_CHECKING:
    from llcuda.layers.attention import AttentionMetadata


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return ref.rms_norm_ref(x, weight, eps)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return ref.geglu_ref(gate, up)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return ref.silu_mul_ref(gate, up)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if k_cache.is_cuda:
        from llcuda.kernels.paged_attention import write_kv as triton_write_kv

        triton_write_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    ref.write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    sliding_window: int,
    flash_attn: bool | None = None,
) -> torch.Tensor:
    """flash_attn None (auto) or True: the fused Triton kernel on CUDA; False, or on the CPU: the
    reference, which materialises each sequence's score matrix."""
    if q.is_cuda and flash_attn is not False:
        from llcuda.kernels.paged_attention import paged_attention as triton_paged_attention

        return triton_paged_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            sliding_window, meta.max_query_len, meta.max_seq_len,
        )  # fmt: skip
    return ref.paged_attention_ref(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, sliding_window
    )


def prepare_weight(weight: QuantTensor, device: torch.device | str) -> object:
    """Place a quantized weight where it will be used, in the layout the kernels want.

    On CPU the GGUF blocks stay memory-mapped. On CUDA the raw blocks are uploaded and repacked
    once into the struct-of-arrays layout of the Triton kernels (at most 1.03x the raw bytes).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return weight
    from llcuda.kernels.quant_pack import pack_weight

    return pack_weight(weight.data.to(device), int(weight.qtype), weight.shape[1])


def quant_matmul(x: torch.Tensor, weight: object) -> torch.Tensor:
    """x @ W.T for a weight kept in its quantized blocks. x: [num_tokens, in] -> [num_tokens, out]."""
    if isinstance(weight, QuantTensor):
        return ref.quant_matmul_ref(x, weight)
    from llcuda.kernels.quant_matmul import quant_matmul as triton_quant_matmul

    return triton_quant_matmul(x, weight)


def embedding(weight: QuantTensor, token_ids: torch.Tensor) -> torch.Tensor:
    return ref.embedding_ref(weight, token_ids)
