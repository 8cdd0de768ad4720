"""Tensor-core paths over packed GGUF weights for batches past the GEMV (see matmul_path).

* `quant_gemm_swap`: out^T = W @ x^T. The dequantized weight tile is the *left* operand, so on
  Hopper it feeds wgmma straight from registers (no shared-memory round trip), and the tokens are
  the MMA's narrow N side (16..128), which fits decode batches. Activations are first permuted to
  plane-major order (`plane_major`), so each plane's slice of a K step is one contiguous run.
* `quant_gemm_dense` (quant_dequant.dequantize_bf16 + cuBLAS): for long prefills, expand one
  matrix into a bf16 workspace and let cuBLAS run at tensor-core peak; the expansion costs
  ~3 bytes of traffic per weight, which a 512-token batch amortizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llcuda.kernels.quant_dequant import dequantize_bf16
from llcuda.kernels.quant_matmul import (
    _MAGIC,
    _WPG,
    _check,
    _num_sms,
    _plane,
    _reduce_splits,
    _split_groups,
    _split_k,
    _use_asm,
    _weight_args,
    _weight_tile,
)
from llcuda.kernels.quant_pack import GROUP, PackedWeight


def plane_major(x: torch.Tensor, wpg: int) -> torch.Tensor:
    """x [M, K] -> bf16 [M, K] in plane-major order: [M, P, K/32 * WPG], where
    out[m, p, g*WPG + k] = x[m, 32g + p*WPG + k] (P = 32 / WPG planes). One copy kernel."""
    m, k = x.shape
    planes = GROUP // wpg
    out = torch.empty((m, planes, k // GROUP, wpg), device=x.device, dtype=torch.bfloat16)
    out.copy_(x.view(m, k // GROUP, planes, wpg).transpose(1, 2))
    return out.view(m, k)


@triton.jit(do_not_specialize=["M", "N", "n_groups", "groups_per_split", "stride_osplit"])
def _quant_gemm_swap_kernel(
    x_ptr,  # [M, K] bf16 in plane-major order (plane_major), unit stride along K
    out_ptr,  # [SPLIT_K, M, N] fp32
    qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dmin_ptr,
    M, N, n_groups, groups_per_split,
    stride_xm, stride_osplit,
    s_qs, s_qh, s_sc, s_d,
    magic,
    QTYPE: tl.constexpr,
    WPG: tl.constexpr,
    BLOCK_M: tl.constexpr,  # tokens: the MMA's N side (>= 16)
    BLOCK_N: tl.constexpr,  # weight rows: the MMA's M side (64 per warpgroup)
    BLOCK_G: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    NP: tl.constexpr = 32 // WPG
    NW: tl.constexpr = BLOCK_G * WPG
    # Token tiles of one weight tile are neighbours in launch order: the weight tile is fetched
    # from DRAM once and re-read from L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row = tl.minimum(offs_n, N - 1).to(tl.int64)[:, None]  # [BN, 1]
    xrow = tl.minimum(offs_m, M - 1).to(tl.int64)[None, :]  # [1, BM]
    j = tl.arange(0, NW)
    jg = j // WPG
    plane_stride = n_groups * WPG  # elements between planes of one activation row
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    g_begin = tl.program_id(2) * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, n_groups)
    for g0 in tl.range(g_begin, g_end, BLOCK_G, num_stages=NUM_STAGES):
        lo, hi, a_lo, a_hi, c = _weight_tile(QTYPE, WPG, BLOCK_N, BLOCK_G, qs_ptr, qh_ptr, sc_ptr,
                                             mn_ptr, d_ptr, dmin_ptr, row, g0, g_end, s_qs, s_qh,
                                             s_sc, s_d)  # [BN, NW] each
        xcol = (g0 * WPG + j)[:, None]  # [NW, 1]
        xmask = (g0 + jg < g_end)[:, None]
        for p in tl.static_range(NP):
            if p < NP // 2:
                w = _plane(QTYPE, lo, hi, p, magic, USE_ASM) * a_lo + c  # [BN, NW]
            else:
                w = _plane(QTYPE, lo, hi, p, magic, USE_ASM) * a_hi + c
            # Reading x in its own order instead (runs of WPG, converted here) measured slower on
            # H100: 44.7 vs 33.3 us for Q5_0 1152x13824 at M=64.
            xt = tl.load(x_ptr + xrow * stride_xm + p * plane_stride + xcol, mask=xmask,
                         other=0.0)  # [NW, BM]
            if USE_ASM:
                acc = tl.dot(w.to(tl.bfloat16), xt, acc)
            else:  # Triton's interpreter multiplies bf16 as raw integers: fp32 there
                acc = tl.dot(w.to(tl.bfloat16).to(tl.float32), xt.to(tl.float32), acc)
    out = out_ptr + tl.program_id(2) * stride_osplit + offs_m[None, :] * N + offs_n[:, None]
    tl.store(out, acc, mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


def swap_config(qtype: int, m: int, n: int, n_groups: int, num_sms: int) -> dict:
    """Tiles for quant_gemm_swap. H100 sweep (benchmarks/bench_gemm_paths.py --sweep): 128 weight
    rows and 8 warps from 64 tokens on, except the 262144-row LM head (64 and 4 throughout);
    two pipeline stages (each holds every plane's activation tile: BLOCK_M KiB at 4 bits); K split
    only where the tiles cover less than half the SMs (Q5_0 1152x13824 at M=64, 108 tiles: 25.2 us
    unsplit, 33.3 us in two)."""
    bm = min(128, max(16, triton.next_power_of_2(m)))
    bn, warps = (128, 8) if m >= 64 and n < 65536 else (64, 4)
    block_g = 32 // _WPG[qtype]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split_k = _split_k(tiles, 2 * num_sms, n_groups, block_g) if tiles < num_sms // 2 else 1
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_G": block_g, "SPLIT_K": split_k,
            "num_warps": warps, "num_stages": 2}


def quant_gemm_swap(x: torch.Tensor, w: PackedWeight, config: dict | None = None,
                    partials: bool = False) -> torch.Tensor:
    """x [M, K] @ dequant(w).T -> [M, N] fp32, bf16 tensor cores with the weight as left operand
    (with `partials`, the split-K partial sums [S, M, N] unsummed)."""
    x = _check(x, w)
    m, n, n_groups = x.shape[0], w.n_rows, w.n_cols // GROUP
    dev = x.device.index if x.device.type == "cuda" else 0
    cfg = config or swap_config(w.qtype, m, n, n_groups, _num_sms(dev))
    xp = plane_major(x, _WPG[w.qtype])
    groups_per_split, split_k = _split_groups(n_groups, cfg["SPLIT_K"], cfg["BLOCK_G"])
    out = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    ptrs, strides = _weight_args(w)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    _quant_gemm_swap_kernel[grid](
        xp, out, *ptrs, m, n, n_groups, groups_per_split, xp.stride(0), m * n, *strides, _MAGIC,
        QTYPE=w.qtype, WPG=_WPG[w.qtype], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_G=cfg["BLOCK_G"], NUM_STAGES=cfg["num_stages"], USE_ASM=_use_asm(),
        num_warps=cfg["num_warps"],
    )
    return _reduce_splits(out, partials)


def quant_gemm_dense(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x [M, K] @ dequant(w).T -> [M, N] fp32 via a bf16 workspace and cuBLAS (both operands in
    plane-major column order: the same permutation of K on each side leaves the product as is).

    The output stays fp32 although cuBLAS's fp32-output call costs more host time (143 vs 24 us
    per call on the H100 host): with a bf16 output, teacher-forced Gemma 3 270M left llama.cpp's
    noise band on one golden step (a 0.83 nat gap; 0.50 with fp32 output, 0.42 fused).
    """
    x = _check(x, w)
    wd = dequantize_bf16(w)
    xp = plane_major(x, _WPG[w.qtype])
    if x.device.type == "cuda":
        return torch.mm(xp, wd.t(), out_dtype=torch.float32)
    return xp.float() @ wd.float().t()
