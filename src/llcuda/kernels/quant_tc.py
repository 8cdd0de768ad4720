"""Tensor-core paths over packed GGUF weights for batches past the GEMV (see matmul_path).

* `quant_gemm_swap`: out^T = W @ x^T. The dequantized weight tile is the *left* operand and the
  tokens are the MMA's narrow N side (16..128), which fits decode batches. Each K step decodes
  every plane of a [rows, 4 groups] tile into one bf16 tile in word-major order (the planes of a
  packed word side by side, `_word_major_tile`) for one dot; the activations are permuted to the
  same order once per call (`word_major`). The next step's weight loads are issued before this
  step's decode (software pipelining by hand). One dot per step instead of one per plane, and
  the hand pipelining, took Q5_0 1152x13824 at M=64 from 25.4 to 18.2 us on an H200.
* `quant_gemm_dense` (quant_dequant.dequantize_bf16 + `dense_gemm`): for long prefills, expand
  one matrix into a bf16 workspace and run a Triton bf16 GEMM over the expanded workspace at
  tensor-core speed; the expansion costs ~3 bytes of traffic per weight, which a 512-token batch
  amortizes. The GEMM is ours rather than cuBLAS's so that cuBLAS is never loaded on the GPU
  path: its handle, module and 32 MiB workspace cost ~98 MiB of VRAM."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llcuda.kernels.matmul_path import DENSE_CHUNK_BYTES, dense_chunk_rows
from llcuda.kernels.quant_dequant import dequantize_bf16
from llcuda.kernels.quant_matmul import (
    _MAGIC,
    _WPG,
    _check,
    _grouped_tile,
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
from llcuda.kernels.quant_pack import GROUP, PackedWeight, row_slice


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


@triton.jit(do_not_specialize=["M", "stride_cs"])
def _dense_gemm_kernel(
    a_ptr,  # [M, K] bf16, unit stride along K (the tokens)
    b_ptr,  # [N, K] bf16, unit stride along K (the expanded weight)
    c_ptr,  # [S, M, N] fp32 split-K partial sums, unit stride along N (S = 1: the product)
    M, N, K,
    K_PER_SPLIT,  # K elements per split, a multiple of BLOCK_K (the last split may get fewer)
    stride_am, stride_bn, stride_cm, stride_cs,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row tiles per band of the launch order (L2 reuse)
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask on the K loads
    F32_DOT: tl.constexpr,  # Triton's interpreter multiplies bf16 as raw integers: fp32 there
):
    """c[s] = a[:, Ks] @ b[:, Ks].T with fp32 accumulation over split s's K range Ks: the classic
    tiled GEMM (Triton pipelines the loads), one output tile and one K range per program."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_s = tl.program_id(1)  # the K split
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    # Split boundaries are multiples of BLOCK_K, so every step but the last of the last split
    # lies wholly inside K: with EVEN_K none is masked, otherwise the mask below (against K, not
    # the split's end) cuts only that last step's tail.
    k_begin = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    # Rows past M or N re-read the last row (no mask on the hot loads); their sums are not stored.
    rows_a = tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_am  # [BM, 1]
    rows_b = tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_bn  # [BN, 1]
    a_ptrs = a_ptr + rows_a + (k_begin + offs_k)[None, :]  # [BM, BK]
    b_ptrs = b_ptr + rows_b + (k_begin + offs_k)[None, :]  # [BN, BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        if F32_DOT:
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc)
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = (c_ptr + pid_s.to(tl.int64) * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm
              + offs_n[None, :])
    tl.store(c_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def dense_config(m: int, n: int, k: int, num_sms: int = 132, partials: bool = False) -> dict:
    """Tiles for dense_gemm. 128x128 tiles with 8 warps (two warpgroups of 64-row wgmma) reuse
    each loaded byte most; up to 64 rows a 64-row tile (one warpgroup, 4 warps) wastes none of the
    MMA on padding. Gemma's N of 640..1536 gives few tiles at prefill sizes (N=1152 at M=512: 36
    of 128x128 for 132 SMs on an H100), so while fewer than half the SMs would get a tile the tile
    shrinks (rows first, then columns, to 64). K steps of 64 (128 bytes of bf16: one swizzled
    shared-memory row); stages keep the buffers within 96 KiB ((BM + BN) * 64 * 2 bytes each),
    which also fits the 99 KiB per block of sm_86 / sm_89. GROUP_M = 8 bands the launch order.

    SPLIT_K: even the smallest tiles leave the tall-K products with few programs, each running a
    long K loop on one SM while the others idle (K=6912 N=1152: 72 tiles of 64x128 at M=512, 36
    of 64x64 at M=128: 34.0 and 31.2 us on an H100 before the split, cuBLAS 16.7 and 13.1). So K
    splits into the S that brings tiles * S nearest the SM count (72 tiles: S = 2; 36: S = 4),
    while every split keeps at least 8 K steps of 64 (the pipeline's prologue and epilogue, about
    a step per stage, stay a small share of each program), 16 where dense_gemm adds the splits
    itself (a second kernel moving (S + 1) * M * N * 4 bytes, which only a long K loop repays);
    at most 8 splits. With `partials` the consumer adds them as it loads them (fused_norm), as
    every engine caller of quant_matmul does. About a full wave of tiles (K=1152 N=13824 from
    M=128 on: 108+ tiles) and, when adding, K < 2048 stay whole.
    Chosen from the shapes, not swept; bench_gemm_paths.py on an H100 after the split: K=6912
    N=1152 28.1 / 15.1 us at M=512 / 128 (23.9 / 12.0 as partials), cuBLAS 16.8 / 13.1."""
    bm, bn = (64 if m <= 64 else 128), 128
    while triton.cdiv(m, bm) * triton.cdiv(n, bn) < num_sms // 2 and bn > 64:
        if bm > 64:
            bm = 64
        else:
            bn = 64
    stages = 3 if bm == bn == 128 else 4
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    steps = triton.cdiv(k, 64)
    split_k = max(1, min((2 * num_sms + tiles) // (2 * tiles),  # round(num_sms / tiles)
                         steps // (8 if partials else 16), 8))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8, "SPLIT_K": split_k,
            "num_warps": 8 if bm == 128 else 4, "num_stages": stages}


def dense_gemm(a: torch.Tensor, b: torch.Tensor, config: dict | None = None,
               partials: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] bf16 @ b [N, K] bf16 .T -> [M, N] fp32 (fp32 accumulation), with the Triton
    kernel above: on the GPU path this stands in for torch.mm(a, b.t(), out_dtype=torch.float32),
    which would load cuBLAS. Both operands need unit stride along K. With `partials`, the split-K
    partial sums [S, M, N] unsummed (S >= 1; config["SPLIT_K"] or fewer, none of them empty).
    `out`: an fp32 [S, M, N] view with unit stride along N (e.g. columns of a wider product's
    partial sums) that takes the S split-K partial sums, returned unsummed; S must be what the
    split of K into config's BLOCK_K steps gives."""
    if (a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or a.dtype != torch.bfloat16
            or b.dtype != torch.bfloat16 or a.stride(1) != 1 or b.stride(1) != 1):
        raise ValueError(f"dense_gemm takes bf16 [M, K] and [N, K] with unit stride along K, got "
                         f"{a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    (m, k), n = a.shape, b.shape[0]
    if out is not None and (out.dim() != 3 or out.shape[1:] != (m, n)
                            or out.dtype != torch.float32 or out.stride(2) != 1):  # fmt: skip
        raise ValueError(f"dense_gemm's out must be float32 [S, {m}, {n}] with unit stride along "
                         f"N, got {out.dtype} {tuple(out.shape)}")
    if m == 0 or n == 0 or k == 0:
        if out is not None:
            return out.zero_()
        return _reduce_splits(torch.zeros((1, m, n), device=a.device, dtype=torch.float32),
                              partials)
    dev = a.device.index if a.device.type == "cuda" else 0
    cfg = config or dense_config(m, n, k, _num_sms(dev), partials)
    if out is not None:
        cfg = dict(cfg, SPLIT_K=out.shape[0])
    k_per_split, split_k = _split_groups(k, cfg.get("SPLIT_K", 1), cfg["BLOCK_K"])
    if out is None:
        parts = torch.empty((split_k, m, n), device=a.device, dtype=torch.float32)
    elif split_k != out.shape[0]:
        raise ValueError(f"K={k} splits into {split_k} steps of {cfg['BLOCK_K']}, not the "
                         f"{out.shape[0]} partial sums of out")
    else:
        parts = out  # [S, M, N]
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    _dense_gemm_kernel[grid](
        a, b, parts, m, n, k, k_per_split, a.stride(0), b.stride(0), parts.stride(1),
        parts.stride(0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], EVEN_K=k % cfg["BLOCK_K"] == 0,
        F32_DOT=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return parts if out is not None else _reduce_splits(parts, partials)


def quant_gemm_dense(x: torch.Tensor, w: PackedWeight, partials: bool = False) -> torch.Tensor:
    """x [M, K] @ dequant(w).T -> [M, N] fp32 via a bf16 workspace and a Triton bf16 GEMM over the
    expanded workspace (`dense_gemm`; both operands in plane-major column order: the same
    permutation of K on each side leaves the product as is). With `partials`, the GEMM's split-K
    partial sums [S, M, N] unsummed (S >= 1).

    The output is fp32: with a bf16 output, teacher-forced Gemma 3 270M left llama.cpp's noise
    band on one golden step (a 0.83 nat gap; 0.50 with fp32 output, 0.42 fused; measured when this
    GEMM was cuBLAS's, whose fp32-output call also cost more host time: 143 vs 24 us per call on
    the H100 host).

    A matrix whose workspace would pass DENSE_CHUNK_BYTES is expanded and multiplied in equal
    chunks of rows no larger than that (each chunk's GEMM writing its columns of the product's
    partial sums, all split along K alike), so the workspace stays that size whatever the matrix.
    """
    x = _check(x, w)  # CUDA, or the CPU under TRITON_INTERPRET=1 (dense_gemm runs there too)
    xp = plane_major(x, _WPG[w.qtype])  # [M, K] bf16
    (m, k), n = x.shape, w.n_rows
    chunk = dense_chunk_rows(n, k, DENSE_CHUNK_BYTES)
    if chunk == n:
        return dense_gemm(xp, dequantize_bf16(w), partials=partials)  # wd [N, K] bf16
    dev = x.device.index if x.device.type == "cuda" else 0
    cfg = dense_config(m, chunk, k, _num_sms(dev), partials)
    split_k = _split_groups(k, cfg["SPLIT_K"], cfg["BLOCK_K"])[1]
    parts = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        dense_gemm(xp, dequantize_bf16(row_slice(w, r0, r1)), cfg, out=parts[:, :, r0:r1])
    return _reduce_splits(parts, partials)
