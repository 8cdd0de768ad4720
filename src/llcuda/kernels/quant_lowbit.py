"""Triton kernels for the low-bit types (quant_pack.LOWBIT_TYPES): Q2_K here, and through
quant_iq's per-element decoder the IQ1/IQ2/IQ3 grid types, TQ1_0, TQ2_0 and MXFP4. (IQ4_NL,
IQ4_XS and Q3_K are plane types of quant_matmul's kernels.)

These weights are packed in natural element order (quant_pack's docstring): word i of a row holds
32 / bits consecutive elements. One decoder, `_lowbit_tile`, turns a [BLOCK_N rows, BLOCK_K
columns] tile into fp32 weights: each word tile [BN, BK / per_word] is shifted by
bits * (0..per_word-1) along a new axis and flattened back, so the decoded tile, its scales
(broadcast from [BN, BK / 16 or 32]) and the activations x[k0:k0 + BK] share one layout. Values
become floats without I2F: a small integer OR'ed under the exponent of 2^23 is 2^23 + q exactly,
and one FADD removes 2^23.

Three kernels use it:
* `_lowbit_gemv_kernel` (M <= GEMV_MAX_M, decode): fp32 FMAs; K split over a second grid axis
  when the row tiles alone would not fill the GPU.
* `_lowbit_gemm_kernel` (larger M, prefill): the tile cast to bf16 (fp16 below sm_80, with each
  activation row pre-scaled by a power of two as quant_matmul.quant_gemm does) and `tl.dot` with
  fp32 accumulation.
* `_lowbit_rows_kernel`: rows expanded to fp32 (embedding gathers) or bf16.
The launch configurations are first choices, not tuned on a device yet.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llcuda.kernels import iq_tables
from llcuda.kernels.quant_iq import _iq_tile
from llcuda.kernels.quant_matmul import _gemm_activations, _num_sms, _reduce_splits, _use_fp16
from llcuda.kernels.quant_pack import FIELD_TYPES, LOWBIT_TYPES, PackedWeight

GEMV_MAX_M = 16  # the GEMV's M loop is unrolled; larger batches take the tensor-core GEMM
BLOCK_K = 256  # columns per K step: one super-block (eight IQ4_NL blocks)


@triton.jit
def _spread(words, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 words [BN, BK * BITS / 32] -> their BITS-bit fields [BN, BK] in element order."""
    PER: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PER) * BITS
    v = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(v, (BLOCK_N, BLOCK_K))


