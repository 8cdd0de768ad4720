"""Kernel dispatch: Triton kernels for CUDA tensors, the pure-torch reference everywhere else.

Model code calls only these functions, so the CPU path and the GPU path run the same model file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llcuda.kernels import reference as ref
from llcuda.kernels.quant_cpu_native import quant_matmul_native
from llcuda.layers.quant_tensor import QuantTensor

if TYPE_CHECKING:
    from llcuda.kernels.q8_activations import Q8Rows
    from llcuda.layers.attention import AttentionMetadata


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:
        from llcuda.kernels import fused_norm

        return fused_norm.rms_norm(x, weight, eps)
    return ref.rms_norm_ref(x, weight, eps)


def rms_norm_q8(x: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, Q8Rows | None]:  # fmt: skip
    """(RMSNorm(x) * weight, its Q8Rows for the int8 decode GEMVs that read it), one kernel on
    CUDA; on the CPU (no int8 GEMV) the norm and None."""
    if x.is_cuda:
        from llcuda.kernels import fused_norm

        return fused_norm.rms_norm(x, weight, eps, q8=True)
    return ref.rms_norm_ref(x, weight, eps), None


def residual_rms_norm(
    x: torch.Tensor,
    a: torch.Tensor,
    w_post: torch.Tensor | None,
    w_next: torch.Tensor,
    eps: float,
    q8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Q8Rows | None]:
    """(x + RMSNorm(a)*w_post, RMSNorm of that * w_next, with q8 the second's Q8Rows): one kernel
    on CUDA. `a` is [T, n] or a matmul's split-K partial sums [S, T, n] (quant_matmul(...,
    partials=True)). w_post None: no post-norm, x + a (the Llama family). The Q8Rows (None
    without q8, and on the CPU, which has no int8 GEMV) let the int8 decode GEMVs skip
    quantizing the row again."""
    if x.is_cuda:
        from llcuda.kernels import fused_norm

        out = fused_norm.residual_rms_norm(x, a, w_post, w_next, eps, q8=q8)
        return out if q8 else (*out, None)
    return (*ref.residual_rms_norm_ref(x, a, w_post, w_next, eps), None)


def qk_norm_rope_store_kv(
    qk: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
    scale: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    rope_neox: bool = True,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """q and k's per-head RMSNorm (none where the weights are None) + RoPE (NEOX, or NORM with
    rope_neox False) (+ q's scale), k and v stored in the paged cache; returns q [T, num_heads,
    head_dim]. qk and v may be split-K partials [S, T, n]; bias None or [bq | bk | bv] added
    first. One kernel on CUDA when RoPE covers the head (reference.qk_norm_rope_store_kv_ref is
    the contract)."""
    args = (qk, v, num_heads, num_kv_heads, head_dim, q_weight, k_weight, cos, sin, positions,
            eps, scale, k_cache, v_cache, slot_mapping)  # fmt: skip
    if (q_weight is None) != (k_weight is None):
        raise ValueError("q_weight and k_weight must both be given or both be None")
    if k_cache.is_cuda and 2 * cos.shape[-1] == head_dim:
        from llcuda.kernels import fused_norm

        return fused_norm.qk_norm_rope_store_kv(*args, rope_neox=rope_neox, bias=bias)
    return ref.qk_norm_rope_store_kv_ref(*args, rope_neox=rope_neox, bias=bias)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap), fp32 (Gemma's final logit soft-capping); may reuse x's memory."""
    if x.is_cuda and x.dtype == torch.float32 and x.is_contiguous():
        from llcuda.kernels import fused_norm

        return fused_norm.softcap_(x, cap)
    return ref.softcap_ref(x, cap)


def gated_act(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * ffn], or its split-K partials [S, num_tokens, 2 * ffn] ->
    act(gate) * up [num_tokens, ffn] fp32; act "gelu_tanh" (GEGLU) or "silu" (SwiGLU)."""
    ref.check_gated_act(act)
    if gate_up.is_cuda:
        from llcuda.kernels import fused_norm

        return fused_norm.gated_act(gate_up, act)
    return ref.gated_act_ref(gate_up, act)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] -> [rows] int64, each row's first maximum (greedy sampling): one Triton
    kernel for contiguous fp32 rows on CUDA, else reference.argmax_ref."""
    if logits.is_cuda and logits.dtype == torch.float32 and logits.stride(1) == 1:
        from llcuda.kernels.argmax import argmax_rows

        return argmax_rows(logits)
    return ref.argmax_ref(logits)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    sliding_window: int,
    flash_attn: bool | None = None,
    *,
    softcap: float = 0.0,
) -> torch.Tensor:
    """flash_attn None (auto) or True: the fused Triton kernel on CUDA; False, or on the CPU: the
    reference, which materialises each sequence's score matrix. softcap > 0: Gemma 2's
    attention logit soft-capping, softcap * tanh(scores / softcap) before the mask."""
    if softcap < 0.0:
        raise ValueError(f"attention softcap must be 0 (off) or positive, got {softcap}")
    if q.is_cuda and flash_attn is not False:
        from llcuda.kernels.paged_attention import paged_attention as triton_paged_attention

        # max_query_len is exact in the runner's metadata: 1 with a token per sequence is decode
        decode = meta.max_query_len == 1 and q.shape[0] == meta.seq_lens.shape[0]
        return triton_paged_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            sliding_window, meta.max_query_len, meta.max_seq_len, one_query_each=decode,
            softcap=softcap,
        )  # fmt: skip
    return ref.paged_attention_ref(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        sliding_window, softcap=softcap,
    )  # fmt: skip


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


