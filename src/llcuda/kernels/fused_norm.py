"""Triton fusions of the small per-token ops around the matmuls (GPU path).

A Gemma 3 block does six RMSNorms, two RoPEs, a GEGLU and two residual adds per token. As torch
ops that is ~80 tiny kernels per layer, and at decode a kernel costs ~2 us however little it does:
for a 26-layer model that alone caps decode near 250 tok/s. Each function here is one kernel,
checked against the reference in `reference.py` (tests/kernels/test_fused_norm.py):

- `rms_norm(x, w)`: RMSNorm of each row.
- `residual_rms_norm(x, a, w_post, w_next)`: x + RMSNorm(a)·w_post, then RMSNorm of that sum
  with w_next (Gemma's post-norm, residual add and the next pre-norm in one pass).
- `qk_norm_rope(t, w, cos, sin, positions, scale)`: per-head RMSNorm, NEOX RoPE, scale.
- `geglu(gate_up)`: GELU-tanh(gate)·up from the fused [T, 2F] gate|up matmul output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact in fp32 and safe for large |x|
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    tl.store(out_ptr + row * n + cols, x * inv * w, mask=mask)


@triton.jit
def _residual_rms_norm_kernel(
    x_ptr, a_ptr, w_post_ptr, w_next_ptr, x_out_ptr, h_out_ptr, n, eps, splits, split_stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
    # `a` arrives as `splits` split-K partial sums of a matmul: adding them here saves a launch
    a = tl.load(a_ptr + row * n + cols, mask=mask, other=0.0)
    for s in range(1, splits):
        a += tl.load(a_ptr + s * split_stride + row * n + cols, mask=mask, other=0.0)
    w_post = tl.load(w_post_ptr + cols, mask=mask, other=0.0)
    w_next = tl.load(w_next_ptr + cols, mask=mask, other=0.0)
    x = x + a * (1.0 / tl.sqrt(tl.sum(a * a, axis=0) / n + eps)) * w_post
    tl.store(x_out_ptr + row * n + cols, x, mask=mask)
    h = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)) * w_next
    tl.store(h_out_ptr + row * n + cols, h, mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    t_ptr, w_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr, num_heads, head_dim, half, eps, scale,
    t_stride, HALF: tl.constexpr,
):  # fmt: skip
    # one program per (token, head); t is [num_tokens, row stride t_stride] holding the heads
    token = tl.program_id(0)
    head = tl.program_id(1)
    i = tl.arange(0, HALF)
    mask = i < half
    base = t_ptr + token * t_stride + head * head_dim
    x1 = tl.load(base + i, mask=mask, other=0.0)
    x2 = tl.load(base + half + i, mask=mask, other=0.0)
    inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / head_dim + eps)
    x1 = x1 * inv * tl.load(w_ptr + i, mask=mask, other=0.0)
    x2 = x2 * inv * tl.load(w_ptr + half + i, mask=mask, other=0.0)
    pos = tl.load(pos_ptr + token)
    c = tl.load(cos_ptr + pos * half + i, mask=mask, other=0.0)
    s = tl.load(sin_ptr + pos * half + i, mask=mask, other=0.0)
    out = out_ptr + (token * num_heads + head) * head_dim
    tl.store(out + i, (x1 * c - x2 * s) * scale, mask=mask)
    tl.store(out + half + i, (x1 * s + x2 * c) * scale, mask=mask)


@triton.jit
def _geglu_kernel(gu_ptr, out_ptr, f, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    g = tl.load(gu_ptr + row * 2 * f + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * 2 * f + f + cols, mask=mask, other=0.0)
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    tl.store(out_ptr + row * f + cols, 0.5 * g * (1.0 + _tanh(inner)) * u, mask=mask)


@triton.jit
def _softcap_kernel(x_ptr, n, cap, BLOCK: tl.constexpr):
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
    _softcap_kernel[(triton.cdiv(x.numel(), block),)](x, x.numel(), cap, BLOCK=block)
    return x


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    return x


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., n] -> RMSNorm(x) * weight, fp32, same shape."""
    x = _rows(x)
    n = x.shape[-1]
    out = torch.empty_like(x)
    _rms_norm_kernel[(x.numel() // n,)](x, weight, out, n, eps, BLOCK=triton.next_power_of_2(n))
    return out


def residual_rms_norm(
    x: torch.Tensor, a: torch.Tensor, w_post: torch.Tensor, w_next: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, n], a: [T, n] or split-K partials [S, T, n] ->
    (x + RMSNorm(a)*w_post, RMSNorm(that)*w_next), both fp32 [T, n]."""
    x = _rows(x)
    a = a.unsqueeze(0) if a.dim() == 2 else a
    a = _rows(a)
    n = x.shape[-1]
    x_out, h_out = torch.empty_like(x), torch.empty_like(x)
    _residual_rms_norm_kernel[(x.shape[0],)](
        x, a, w_post, w_next, x_out, h_out, n, eps, a.shape[0], a.shape[1] * n,
        BLOCK=triton.next_power_of_2(n),
    )
    return x_out, h_out


def qk_norm_rope(
    t: torch.Tensor,
    num_heads: int,
    head_dim: int,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
    scale: float = 1.0,
) -> torch.Tensor:
    """t: [T, >= num_heads*head_dim] rows (a view into a fused q|k output is fine) ->
    per-head RMSNorm * weight, NEOX RoPE over the whole head, times scale: [T, num_heads, head_dim].
    cos, sin: [max_positions, head_dim // 2] fp32; positions: [T] int64."""
    if t.stride(-1) != 1 or t.dtype != torch.float32:
        t = t.float().contiguous()
    num_tokens, half = t.shape[0], head_dim // 2
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32, device=t.device)
    _qk_norm_rope_kernel[(num_tokens, num_heads)](
        t, weight, cos, sin, positions, out, num_heads, head_dim, half, eps, scale, t.stride(0),
        HALF=triton.next_power_of_2(half),
    )  # fmt: skip
    return out


def geglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2F] (gate then up) -> GELU_tanh(gate) * up: [T, F] fp32."""
    gate_up = _rows(gate_up)
    num_tokens, f = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, f, dtype=torch.float32, device=gate_up.device)
    block = 1024
    _geglu_kernel[(num_tokens, triton.cdiv(f, block))](gate_up, out, f, BLOCK=block)
    return out
