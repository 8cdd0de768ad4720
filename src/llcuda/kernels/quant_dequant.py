"""Rows of a packed GGUF weight expanded to floats on the GPU, by one Triton kernel.

Two users: `embedding_rows` gathers the token rows of the (tied) embedding table, scaled, in the
natural column order; `dequantize_bf16` expands a whole matrix into a bf16 workspace in
*plane-major* column order, the operand of quant_tc.quant_gemm_dense. Plane-major order puts plane
p of a run of groups in one contiguous run of columns (see quant_tc.plane_major), so the stores
are as wide as the loads; the matmul permutes its activations the same way. The low-bit types
(quant_pack.LOWBIT_TYPES) are packed in natural order and expanded by quant_lowbit.lowbit_rows:
their workspace is in natural column order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llcuda.kernels.quant_matmul import (
    _MAGIC,
    _WPG,
    _plane,
    _use_asm,
    _weight_args,
    _weight_tile,
)
from llcuda.kernels.quant_pack import GROUP, LOWBIT_TYPES, PackedWeight


@triton.jit
def _dequant_rows_kernel(
    out_ptr,  # [R, K] bf16 / fp32
    ids_ptr,  # [R] int64 source rows (GATHER), else unused
    qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dmin_ptr,
    R, N, n_groups, stride_out,
    s_qs, s_qh, s_sc, s_d,
    magic, scale,
    QTYPE: tl.constexpr,
    WPG: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GATHER: tl.constexpr,  # output row r = weight row ids[r] (else row r)
    PLANE_MAJOR: tl.constexpr,  # column order of the output
    USE_ASM: tl.constexpr,
):
    NP: tl.constexpr = 32 // WPG
    NW: tl.constexpr = BLOCK_G * WPG
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    src = tl.minimum(offs_r, R - 1)
    if GATHER:
        src = tl.load(ids_ptr + src)
    # [BR, 1]; clamped so that no id can read out of bounds (the engine rejects bad ids first)
    row = tl.minimum(tl.maximum(src, 0), N - 1).to(tl.int64)[:, None]
    g0 = tl.program_id(1) * BLOCK_G
    j = tl.arange(0, NW)
    jg = j // WPG
    jk = j % WPG
    lo, hi, a_lo, a_hi, c = _weight_tile(QTYPE, WPG, BLOCK_R, BLOCK_G, qs_ptr, qh_ptr, sc_ptr,
                                         mn_ptr, d_ptr, dmin_ptr, row, g0, n_groups, s_qs, s_qh,
                                         s_sc, s_d)  # [BR, NW] each
    wmask = (g0 + jg < n_groups)[None, :]
    smask = wmask & (offs_r < R)[:, None]
    out_row = out_ptr + offs_r.to(tl.int64)[:, None] * stride_out
    for p in tl.static_range(NP):
        if p < NP // 2:
            w = _plane(QTYPE, lo, hi, p, magic, USE_ASM) * a_lo + c  # [BR, NW]
        else:
            w = _plane(QTYPE, lo, hi, p, magic, USE_ASM) * a_hi + c
        if PLANE_MAJOR:  # plane p of groups g0.. is one run of NW columns
            dst = out_row + p * (n_groups * WPG) + (g0 * WPG + j)[None, :]
        else:  # element p*WPG + k of group g
            dst = out_row + ((g0 + jg) * 32 + p * WPG + jk)[None, :]
        tl.store(dst, (w * scale).to(out_ptr.dtype.element_ty), mask=smask)


def _launch(w: PackedWeight, out: torch.Tensor, ids: torch.Tensor | None, scale: float,
            plane_major: bool) -> torch.Tensor:
    n_rows, n_groups = out.shape[0], w.n_cols // GROUP
    if n_rows == 0:
        return out
    if w.qtype in LOWBIT_TYPES:  # natural order whatever plane_major says
        from llcuda.kernels.quant_lowbit import lowbit_rows

        return lowbit_rows(w, out, ids, scale)
    ptrs, strides = _weight_args(w)
    wpg = _WPG[w.qtype]
    block_g = 128 // wpg  # 128 packed words (512 B) per row per program
    block_r = 16
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_groups, block_g))
    _dequant_rows_kernel[grid](
        out, ids if ids is not None else out, *ptrs, n_rows, w.n_rows, n_groups, out.stride(0),
        *strides, _MAGIC, scale,
        QTYPE=w.qtype, WPG=wpg, BLOCK_R=block_r, BLOCK_G=block_g, GATHER=ids is not None,
        PLANE_MAJOR=plane_major, USE_ASM=_use_asm(), num_warps=4,
    )
    return out


def dequantize_bf16(w: PackedWeight) -> torch.Tensor:
    """The whole matrix as bf16 [N, K], columns in plane-major order: a one-matmul workspace."""
    out = torch.empty((w.n_rows, w.n_cols), device=w.device, dtype=torch.bfloat16)
    return _launch(w, out, None, 1.0, plane_major=True)


def embedding_rows(w: PackedWeight, token_ids: torch.Tensor, scale: float = 1.0,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """token_ids [T] (on w's device) -> scale * rows [T, K] fp32, in the natural column order;
    written into `out` when given (fp32 [T, K] with unit column stride, e.g. a graph's input)."""
    if token_ids.dim() != 1 or token_ids.device != w.device:
        raise ValueError(f"token_ids must be 1-D on {w.device}, got {tuple(token_ids.shape)} "
                         f"on {token_ids.device}")
    shape = (token_ids.shape[0], w.n_cols)
    if out is None:
        out = torch.empty(shape, device=w.device, dtype=torch.float32)
    elif (out.shape != shape or out.dtype != torch.float32 or out.device != w.device
          or out.stride(1) != 1):  # fmt: skip
        raise ValueError(f"out must be float32 {shape} with unit column stride on {w.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return _launch(w, out, token_ids.to(torch.int64).contiguous(), scale, plane_major=False)
