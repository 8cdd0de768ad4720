"""Per-element decoding of the grid types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M),
TQ1_0, TQ2_0 and MXFP4 for quant_lowbit's kernels, from their raw block fields
(quant_pack.FIELD_TYPES): each element of a [BLOCK_N, BLOCK_K] tile loads the bytes it needs
(its grid index, sign byte, scale), and the grid value from the type's table (iq_tables, int8
[entries * values]). The formulas are llama.cpp's dequantize_row_* (as dequant_ref restates
them); the byte loads repeat across the elements that share a byte and are served by L1. This is
the simple form, not yet tuned for bandwidth.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _u8(ptr, row, stride, off, mask):
    """Bytes at `off` ([1, BK] or [BN, BK]) of rows `row` ([BN, 1]) as int32."""
    return tl.load(ptr + row * stride + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _u16(ptr, row, stride, half_off, mask):
    """Little-endian u16 number `half_off` of each row (byte stride `stride`) as int32."""
    p = (ptr + row * stride).to(tl.pointer_type(tl.int16))
    return tl.load(p + half_off, mask=mask, other=0).to(tl.int32) & 0xFFFF


@triton.jit
def _u32(ptr, row, stride, word_off, mask):
    """Little-endian u32 number `word_off` of each row (byte stride `stride`) as int32 bits."""
    p = (ptr + row * stride).to(tl.pointer_type(tl.int32))
    return tl.load(p + word_off, mask=mask, other=0)


@triton.jit
def _f16(ptr, row, stride, idx, mask):
    return tl.load(ptr + row * stride + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _sign(bits, t):
    """+1.0 / -1.0 from bit t of `bits`."""
    return 1.0 - 2.0 * ((bits >> t) & 1).to(tl.float32)


@triton.jit
def _ksign(s7):
    """ksigns_iq2xs[s7]: 7 sign bits and an 8th that makes the count of set bits even."""
    p = s7 ^ (s7 >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return s7 | ((p & 1) << 7)


@triton.jit
def _iq_tile(
    QTYPE: tl.constexpr,
    qs_ptr,
    qh_ptr,
    sc_ptr,
    sg_ptr,
    d_ptr,
    tab_ptr,
    row,
    k0,
    K,
    s_qs,
    s_qh,
    s_sc,
    s_sg,
    s_d,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 weights [BLOCK_N, BLOCK_K] of rows `row` ([BN, 1] int64) and columns k0.. (columns
    from K on are 0). Strides: bytes for the uint8 fields, halves for d."""  # fmt: skip
    cols = k0 + tl.arange(0, BLOCK_K)[None, :]  # [1, BK]
    m = cols < K
    if QTYPE == 39:  # MXFP4: e8m0 exponent byte per 32, nibbles (low: elements 0-15)
        b32, t = cols // 32, cols % 32
        nib = (_u8(qs_ptr, row, s_qs, b32 * 16 + t % 16, m) >> (4 * (t // 16))) & 15
        e = _u8(sc_ptr, row, s_sc, b32, m)
        d = tl.where(e < 2, 0x00200000 << tl.minimum(e, 1), (e - 1) << 23).to(
            tl.float32, bitcast=True
        )
        mag = nib & 7  # e2m1 doubled: 0 1 2 3 4 6 8 12
        word = tl.where(mag < 4, 0x03020100, 0x0C080604)
        v = ((word >> ((mag & 3) * 8)) & 0xFF).to(tl.float32)
        return d * tl.where(nib >= 8, -v, v)
    blk, j = cols // 256, cols % 256
    if QTYPE == 35:  # TQ2_0: element 128h + 32jj + l in bits 2jj of byte 32h + l, minus 1
        q = (_u8(qs_ptr, row, s_qs, blk * 64 + 32 * (j // 128) + j % 32, m)
             >> (2 * ((j % 128) // 32))) & 3  # fmt: skip
        return _f16(d_ptr, row, s_d, blk, m) * (q - 1).to(tl.float32)
    if QTYPE == 34:  # TQ1_0: base-3 digits, digit k of byte x read as ((x * 3^k mod 256) * 3) >> 8
        in_qs1 = j >= 160
        in_qh = j >= 240
        off = tl.where(in_qh, (j - 240) % 4, tl.where(in_qs1, 32 + (j - 160) % 16, j % 32))
        k = tl.where(in_qh, (j - 240) // 4, tl.where(in_qs1, (j - 160) // 16, j // 32))
        byte = tl.where(in_qh, _u8(qh_ptr, row, s_qh, blk * 4 + off, m & in_qh),
                        _u8(qs_ptr, row, s_qs, blk * 48 + off, m & (j < 240)))  # fmt: skip
        p3 = tl.where(k == 0, 1, tl.where(k == 1, 3, tl.where(k == 2, 9, tl.where(k == 3, 27, 81))))
        q = (byte * p3) & 255
        return _f16(d_ptr, row, s_d, blk, m) * (((q * 3) >> 8) - 1).to(tl.float32)
    d = _f16(d_ptr, row, s_d, blk, m)  # [BN, BK] the block's d
    if QTYPE == 16:  # IQ2_XXS: per 32: 4 grid bytes, a u32 of 4 x 7 sign bits and a 4-bit scale
        ib, g = j // 32, (j % 32) // 8
        idx = _u8(qs_ptr, row, s_qs, blk * 64 + ib * 8 + g, m)
        aux = _u32(qs_ptr, row, s_qs, blk * 16 + ib * 2 + 1, m)
        db = d * (0.5 + ((aux >> 28) & 15).to(tl.float32)) * 0.25
        grid = _u8(tab_ptr, 0, 0, idx * 8 + j % 8, m).to(tl.float32)
        return db * grid * _sign(_ksign((aux >> (7 * g)) & 127), j % 8)
    if QTYPE == 17:  # IQ2_XS: per 8 a u16 (9-bit grid index, 7 sign bits); 4-bit scale per 16
        q = _u16(qs_ptr, row, s_qs, blk * 32 + j // 8, m)
        s = (_u8(sc_ptr, row, s_sc, blk * 8 + j // 32, m) >> (4 * ((j // 16) % 2))) & 15
        db = d * (0.5 + s.to(tl.float32)) * 0.25
        grid = _u8(tab_ptr, 0, 0, (q & 511) * 8 + j % 8, m).to(tl.float32)
        return db * grid * _sign(_ksign(q >> 9), j % 8)
    if QTYPE == 22:  # IQ2_S: index low byte + 2 high bits, explicit signs, 4-bit scale per 16
        i = j // 8
        hi = (_u8(qh_ptr, row, s_qh, blk * 8 + i // 4, m) >> (2 * (i % 4))) & 3
        idx = _u8(qs_ptr, row, s_qs, blk * 32 + i, m) | (hi << 8)
        s = (_u8(sc_ptr, row, s_sc, blk * 8 + j // 32, m) >> (4 * ((j // 16) % 2))) & 15
        db = d * (0.5 + s.to(tl.float32)) * 0.25
        grid = _u8(tab_ptr, 0, 0, idx * 8 + j % 8, m).to(tl.float32)
        return db * grid * _sign(_u8(sg_ptr, row, s_sg, blk * 32 + i, m), j % 8)
    if QTYPE == 18:  # IQ3_XXS: a grid byte per 4; per 32 a u32 of 4 x 7 sign bits, 4-bit scale
        aux = _u32(qh_ptr, row, s_qh, blk * 8 + j // 32, m)
        db = d * (0.5 + ((aux >> 28) & 15).to(tl.float32)) * 0.5
        idx = _u8(qs_ptr, row, s_qs, blk * 64 + j // 4, m)
        grid = _u8(tab_ptr, 0, 0, idx * 4 + j % 4, m).to(tl.float32)
        return db * grid * _sign(_ksign((aux >> (7 * ((j % 32) // 8))) & 127), j % 8)
    if QTYPE == 21:  # IQ3_S: index low byte + 9th bit, explicit signs, 4-bit scale per 32
        i = j // 4
        hi = (_u8(qh_ptr, row, s_qh, blk * 8 + i // 8, m) >> (i % 8)) & 1
        idx = _u8(qs_ptr, row, s_qs, blk * 64 + i, m) | (hi << 8)
        s = (_u8(sc_ptr, row, s_sc, blk * 4 + j // 64, m) >> (4 * ((j // 32) % 2))) & 15
        db = d * (1 + 2 * s).to(tl.float32)
        grid = _u8(tab_ptr, 0, 0, idx * 4 + j % 4, m).to(tl.float32)
        return db * grid * _sign(_u8(sg_ptr, row, s_sg, blk * 32 + j // 8, m), j % 8)
    if QTYPE == 19:  # IQ1_S: index low byte; per 32 a u16: 4 x 3 high bits, scale, delta sign
        i = j // 8
        qh = _u16(qh_ptr, row, s_qh, blk * 8 + j // 32, m)
        idx = _u8(qs_ptr, row, s_qs, blk * 32 + i, m) | (((qh >> (3 * (i % 4))) & 7) << 8)
        dl = d * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
        delta = tl.where((qh & 0x8000) != 0, -0.125, 0.125)
        grid = tl.load(tab_ptr + idx * 8 + j % 8, mask=m, other=0).to(tl.float32)  # int8
        return dl * (grid + delta)
    # IQ1_M: index low byte; a nibble per 8 (3 high bits, delta sign); 3-bit scales per 16
    i = j // 8
    nib = (_u8(qh_ptr, row, s_qh, blk * 16 + i // 2, m) >> (4 * (i % 2))) & 15
    idx = _u8(qs_ptr, row, s_qs, blk * 32 + i, m) | ((nib & 7) << 8)
    sc = _u16(sc_ptr, row, s_sc, blk * 4 + j // 64, m)
    dl = d * (2 * ((sc >> (3 * ((j // 16) % 4))) & 7) + 1).to(tl.float32)
    delta = tl.where((nib & 8) != 0, -0.125, 0.125)
    grid = tl.load(tab_ptr + idx * 8 + j % 8, mask=m, other=0).to(tl.float32)  # int8
    return dl * (grid + delta)