@triton.jit
def _per_element(v, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BN, BK / GROUP] per-group values -> [BN, BK], each repeated over its GROUP elements."""
    return tl.reshape(tl.broadcast_to(v[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP)),
                      (BLOCK_N, BLOCK_K))  # fmt: skip


@triton.jit
def _small_int(q):
    """fp32 q for ints 0 <= q < 2^23: q under the exponent of 2^23, then one FADD."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _lowbit_tile(QTYPE: tl.constexpr, qs_ptr, qh_ptr, sc_ptr, sg_ptr, d_ptr, dmin_ptr, tab_ptr,
                 row, k0, K, s_qs, s_qh, s_sc, s_sg, s_d, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):  # fmt: skip
    """fp32 weights [BLOCK_N, BLOCK_K] of rows `row` ([BN, 1] int64) and columns k0..k0 + BK
    (a multiple of 32; columns from K on are 0). Strides are in elements of each array (words
    for Q2_K's qs, bytes for sc, halves for d; bytes for every field of the FIELD_TYPES, which
    quant_iq decodes, with their grid in tab_ptr)."""
    if QTYPE != 10:
        return _iq_tile(QTYPE, qs_ptr, qh_ptr, sc_ptr, sg_ptr, d_ptr, tab_ptr, row, k0, K, s_qs,
                        s_qh, s_sc, s_sg, s_d, BLOCK_N, BLOCK_K)  # fmt: skip
    else:  # Q2_K, 2-bit words of 16 elements: w = d * (sc & 15) * q - dmin * (sc >> 4) per 16
        G: tl.constexpr = BLOCK_K // 16
        grp = k0 // 16 + tl.arange(0, G)  # [G] 16-element groups
        gmask = (grp * 16 < K)[None, :]
        words = tl.load(qs_ptr + row * s_qs + grp[None, :], mask=gmask, other=0)
        q = _spread(words, 2, BLOCK_N, BLOCK_K)  # [BN, BK] in 0..3
        d = tl.load(d_ptr + row * s_d + (grp // 16)[None, :], mask=gmask, other=0.0)
        d = d.to(tl.float32)  # [BN, G]
        sc = tl.load(sc_ptr + row * s_sc + grp[None, :], mask=gmask, other=0).to(tl.int32)
        dmin = tl.load(dmin_ptr + row * s_d + (grp // 16)[None, :], mask=gmask, other=0.0)
        a = d * (sc & 15).to(tl.float32)
        c = dmin.to(tl.float32) * (sc >> 4).to(tl.float32)
        qf = _small_int(q)
        return (_per_element(a, 16, BLOCK_N, BLOCK_K) * qf
                - _per_element(c, 16, BLOCK_N, BLOCK_K))  # fmt: skip


@triton.jit(do_not_specialize=["M", "N", "K", "k_per_split", "stride_osplit"])
def _lowbit_gemv_kernel(
    x_ptr,  # [M, K] activations (fp32/bf16/fp16), unit stride along K
    out_ptr,  # [SPLIT_K, M, N] fp32 partial sums
    qs_ptr, qh_ptr, sc_ptr, sg_ptr, d_ptr, dmin_ptr, tab_ptr,  # see _weight_args
    M, N, K, k_per_split,  # k_per_split: a multiple of BLOCK_K
    stride_xm, stride_osplit, s_qs, s_qh, s_sc, s_sg, s_d,
    QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row = tl.minimum(rows, N - 1).to(tl.int64)[:, None]  # clamped: rows past N are not stored
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    m_idx = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)  # summed over K once, after the loop
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # the last split may run a few fully masked steps: loop bounds from arguments only
    for k0 in tl.range(k_begin, k_begin + k_per_split, BLOCK_K):
        w = _lowbit_tile(
            QTYPE,
            qs_ptr,
            qh_ptr,
            sc_ptr,
            sg_ptr,
            d_ptr,
            dmin_ptr,
            tab_ptr,
            row,
            k0,
            k_end,
            s_qs,
            s_qh,
            s_sc,
            s_sg,
            s_d,
            BLOCK_N,
            BLOCK_K,
        )  # [BN, BK]
        cols = k0 + tl.arange(0, BLOCK_K)
        kmask = cols < k_end
        if BLOCK_M == 1:
            x = tl.load(x_ptr + cols, mask=kmask, other=0.0, eviction_policy="evict_last")
            acc += w * x.to(tl.float32)[None, :]
        else:
            for m in tl.static_range(BLOCK_M):
                x = tl.load(x_ptr + m * stride_xm + cols, mask=kmask & (m < M), other=0.0,
                            eviction_policy="evict_last")  # fmt: skip
                s = tl.sum(w * x.to(tl.float32)[None, :], axis=1)  # [BN]
                acc = tl.where(m_idx[:, None] == m, acc + s[None, :], acc)
    out = out_ptr + pid_k * stride_osplit
    if BLOCK_M == 1:
        tl.store(out + rows, tl.sum(acc, axis=1), mask=rows < N)
    else:
        tl.store(out + m_idx[:, None] * N + rows[None, :], acc,
                 mask=(m_idx[:, None] < M) & (rows[None, :] < N))  # fmt: skip


@triton.jit(do_not_specialize=["M", "N", "K", "k_per_split", "stride_osplit"])
def _lowbit_gemm_kernel(
    x_ptr,  # [M, K] bf16 (fp16 pre-divided by xscale when USE_FP16), unit stride
    out_ptr,  # [SPLIT_K, M, N] fp32 partial sums
    xscale_ptr,  # [M] fp32 power-of-two row scales (USE_FP16 only)
    qs_ptr, qh_ptr, sc_ptr, sg_ptr, d_ptr, dmin_ptr, tab_ptr,
    M, N, K, k_per_split, stride_xm, stride_osplit, s_qs, s_qh, s_sc, s_sg, s_d,
    QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, USE_FP16: tl.constexpr, F32_DOT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row tiles share each weight tile in L2
    first_m = (pid // (GROUP_M * num_pid_n)) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    xrow = tl.minimum(offs_m, M - 1).to(tl.int64)[:, None]  # [BM, 1]
    row = tl.minimum(offs_n, N - 1).to(tl.int64)[:, None]  # [BN, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # split-K (program_id 1): a few output tiles (a decode batch through k/v) fill more SMs
    k_begin = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    for k0 in tl.range(k_begin, k_begin + k_per_split, BLOCK_K):
        w = _lowbit_tile(
            QTYPE,
            qs_ptr,
            qh_ptr,
            sc_ptr,
            sg_ptr,
            d_ptr,
            dmin_ptr,
            tab_ptr,
            row,
            k0,
            k_end,
            s_qs,
            s_qh,
            s_sc,
            s_sg,
            s_d,
            BLOCK_N,
            BLOCK_K,
        )  # [BN, BK]
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + xrow * stride_xm + cols[None, :], mask=(cols < k_end)[None, :],
                    other=0.0)  # fmt: skip
        if F32_DOT:  # the interpreter: numpy has no bf16 matmul
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc)
        elif USE_FP16:
            acc = tl.dot(x, tl.trans(w.to(tl.float16)), acc)
        else:
            acc = tl.dot(x, tl.trans(w.to(tl.bfloat16)), acc)
    if USE_FP16:
        acc = acc * tl.load(xscale_ptr + tl.minimum(offs_m, M - 1))[:, None]
    out = out_ptr + tl.program_id(1) * stride_osplit
    tl.store(out + offs_m[:, None] * N + offs_n[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))  # fmt: skip


@triton.jit
def _lowbit_rows_kernel(
    out_ptr,  # [R, K] fp32 / bf16
    ids_ptr,  # [R] int64 source rows (GATHER)
    qs_ptr, qh_ptr, sc_ptr, sg_ptr, d_ptr, dmin_ptr, tab_ptr,
    R, N, K, stride_out, s_qs, s_qh, s_sc, s_sg, s_d, scale,
    QTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    src = tl.minimum(offs_r, R - 1)
    if GATHER:
        src = tl.load(ids_ptr + src)
    row = tl.minimum(tl.maximum(src, 0), N - 1).to(tl.int64)[:, None]  # no id reads past N
    k0 = tl.program_id(1) * BLOCK_K
    w = _lowbit_tile(QTYPE, qs_ptr, qh_ptr, sc_ptr, sg_ptr, d_ptr, dmin_ptr, tab_ptr, row, k0, K,
                     s_qs, s_qh, s_sc, s_sg, s_d, BLOCK_R, BLOCK_K)  # fmt: skip
    cols = k0 + tl.arange(0, BLOCK_K)
    dst = out_ptr + offs_r.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(
        dst,
        (w * scale).to(out_ptr.dtype.element_ty),
        mask=(offs_r < R)[:, None] & (cols < K)[None, :],
    )


# --------------------------------------------------------------------------------------------
# Checked wrappers


class LowbitError(ValueError):
    """Arguments the low-bit kernels cannot take (type, shape, dtype or device)."""


def _weight_args(w: PackedWeight) -> tuple[tuple, tuple]:
    """(pointers qs, qh, sc, signs, d, dmin, grid table; strides of qs, qh, sc, signs, d) for
    the kernels: qs as int32 words for Q2_K, every field as bytes for FIELD_TYPES; absent
    arrays get qs (never read)."""
    if w.qtype not in LOWBIT_TYPES:
        raise LowbitError(f"quant_lowbit takes {sorted(LOWBIT_TYPES)}, got type {w.qtype}")
    qs = w.qs if w.qtype in FIELD_TYPES else w.qs.view(torch.int32)
    qh, sc, sg = (t if t is not None else qs for t in (w.qh, w.sc, w.signs))
    d = w.d if w.d is not None else qs  # MXFP4 keeps its scales in sc
    dmin = w.dmin if w.dmin is not None else d
    tab = iq_tables.grid(w.qtype, w.device) if w.qtype in iq_tables.GRID_TYPES else qs
    strides = (qs.stride(0), qh.stride(0), sc.stride(0), sg.stride(0), d.stride(0))
    return (qs, qh, sc, sg, d, dmin, tab), strides


def _check(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    if not isinstance(w, PackedWeight):
        raise LowbitError(f"w must be a PackedWeight, got {type(w).__name__}")
    if x.dim() != 2 or x.shape[1] != w.n_cols:
        raise LowbitError(f"x must be [M, {w.n_cols}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise LowbitError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.device != w.device:
        raise LowbitError(f"x is on {x.device}, weight on {w.device}")
    if x.device.type != "cuda" and not _interpreted():
        raise LowbitError("the low-bit kernels run on CUDA tensors (or TRITON_INTERPRET=1)")
    return x if x.stride(1) == 1 else x.contiguous()


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gemv_config(m: int, n: int, k: int, num_sms: int) -> dict:
    """BLOCK_N, SPLIT_K, num_warps of the decode GEMV: 16-row tiles (a [16, 256] fp32 tile and
    its accumulator in 64 registers a thread at 4 warps), K split until ~2 programs per SM."""
    block_n = 16
    tiles = triton.cdiv(n, block_n)
    k_steps = triton.cdiv(k, BLOCK_K)
    split_k = max(1, min(k_steps, triton.cdiv(2 * num_sms, tiles)))
    return {"BLOCK_N": block_n, "SPLIT_K": split_k, "num_warps": 4}


def lowbit_gemv(x: torch.Tensor, w: PackedWeight, partials: bool = False,
                config: dict | None = None) -> torch.Tensor:  # fmt: skip
    """x [M <= 16, K] @ dequant(w).T -> [M, N] fp32 (fp32 FMAs); with `partials`, the split-K
    partial sums [S, M, N]."""
    x = _check(x, w)
    m, n, k = x.shape[0], w.n_rows, w.n_cols
    if not 0 < m <= GEMV_MAX_M:
        raise LowbitError(f"lowbit_gemv takes 1 <= M <= {GEMV_MAX_M}, got {m}")
    dev = x.device.index if x.device.type == "cuda" else 0
    cfg = config or gemv_config(m, n, k, _num_sms(dev or 0))
    k_per_split = triton.cdiv(triton.cdiv(k, cfg["SPLIT_K"]), BLOCK_K) * BLOCK_K
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    ptrs, strides = _weight_args(w)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    _lowbit_gemv_kernel[grid](
        x, out, *ptrs, m, n, k, k_per_split, x.stride(0), m * n, *strides,
        QTYPE=w.qtype, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=BLOCK_K, num_warps=cfg["num_warps"],
    )  # fmt: skip
    return _reduce_splits(out, partials)


def gemm_config(m: int, n: int, k: int = 4096, num_sms: int = 132) -> dict:
    """Tiles of the tensor-core GEMM: K steps of 64 columns (the decoded fp32 tile stays in
    registers), 64x64 up to 64 rows, 128x128 above; K split while the tiles cover less than
    the SMs, keeping at least four K steps per split."""
    if m <= 64:
        cfg = {"BLOCK_M": 64 if m > 16 else 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8,
               "num_warps": 4, "num_stages": 2}  # fmt: skip
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
               "num_stages": 2}  # fmt: skip
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    split = 1
    if tiles < num_sms:
        split = max(1, min(triton.cdiv(2 * num_sms, tiles), k // (4 * cfg["BLOCK_K"])))
    return {**cfg, "SPLIT_K": split}


def lowbit_gemm(x: torch.Tensor, w: PackedWeight, config: dict | None = None,
                use_fp16: bool | None = None, partials: bool = False) -> torch.Tensor:  # fmt: skip
    """x [M, K] @ dequant(w).T -> [M, N] fp32 on tensor cores (bf16; fp16 below sm_80); with
    `partials`, the split-K partial sums [S, M, N]."""
    x = _check(x, w)
    m, n, k = x.shape[0], w.n_rows, w.n_cols
    if m == 0:
        out = torch.empty((1, 0, n), device=x.device, dtype=torch.float32)
        return out if partials else out[0]
    dev = x.device.index if x.device.type == "cuda" else 0
    cfg = config or gemm_config(m, n, k, _num_sms(dev or 0))
    if use_fp16 is None:
        use_fp16 = _use_fp16(x.device)
    x, xscale = _gemm_activations(x, use_fp16)
    bk = cfg["BLOCK_K"]
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.get("SPLIT_K", 1)), bk) * bk
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    ptrs, strides = _weight_args(w)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    _lowbit_gemm_kernel[grid](
        x, out, xscale, *ptrs, m, n, k, k_per_split, x.stride(0), m * n, *strides,
        QTYPE=w.qtype, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk,
        GROUP_M=cfg["GROUP_M"], USE_FP16=use_fp16, F32_DOT=_interpreted(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return _reduce_splits(out, partials)


def lowbit_matmul(x: torch.Tensor, w: PackedWeight, partials: bool = False) -> torch.Tensor:
    """y = x @ dequantize(w).T [M, N] fp32 for a LOWBIT_TYPES weight: the GEMV up to GEMV_MAX_M
    rows, the tensor-core GEMM beyond; with `partials`, [S, M, N] split-K partial sums."""
    # each path checks its arguments (once per launch): anything but a small [M, K] tensor goes
    # to lowbit_gemm, which raises for what it cannot take
    if isinstance(x, torch.Tensor) and x.dim() == 2 and 0 < x.shape[0] <= GEMV_MAX_M:
        return lowbit_gemv(x, w, partials=partials)
    return lowbit_gemm(x, w, partials=partials)


def lowbit_rows(w: PackedWeight, out: torch.Tensor, ids: torch.Tensor | None,
                scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Rows of w expanded into `out` [R, K] (fp32 or bf16, unit column stride), scaled: rows
    ids[r] (int64 on w's device) or, without ids, rows 0..R-1. Returns out."""
    n_rows = out.shape[0]
    if n_rows == 0:
        return out
    ptrs, strides = _weight_args(w)
    block_r, block_k = 16, BLOCK_K
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(w.n_cols, block_k))
    _lowbit_rows_kernel[grid](
        out, ids if ids is not None else out, *ptrs, n_rows, w.n_rows, w.n_cols, out.stride(0),
        *strides, scale, QTYPE=w.qtype, BLOCK_R=block_r, BLOCK_K=block_k,
        GATHER=ids is not None, num_warps=4,
    )  # fmt: skip
    return out
