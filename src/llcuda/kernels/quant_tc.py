"""Tensor-core paths over packed GGUF weights for batches past the GEMV (see matmul_path).

* `quant_gemm_swap`: out^T = W @ x^T. The dequantized weight tile is the *left* operand and the
  tokens are the MMA's narrow N side (16..128), which fits decode batches. Each K step decodes
  every plane of a [rows, 4 groups] tile into one bf16 tile in word-major order (the planes of a
  packed word side by side, `_word_major_tile`) for one dot; the activations are permuted to the
  same order once per call (`word_major`). The next step's weight loads are issued before this
  step's decode (software pipelining by hand). One dot per step instead of one per plane, and
  the hand pipelining, took Q5_0 1152x13824 at M=64 from 25.4 to 18.2 us on an H200.
* `quant_gemm_dense` (quant_dequant.dequantize_bf16 + cuBLAS): for long prefills, expand one
  matrix into a bf16 workspace and let cuBLAS run at tensor-core peak; the expansion costs
  ~3 bytes of traffic per weight, which a 512-token batch amortizes."""

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
    _tile_loads,
    _tile_maps,
    _use_asm,
    _weight_args,
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


def word_major(x: torch.Tensor, wpg: int) -> torch.Tensor:
    """x [M, K] -> bf16 [M, K] with each 32-element group in word-major order:
    out[m, 32g + k*P + p] = x[m, 32g + p*WPG + k], so element p of packed word k sits next to the
    other planes of the same word (the order `_word_major_tile` decodes a weight tile in)."""
    m, k = x.shape
    planes = GROUP // wpg
    out = torch.empty((m, k // GROUP, wpg, planes), device=x.device, dtype=torch.bfloat16)
    out.copy_(x.view(m, k // GROUP, planes, wpg).transpose(2, 3))
    return out.view(m, k)


@triton.jit
def _dequant_plane(QTYPE: tl.constexpr, NP: tl.constexpr, P: tl.constexpr, lo, hi, a_lo, a_hi, c,
                   magic, USE_ASM: tl.constexpr):
    """Plane P of a prepared [R, NW] word tile, scaled: bf16 [R, NW]."""
    if P < NP // 2:
        return (_plane(QTYPE, lo, hi, P, magic, USE_ASM) * a_lo + c).to(tl.bfloat16)
    else:
        return (_plane(QTYPE, lo, hi, P, magic, USE_ASM) * a_hi + c).to(tl.bfloat16)


@triton.jit
def _word_major_tile(QTYPE: tl.constexpr, NP: tl.constexpr, BLOCK_N: tl.constexpr,
                     NW: tl.constexpr, lo, hi, a_lo, a_hi, c, magic, USE_ASM: tl.constexpr):
    """Every plane of a prepared [BLOCK_N, NW] word tile -> bf16 [BLOCK_N, NW * NP], element
    j*NP + p = plane p of word j: one tile, one dot per K step (per-plane dots of K = NW serialize
    on their waits). Each join adds a trailing dim whose index selects its right operand, so
    joining planes (p, p + NP/2), then (p, p + NP/4), ... leaves slot s holding plane s."""
    # One return: Triton keeps generating the statements after a return in a constexpr branch.
    p0 = _dequant_plane(QTYPE, NP, 0, lo, hi, a_lo, a_hi, c, magic, USE_ASM)
    if NP == 1:
        t = p0
    else:
        p1 = _dequant_plane(QTYPE, NP, 1, lo, hi, a_lo, a_hi, c, magic, USE_ASM)
        if NP == 2:
            t = tl.join(p0, p1)
        else:
            p2 = _dequant_plane(QTYPE, NP, 2, lo, hi, a_lo, a_hi, c, magic, USE_ASM)
            p3 = _dequant_plane(QTYPE, NP, 3, lo, hi, a_lo, a_hi, c, magic, USE_ASM)
            if NP == 4:
                t = tl.join(tl.join(p0, p2), tl.join(p1, p3))
            else:
                p4 = _dequant_plane(QTYPE, NP, 4, lo, hi, a_lo, a_hi, c, magic, USE_ASM)
                p5 = _dequant_plane(QTYPE, NP, 5, lo, hi, a_lo, a_hi, c, magic, USE_ASM)
                p6 = _dequant_plane(QTYPE, NP, 6, lo, hi, a_lo, a_hi, c, magic, USE_ASM)
                p7 = _dequant_plane(QTYPE, NP, 7, lo, hi, a_lo, a_hi, c, magic, USE_ASM)
                t = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)),
                            tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    return tl.reshape(t, (BLOCK_N, NW * NP))


@triton.jit(do_not_specialize=["M", "N", "n_groups", "groups_per_split", "stride_osplit"])
def _quant_gemm_swap_kernel(
    x_ptr,  # [M, K] bf16 in word-major order (word_major), unit stride along K
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
    BLOCK_G: tl.constexpr,  # groups per K step (one dot of K = 32 * BLOCK_G)
    USE_ASM: tl.constexpr,
):
    NP: tl.constexpr = 32 // WPG
    NW: tl.constexpr = BLOCK_G * WPG
    KS: tl.constexpr = BLOCK_G * 32  # K per step
    # Token tiles of one weight tile are neighbours in launch order: the weight tile is fetched
    # from DRAM once and re-read from L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row = tl.minimum(offs_n, N - 1).to(tl.int64)[:, None]  # [BN, 1]
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[None, :] * stride_xm  # [1, BM]
    kk = tl.arange(0, KS)[:, None]  # [KS, 1]
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    g_begin = tl.program_id(2) * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, n_groups)
    # Software pipelining by hand: the weight loads of each step (words, high bits, scales: DRAM
    # reads) are issued a step ahead, and the activation tile (an L2 hit: every program reads the
    # same x) at the top of its own step, so both latencies hide behind the decode. Triton's
    # pipeliner would copy only the words ahead (cp.async needs 4-byte elements; the high bits and
    # scales are 1-2 bytes) and load the activations synchronously.
    words, hb, s0, s1, s2, s3 = _tile_loads(QTYPE, WPG, BLOCK_G, qs_ptr, qh_ptr, sc_ptr, mn_ptr,
                                            d_ptr, dmin_ptr, row, g_begin, g_end, s_qs, s_qh,
                                            s_sc, s_d)
    for g0 in range(g_begin, g_end, BLOCK_G):
        xt = tl.load(x_rows + g0 * 32 + kk, mask=g0 * 32 + kk < g_end * 32, other=0.0)  # [KS, BM]
        lo, hi, a_lo, a_hi, c = _tile_maps(QTYPE, WPG, BLOCK_N, BLOCK_G, words, hb, s0, s1, s2,
                                           s3)  # [BN, NW] each
        g_next = g0 + BLOCK_G  # past g_end: every load below is masked off
        words, hb, s0, s1, s2, s3 = _tile_loads(QTYPE, WPG, BLOCK_G, qs_ptr, qh_ptr, sc_ptr,
                                                mn_ptr, d_ptr, dmin_ptr, row, g_next, g_end, s_qs,
                                                s_qh, s_sc, s_d)
        w = _word_major_tile(QTYPE, NP, BLOCK_N, NW, lo, hi, a_lo, a_hi, c, magic,
                             USE_ASM)  # [BN, KS] bf16
        if USE_ASM:
            acc = tl.dot(w, xt, acc)
        else:  # Triton's interpreter multiplies bf16 as raw integers: fp32 there
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
    out = out_ptr + tl.program_id(2) * stride_osplit + offs_m[None, :] * N + offs_n[:, None]
    tl.store(out, acc, mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


def swap_config(qtype: int, m: int, n: int, n_groups: int, num_sms: int) -> dict:
    """Tiles for quant_gemm_swap: K steps of 4 groups (128 elements; at 8 groups ptxas needs all
    255 registers, and spills for Q4_K / Q6_K at 128 tokens); 128 weight rows and 8 warps from
    128 tokens on, 64 and 4 below; K split only where the tiles cover less than half the SMs.
    H200 (bench_gemm_paths.py --sweep --only 13824 --batches 64,128): Q5_0 1152x13824 takes
    18.2 us at M=64 and 23.7 us at M=128 with these tiles; the best of the sweep was 18.2, 23.2."""
    bm = min(128, max(16, triton.next_power_of_2(m)))
    bn, warps = (128, 8) if m >= 128 and n < 65536 else (64, 4)
    block_g = 4
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split_k = _split_k(tiles, 2 * num_sms, n_groups, block_g) if tiles < num_sms // 2 else 1
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_G": block_g, "SPLIT_K": split_k,
            "num_warps": warps}


def quant_gemm_swap(x: torch.Tensor, w: PackedWeight, config: dict | None = None,
                    partials: bool = False) -> torch.Tensor:
    """x [M, K] @ dequant(w).T -> [M, N] fp32, bf16 tensor cores with the weight as left operand
    (with `partials`, the split-K partial sums [S, M, N] unsummed)."""
    x = _check(x, w)
    m, n, n_groups = x.shape[0], w.n_rows, w.n_cols // GROUP
    dev = x.device.index if x.device.type == "cuda" else 0
    cfg = config or swap_config(w.qtype, m, n, n_groups, _num_sms(dev))
    xp = word_major(x, _WPG[w.qtype])
    groups_per_split, split_k = _split_groups(n_groups, cfg["SPLIT_K"], cfg["BLOCK_G"])
    out = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    ptrs, strides = _weight_args(w)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    _quant_gemm_swap_kernel[grid](
        xp, out, *ptrs, m, n, n_groups, groups_per_split, xp.stride(0), m * n, *strides, _MAGIC,
        QTYPE=w.qtype, WPG=_WPG[w.qtype], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_G=cfg["BLOCK_G"], USE_ASM=_use_asm(), num_warps=cfg["num_warps"],
        num_stages=1,  # the kernel pipelines its loads itself
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
