"""Triton fusions of the small per-token ops around the matmuls (GPU path).

A Gemma 3 block does six RMSNorms, two RoPEs, a GEGLU and two residual adds per token. As torch
ops that is ~80 tiny kernels per layer, and at decode a kernel costs ~2 us however little it does:
for a 26-layer model that alone caps decode near 250 tok/s. Each function here is one kernel,
checked against the reference in `reference.py` (tests/kernels/test_fused_norm.py):

- `rms_norm(x, w)`: RMSNorm of each row.
- `residual_rms_norm(x, a, w_post, w_next)`: x + RMSNorm(a)·w_post, then RMSNorm of that sum
  with w_next (Gemma's post-norm, residual add and the next pre-norm in one pass); without
  w_post (HAS_POST off) the Llama family's x + a, then the next pre-norm.
- `qk_norm_rope_store_kv(qk, v, ...)`: (bias,) per-head RMSNorm, RoPE and scale of q and k, and
  k, v stored in the paged KV cache: a layer's attention inputs in one kernel. The q/k norm, the
  RoPE style (NEOX / NORM) and the q|k|v bias are compile-time flags, so Gemma 3's variant
  compiles to the code it had before they existed.
- `gated_act(gate_up, act)`: act(gate)·up from the fused [T, 2F] gate|up matmul output, act
  GELU-tanh (GEGLU, `geglu`) or SiLU (SwiGLU), a compile-time flag.

Matmul outputs may arrive as split-K partial sums [S, T, n] (quant_matmul(..., partials=True)):
the kernels add them as they load, which saves the reduction kernel a decode step would
otherwise launch after every narrow projection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llcuda.kernels.dependent_launch import pdl_launch_args, wait_for_previous
from llcuda.kernels.q8_activations import Q8Rows, empty_q8_rows
from llcuda.kernels.q8_tile import store_q8_row
from llcuda.kernels.reference import ROPE_FINE_STEPS


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact in fp32 and safe for large |x|
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, q_words_ptr, q_meta_ptr, n, eps, BLOCK: tl.constexpr,
                     Q8_OUT: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    wait_for_previous(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    h = x * inv * w
    tl.store(out_ptr + row * n + cols, h, mask=mask)
    if Q8_OUT:  # h quantized for the int8 decode GEMVs that read it (q8_activations.Q8Rows)
        store_q8_row(h, q_words_ptr, q_meta_ptr, row, n, BLOCK)


@triton.jit
def _load_summed(ptr, offs, mask, SPLITS: tl.constexpr, split_stride):
    """ptr[offs] summed over SPLITS split-K partials `split_stride` elements apart (fp32). The
    loop is unrolled so that all the loads are in flight at once: a runtime loop waits one L2
    round trip per partial (~2 us for ffn_down's 16)."""
    x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(1, SPLITS):
        x += tl.load(ptr + s * split_stride + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _residual_rms_norm_kernel(
    x_ptr, a_ptr, w_post_ptr, w_next_ptr, x_out_ptr, h_out_ptr, q_words_ptr, q_meta_ptr, n, eps,
    split_stride, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
    HAS_POST: tl.constexpr,  # RMSNorm(a) * w_post before the add (Gemma); else x + a (Llama)
    Q8_OUT: tl.constexpr,  # h also as q8_activations.Q8Rows, for the int8 decode GEMVs
    PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
    # `a` arrives as SPLITS split-K partial sums of a matmul: adding them here saves a launch
    a = _load_summed(a_ptr, row * n + cols, mask, SPLITS, split_stride)
    w_next = tl.load(w_next_ptr + cols, mask=mask, other=0.0)
    if HAS_POST:
        w_post = tl.load(w_post_ptr + cols, mask=mask, other=0.0)
        x = x + a * (1.0 / tl.sqrt(tl.sum(a * a, axis=0) / n + eps)) * w_post
    else:
        x = x + a
    tl.store(x_out_ptr + row * n + cols, x, mask=mask)
    h = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)) * w_next
    tl.store(h_out_ptr + row * n + cols, h, mask=mask)
    if Q8_OUT:
        store_q8_row(h, q_words_ptr, q_meta_ptr, row, n, BLOCK)


@triton.jit
def _qk_norm_rope_store_kv_kernel(
    qk_ptr, v_ptr, q_w_ptr, k_w_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_out_ptr,
    k_cache_ptr, v_cache_ptr, num_heads, num_kv_heads, head_dim, half, eps, scale,
    qk_split_stride, qk_stride_t, v_split_stride, v_stride_t, stride_cb, stride_cs, stride_ch,
    QK_SPLITS: tl.constexpr, V_SPLITS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HALF: tl.constexpr, ROPE_FINE: tl.constexpr,
    HAS_QK_NORM: tl.constexpr,  # per-head RMSNorm with q_w / k_w (Gemma 3, Qwen3)
    ROPE_NEOX: tl.constexpr,  # pairs (i, i + half); else NORM, adjacent pairs (2i, 2i + 1)
    HAS_BIAS: tl.constexpr,  # bias [bq | bk | bv] added to the summed q | k | v (Qwen2)
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_previous(PDL)
    # one program per (token, head): heads [0, num_heads) are q's, the rest k's (with their v)
    token = tl.program_id(0)
    head = tl.program_id(1)
    i = tl.arange(0, HALF)
    mask = i < half
    # the two elements each rotation pair takes: the same offsets index the norm weight, the
    # output, the cache row and v, so the NORM style only changes these two lines
    if ROPE_NEOX:
        off1 = i
        off2 = half + i
    else:
        off1 = 2 * i
        off2 = 2 * i + 1
    row = token * qk_stride_t + head * head_dim
    x1 = _load_summed(qk_ptr, row + off1, mask, QK_SPLITS, qk_split_stride)
    x2 = _load_summed(qk_ptr, row + off2, mask, QK_SPLITS, qk_split_stride)
    if HAS_BIAS:  # q and k heads lie in bias order [bq | bk]: head h's bias at h * head_dim
        x1 += tl.load(bias_ptr + head * head_dim + off1, mask=mask, other=0.0)
        x2 += tl.load(bias_ptr + head * head_dim + off2, mask=mask, other=0.0)
    is_q = head < num_heads
    if HAS_QK_NORM:
        inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / head_dim + eps)
        w_ptr = tl.where(is_q, q_w_ptr, k_w_ptr)
        x1 = x1 * inv * tl.load(w_ptr + off1, mask=mask, other=0.0)
        x2 = x2 * inv * tl.load(w_ptr + off2, mask=mask, other=0.0)
    # cos/sin at pos from the factored tables (reference.rope_at_ref)
    pos = tl.load(pos_ptr + token)
    fine = (pos % ROPE_FINE) * half + i
    coarse = (ROPE_FINE + pos // ROPE_FINE) * half + i
    c_f = tl.load(cos_ptr + fine, mask=mask, other=0.0)
    s_f = tl.load(sin_ptr + fine, mask=mask, other=0.0)
    c_c = tl.load(cos_ptr + coarse, mask=mask, other=0.0)
    s_c = tl.load(sin_ptr + coarse, mask=mask, other=0.0)
    c = c_c * c_f - s_c * s_f
    s = s_c * c_f + c_c * s_f
    y1 = x1 * c - x2 * s
    y2 = x1 * s + x2 * c
    if is_q:
        out = q_out_ptr + (token * num_heads + head) * head_dim
        tl.store(out + off1, y1 * scale, mask=mask)
        tl.store(out + off2, y2 * scale, mask=mask)
    else:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:  # negative: a padding token of a CUDA-graph batch
            kv_head = head - num_heads
            dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
            dst += kv_head * stride_ch
            ty = k_cache_ptr.dtype.element_ty
            tl.store(k_cache_ptr + dst + off1, y1.to(ty), mask=mask)
            tl.store(k_cache_ptr + dst + off2, y2.to(ty), mask=mask)
            v_row = token * v_stride_t + kv_head * head_dim
            v1 = _load_summed(v_ptr, v_row + off1, mask, V_SPLITS, v_split_stride)
            v2 = _load_summed(v_ptr, v_row + off2, mask, V_SPLITS, v_split_stride)
            if HAS_BIAS:
                bv = bias_ptr + (num_heads + num_kv_heads + kv_head) * head_dim
                v1 += tl.load(bv + off1, mask=mask, other=0.0)
                v2 += tl.load(bv + off2, mask=mask, other=0.0)
            tl.store(v_cache_ptr + dst + off1, v1.to(ty), mask=mask)
            tl.store(v_cache_ptr + dst + off2, v2.to(ty), mask=mask)


@triton.jit
def _gated_act_kernel(gu_ptr, out_ptr, f, split_stride, SPLITS: tl.constexpr,
                      BLOCK: tl.constexpr,
                      SILU: tl.constexpr,  # silu(gate) * up (SwiGLU); else GELU_tanh (GEGLU)
                      PDL: tl.constexpr):  # fmt: skip
    wait_for_previous(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    g = _load_summed(gu_ptr, row * 2 * f + cols, mask, SPLITS, split_stride)
    u = _load_summed(gu_ptr, row * 2 * f + f + cols, mask, SPLITS, split_stride)
    if SILU:  # x * sigmoid(x); exp(-x) overflows to inf for x << 0, giving -0
        tl.store(out_ptr + row * f + cols, g / (1.0 + tl.exp(-g)) * u, mask=mask)
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        tl.store(out_ptr + row * f + cols, 0.5 * g * (1.0 + _tanh(inner)) * u, mask=mask)


@triton.jit
def _softcap_kernel(x_ptr, n, cap, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(x_ptr + offs, cap * _tanh(x / cap), mask=mask)


def softcap_(x: torch.Tensor, cap: float) -> torch.Tensor:
    """x <- cap * tanh(x / cap) in place (contiguous fp32): one pass over the logits, which at
    a 64-row decode batch of a 262k vocabulary are 67 MB (torch's three ops: three passes)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"softcap_ needs contiguous float32, got {x.dtype}")
    block = 4096
    _softcap_kernel[(triton.cdiv(x.numel(), block),)](x, x.numel(), cap, BLOCK=block,
                                                       **pdl_launch_args(x.device))
    return x


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    return x


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, q8: bool = False
             ) -> torch.Tensor | tuple[torch.Tensor, Q8Rows]:  # fmt: skip
    """x: [..., n] -> RMSNorm(x) * weight, fp32, same shape; with q8 (x [T, n], n a multiple
    of 32) also that quantized as Q8Rows: (out, Q8Rows)."""
    x = _rows(x)
    n = x.shape[-1]
    out = torch.empty_like(x)
    q = empty_q8_rows(x.shape[0], n, x.device) if q8 else Q8Rows(out, out)
    _rms_norm_kernel[(x.numel() // n,)](x, weight, out, *q, n, eps,
                                        BLOCK=triton.next_power_of_2(max(n, 32)), Q8_OUT=q8,
                                        **pdl_launch_args(x.device))  # fmt: skip
    return (out, q) if q8 else out


def residual_rms_norm(
    x: torch.Tensor, a: torch.Tensor, w_post: torch.Tensor | None, w_next: torch.Tensor,
    eps: float, q8: bool = False,
) -> tuple[torch.Tensor, ...]:
    """x: [T, n], a: [T, n] or split-K partials [S, T, n] ->
    (x + RMSNorm(a)*w_post, RMSNorm(that)*w_next), both fp32 [T, n]; w_post None: x + a.
    With q8 (n a multiple of 32) the second also quantized: (x, h, Q8Rows of h)."""
    x = _rows(x)
    a = _partials(a, whole_rows=True)
    n = x.shape[-1]
    x_out, h_out = torch.empty_like(x), torch.empty_like(x)
    q = empty_q8_rows(x.shape[0], n, x.device) if q8 else Q8Rows(h_out, h_out)
    _residual_rms_norm_kernel[(x.shape[0],)](
        x, a, w_next if w_post is None else w_post, w_next, x_out, h_out, *q, n, eps,
        a.shape[1] * n, SPLITS=a.shape[0], BLOCK=triton.next_power_of_2(max(n, 32)),
        HAS_POST=w_post is not None, Q8_OUT=q8, **pdl_launch_args(x.device),
    )
    return (x_out, h_out, q) if q8 else (x_out, h_out)


def _partials(t: torch.Tensor, whole_rows: bool = False) -> torch.Tensor:
    """A matmul output [T, n] or its split-K partials [S, T, n] as [S, T, n] with unit last
    stride (a column slice of a fused output keeps its row stride), or with `whole_rows` rows
    n apart, for kernels that index rows as row * n."""
    t = t.unsqueeze(0) if t.dim() == 2 else t
    if t.stride(-1) != 1 or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        t = t.float().contiguous()
    elif whole_rows and t.stride(1) != t.shape[2]:
        t = t.contiguous()
    return t


def qk_norm_rope_store_kv(
    qk: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, cos: torch.Tensor,
    sin: torch.Tensor, positions: torch.Tensor, eps: float, scale: float, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slot_mapping: torch.Tensor, *, rope_neox: bool = True,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """reference.qk_norm_rope_store_kv_ref in one kernel (RoPE over the whole head).
    qk: [T, (num_heads + num_kv_heads) * head_dim] (q then k), v: [T, num_kv_heads * head_dim],
    each a matmul output or its split-K partials [S, T, n]; cos, sin: reference.rope_table_ref's
    factored tables; caches [num_blocks, block_size, num_kv_heads, head_dim]. q_weight and
    k_weight both None: no per-head norm; rope_neox False: NORM RoPE (adjacent pairs); bias
    None or [bq | bk | bv] fp32. Each is a compile-time flag of the kernel.
    Returns q [T, num_heads, head_dim] fp32."""
    qk, v = _partials(qk), _partials(v)
    num_tokens, half = qk.shape[1], head_dim // 2
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if qk.shape[2] < q_size + kv_size or v.shape[2] < kv_size:
        raise ValueError(f"qk {tuple(qk.shape)} / v {tuple(v.shape)} too narrow for the heads")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have one shape and layout")
    if k_cache.stride(3) != 1 or 2 * cos.shape[-1] != head_dim:
        raise ValueError("needs contiguous cache heads and RoPE over the whole head")
    if cos.shape != sin.shape or cos.shape[0] <= ROPE_FINE_STEPS or not cos.is_contiguous():
        raise ValueError(f"cos/sin {tuple(cos.shape)} are not rope_table_ref's tables")
    if (q_weight is None) != (k_weight is None):
        raise ValueError("q_weight and k_weight must both be given or both be None")
    if bias is not None:
        if bias.shape != (q_size + 2 * kv_size,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected "
                             f"({q_size + 2 * kv_size},) = [bq | bk | bv]")  # fmt: skip
        bias = _rows(bias)
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32, device=qk.device)
    if num_tokens == 0:
        return q
    has_norm = q_weight is not None
    _qk_norm_rope_store_kv_kernel[(num_tokens, num_heads + num_kv_heads)](
        qk, v, q_weight if has_norm else q, k_weight if has_norm else q,
        bias if bias is not None else q, cos, sin, positions, slot_mapping, q, k_cache, v_cache,
        num_heads, num_kv_heads, head_dim, half, eps, scale,
        qk.stride(0), qk.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        QK_SPLITS=qk.shape[0], V_SPLITS=v.shape[0], BLOCK_SIZE=k_cache.shape[1],
        HALF=triton.next_power_of_2(half), ROPE_FINE=ROPE_FINE_STEPS,
        HAS_QK_NORM=has_norm, ROPE_NEOX=rope_neox, HAS_BIAS=bias is not None,
        **pdl_launch_args(qk.device),
    )  # fmt: skip
    return q


# The gated activations gated_act has a kernel for (ops.gated_act falls back to the reference).
GATED_ACTS = ("gelu_tanh", "silu")


def gated_act(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """gate_up: [T, 2F] (gate then up), or its split-K partials [S, T, 2F] -> act(gate) * up:
    [T, F] fp32, act "gelu_tanh" (GEGLU) or "silu" (SwiGLU)."""
    if act not in GATED_ACTS:
        raise ValueError(f"no gated_act kernel for {act!r}; kernels: {GATED_ACTS}")
    gate_up = _partials(gate_up, whole_rows=True)
    num_tokens, f = gate_up.shape[1], gate_up.shape[2] // 2
    out = torch.empty(num_tokens, f, dtype=torch.float32, device=gate_up.device)
    block = 1024
    _gated_act_kernel[(num_tokens, triton.cdiv(f, block))](
        gate_up, out, f, gate_up.stride(0), SPLITS=gate_up.shape[0], BLOCK=block,
        SILU=act == "silu", **pdl_launch_args(gate_up.device),
    )
    return out