def quant_matmul(x: torch.Tensor, weight: object, partials: bool = False,
                 xq: Q8Rows | None = None) -> torch.Tensor:  # fmt: skip
    """x @ W.T, W kept in its quantized blocks. x: [num_tokens, in] -> [num_tokens, out], or with
    `partials` split-K partial sums [splits, num_tokens, out] for residual_rms_norm to add up.
    On CPU the C++ kernel (quant_cpu_native: fp32 x, blocks decoded in registers) where it
    runs the type, else the reference. `xq`: x's Q8Rows, if a norm wrote them (GPU only)."""
    if isinstance(weight, QuantTensor):
        out = quant_matmul_native(x, weight)
        if out is None:
            out = ref.quant_matmul_ref(x, weight)
        return out.unsqueeze(0) if partials else out
    from llcuda.kernels.quant_matmul import quant_matmul as triton_quant_matmul

    return triton_quant_matmul(x, weight, partials=partials, xq=xq)


def decode_reads_q8_rows(weight: object) -> bool:
    """Whether a one-token product with `weight` reads its input as Q8Rows written by the norm
    before it: the GPU decode GEMV takes int8 activations for it (quant_matmul.gemv_int8) and
    prequantized inputs are on (quant_matmul.gemv_prequantized); never on the CPU."""
    if isinstance(weight, QuantTensor):
        return False
    from llcuda.kernels import quant_matmul as qm

    return qm.gemv_prequantized() and qm.uses_gemv(1, weight) and qm.gemv_int8(
        weight.qtype, 1, weight.n_rows, weight.n_cols // qm.GROUP)  # fmt: skip


def quant_matmul_pair(x: torch.Tensor, wa: object, wb: object,
                      xq: Q8Rows | None = None) -> torch.Tensor | None:  # fmt: skip
    """[x @ Wa.T | x @ Wb.T] [num_tokens, na + nb] in one launch where the GPU's decode GEMV can
    take both (two weights of one input in different quant types); None elsewhere, for the
    caller to run them apart."""
    if isinstance(wa, QuantTensor) or isinstance(wb, QuantTensor):
        return None
    from llcuda.kernels import quant_matmul as qm

    configs = qm.gemv_pair_config(x, wa, wb)
    return None if configs is None else qm.quant_gemv_pair(x, wa, wb, configs, xq=xq)


def quant_matmul_gated(x: torch.Tensor, weight: object, act: str,
                       xq: Q8Rows | None = None) -> torch.Tensor:  # fmt: skip
    """act(x @ gate.T) * (x @ up.T) [num_tokens, ffn] for a gate|up weight [gate | up]
    (ffn_gate|ffn_up fused at load, or Phi-3's ffn_up that holds both); act "gelu_tanh" (GEGLU)
    or "silu" (SwiGLU). On CUDA, where the product takes the decode GEMV, the activation is its
    epilogue: one kernel, and ffn_down reads its input ready; elsewhere the matmul, then the
    gated_act kernel, which adds up the matmul's split-K partials as it loads them."""
    ref.check_gated_act(act)
    if not isinstance(weight, QuantTensor):
        from llcuda.kernels import quant_matmul as qm

        if x.dim() == 2 and x.shape[0] > 0 and qm.uses_gemv(x.shape[0], weight):
            return qm.quant_gemv(x, weight, gated_act=act, xq=xq)
    return gated_act(quant_matmul(x, weight, partials=True, xq=xq), act)


def embedding(weight: object, token_ids: torch.Tensor, scale: float = 1.0,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """scale * rows `token_ids` [T] of a quantized table -> [T, n_embd] fp32, where the table is:
    the memory-mapped blocks (CPU) or the packed weight (one gather kernel on the GPU). With
    `out`, the rows land there (the gather kernel writes them in place) and `out` is returned."""
    if isinstance(weight, QuantTensor):
        rows = ref.embedding_ref(weight, token_ids) * scale
        return rows if out is None else out.copy_(rows)
    from llcuda.kernels.quant_dequant import embedding_rows

    return embedding_rows(weight, token_ids.to(weight.device, non_blocking=True), scale, out)
