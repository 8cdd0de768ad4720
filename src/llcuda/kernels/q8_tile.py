"""Triton halves of kernels/q8_activations: a tile of activations quantized to int8 per group of
32 (quantize_q8_ref's q and dx, in Q8Rows' byte order), and one row of Q8Rows stored by a kernel
that holds the whole row (fused_norm's norms). The decode GEMV (quant_matmul) quantizes its own
tiles with the same function where no norm wrote them."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def quantize_q8_tile(xt):
    """xt [BG, 4, 8] fp32, element 8b + j of group g at [g, b, j] -> (words [BG, 8], byte b of
    word j = q[32g + 8b + j]; dx [BG]; sq_lo [BG] the sum of q over elements 0..15; sq [BG]),
    quantize_q8_ref's q and dx (exact integers as fp32 in the sums)."""
    bi = tl.arange(0, 4)[None, :, None]
    amax = tl.max(tl.max(tl.abs(xt), axis=2), axis=1)  # [BG]
    inv = tl.where(amax > 0.0, 127.0 / tl.where(amax > 0.0, amax, 1.0), 0.0)
    # 1.5 * 2^23 + v rounds v to the nearest integer (ties to even) in the low mantissa bits,
    # whose low byte is then round(v) in two's complement: no float-to-int conversion
    v = xt * inv[:, None, None] + 12582912.0
    qf = v - 12582912.0  # round(x / dx), exact
    qb = v.to(tl.int32, bitcast=True) & 0xFF
    words = tl.sum(qb << (bi * 8), axis=1)  # [BG, 8]: the four bytes are disjoint bit fields
    sq_lo = tl.sum(tl.sum(tl.where(bi < 2, qf, 0.0), axis=2), axis=1)  # elements 0..15
    sq = tl.sum(tl.sum(qf, axis=2), axis=1)
    return words, amax * (1.0 / 127.0), sq_lo, sq


@triton.jit
def store_q8_row(h, words_ptr, meta_ptr, row, n, BLOCK: tl.constexpr):
    """Row `row` of a Q8Rows (n elements, a multiple of 32) from h [BLOCK] fp32 (BLOCK >= 32 a
    power of two; elements from n on are ignored): for a kernel that holds the whole row."""
    G: tl.constexpr = BLOCK // 32
    words, dx, sq_lo, sq = quantize_q8_tile(tl.reshape(h, (G, 4, 8)))
    n_groups = n // 32
    gi = tl.arange(0, G)
    gmask = gi < n_groups
    offs = row * (n_groups * 8) + gi[:, None] * 8 + tl.arange(0, 8)[None, :]
    tl.store(words_ptr + offs, words, mask=gmask[:, None])
    meta = meta_ptr + row * (n_groups * 4) + gi * 4
    tl.store(meta, dx, mask=gmask)
    tl.store(meta + 1, sq_lo, mask=gmask)
    tl.store(meta + 2, sq, mask=gmask)
    tl.store(meta + 3, sq * 0.0, mask=gmask)
