"""Triton matmuls over GGUF-quantized weights: y = x @ dequantize(w).T with fp32 accumulation.

Weights come repacked by `quant_pack.pack_weight`: per row, 32-element groups of int32 words, each
word holding one element of every *plane* (see quant_pack). The kernels decode one plane of a
[rows, words] tile at a time; its activations x[32g + p*WPG + k] form a tile of the same shape, so
decode, multiply and accumulate stay in one register layout. Two kernels here:

* `_quant_gemv_kernel` (M <= matmul_path.GEMV_MAX_M, decode): bandwidth-bound. Each program
  owns BLOCK_N rows and walks K in BLOCK_G groups; planes decode to exact integer-valued floats
  (PRMT under a 2^23 exponent, then one FADD that also removes the zero point) and FMA with fp32
  activations; group scales are applied once per group to the partial sums (w = a*q + c  =>
  sum(w*x) = a*sum(q*x) + c*sum(x)). Tall-K matrices with few rows are split along K on a second
  grid axis. Its program body is `_gemv_tile`, which `_quant_gemv_pair_kernel` also runs for two
  weights of different quant types in one launch (a Q4_K_M layer's q|k and v). At one token,
  rows up to K = 8192 load their whole weight tile before the PDL wait (PRELOAD), and a gate|up
  weight can store act(gate) * up directly (GATED_OUT: GELU_tanh for GEGLU, SiLU for SwiGLU).
* `_quant_gemm_kernel` (larger M): each plane of a [BLOCK_N, 32*BLOCK_G] tile is
  dequantized in registers to bf16 (fp16 below sm_80, with each activation row scaled by a power of
  two to stay in fp16 range) and multiplied on tensor cores by `tl.dot` with fp32 accumulation.

Neither materialises the dequantized matrix in device memory. quant_tc adds two tensor-core paths
(a swapped kernel; a one-matmul bf16 workspace + a Triton bf16 GEMM), and `quant_matmul` picks
one of the four by `matmul_path.matmul_path`.
"""

from __future__ import annotations

import math
import os
from functools import cache

import torch
import triton
import triton.language as tl

from llcuda.kernels.dependent_launch import pdl_launch_args, wait_for_previous
from llcuda.kernels.iq_tables import IQ4_KVALUES
from llcuda.kernels.matmul_path import GEMV_KERNEL_MAX_M, GEMV_MAX_M, matmul_path
from llcuda.kernels.q8_activations import Q8Rows
from llcuda.kernels.q8_tile import quantize_q8_tile
from llcuda.kernels.quant_pack import (
    BF16,
    F16,
    F32,
    GROUP,
    IQ4_NL,
    IQ4_XS,
    LOWBIT_TYPES,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    PackedWeight,
    dequantize_packed,
)


@triton.jit
def _byte_plane(w, B: tl.constexpr, magic, USE_ASM: tl.constexpr):
    """int32 bits of float32(2^23 + byte B of w), for int32 words w.

    Placing a byte under the exponent byte 0x4B gives 2^23 + byte exactly: one PRMT per element
    instead of shift, mask, I2F (I2F runs at a quarter of the FMA rate on sm_80/sm_90 and would
    bound the 4-bit GEMV below memory bandwidth). USE_ASM=False is the same in plain Triton, for
    the interpreter. `magic` is 0x4B000000 passed as a kernel argument: as a literal, ptxas folds
    it into the PRMT immediate and reloads the four byte selectors into registers instead.
    """
    if USE_ASM:
        magic = tl.zeros(w.shape, tl.int32) + magic
        if B == 0:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7650;", "=r,r,r", [w, magic],
                                             dtype=tl.int32, is_pure=True, pack=1)
        elif B == 1:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7651;", "=r,r,r", [w, magic],
                                             dtype=tl.int32, is_pure=True, pack=1)
        elif B == 2:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7652;", "=r,r,r", [w, magic],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7653;", "=r,r,r", [w, magic],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        return ((w >> (8 * B)) & 0xFF) | 0x4B000000


@triton.jit
def _spread_bits(v):
    # v: int32 in [0, 16) -> bit b of v moved to bit 8b + 4 (bit 4 of byte b). The four shifted
    # copies of the multiply never overlap, so no carries: one IMAD + one LOP3 for four elements.
    return (v * 0x02040810) & 0x10101010


@triton.jit
def _load_high_bits(QTYPE: tl.constexpr, qh_ptr, row, s_qh, widx, wmask):
    """The high-bit fields of a [R, NW] word tile as int32, one per word (Q5_* and Q3_K: a byte
    of 5th / 3rd bits; Q6_K: an int16, bit 4 of the values in its low byte, bit 5 in its high
    one, each in the Q5 bit order); other types have none and get word indices of the same
    shape, unused."""
    if QTYPE == 6 or QTYPE == 7 or QTYPE == 13 or QTYPE == 14 or QTYPE == 11:
        return tl.load(qh_ptr + row * s_qh + widx, mask=wmask, other=0).to(tl.int32)
    return (row * s_qh + widx).to(tl.int32)


@triton.jit
def _nibbles(QTYPE: tl.constexpr, words):
    """Per-word preprocessing of a [R, NW] tile of packed int32 words, before any high bits.

    4/5/6-bit types: (lo, hi), words whose byte b holds the low 4 bits of plane 2b (lo) and
    2b+1 (hi). Q3_K: the low two bits of the same planes, from bit 0 (low byte of its int16) and
    bit 1 (high byte) of the values in the Q5 bit order. Q8_0: (q + 128 bytes, same). Floats:
    (words, words).
    """
    if QTYPE == 11:  # _spread_bits puts bit b at bit 4 of byte b: shifted down to bits 0 / 1
        lo = (_spread_bits(words & 15) >> 4) | (_spread_bits((words >> 8) & 15) >> 3)
        hi = (_spread_bits((words >> 4) & 15) >> 4) | (_spread_bits((words >> 12) & 15) >> 3)
        return lo, hi
    if QTYPE == 8:  # Q8_0: int8 -> q + 128 in [0, 255], four at a time
        u = words ^ -2139062144  # 0x80808080 as int32
        return u, u
    if QTYPE == 0 or QTYPE == 1 or QTYPE == 30:
        return words, words
    if QTYPE == 20 or QTYPE == 23:  # IQ4_NL / IQ4_XS: code-book value + 128 in every byte
        return _iq4_bytes(words & 0x0F0F0F0F), _iq4_bytes((words >> 4) & 0x0F0F0F0F)
    return words & 0x0F0F0F0F, (words >> 4) & 0x0F0F0F0F


# IQ4_NL / IQ4_XS code book (kvalues_iq4nl) + 128 as four little-endian words: entries 0-3, ...
_IQ4_TABLE = [v + 128 for v in IQ4_KVALUES]
_IQ4_W0, _IQ4_W1, _IQ4_W2, _IQ4_W3 = (
    tl.constexpr(sum(_IQ4_TABLE[i + j] << (8 * j) for j in range(4)) - (1 << 32 if i >= 8 else 0))
    for i in range(0, 16, 4)
)  # the last two words have their top bit set: as int32
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _iq4_bytes(idx):
    """int32 words of four byte-sized code-book indices (0..15) -> the four values + 128.

    On the GPU three PRMTs per word, as llama.cpp's get_int_from_table_16: the indices become a
    16-bit selector of four nibbles; their low 3 bits pick bytes from entries 0-7 and from 8-15,
    and bit 3 picks between the two. The interpreter (no inline PTX) looks each byte up alone."""
    if _INTERPRET:
        out = idx * 0
        for b in tl.static_range(4):
            i = (idx >> (8 * b)) & 15
            word = tl.where(i < 8, tl.where(i < 4, _IQ4_W0, _IQ4_W1),
                            tl.where(i < 12, _IQ4_W2, _IQ4_W3))  # fmt: skip
            out = out | (((word >> ((i & 3) * 8)) & 0xFF) << (8 * b))
        return out
    else:
        t = idx | (idx >> 4)  # byte 0: index 0 | index 1 << 4; byte 2: index 2 | index 3 << 4
        sel = (t & 0xFF) | ((t >> 8) & 0xFF00)  # four 4-bit selectors
        w0 = tl.zeros(idx.shape, tl.int32) + _IQ4_W0
        w1 = tl.zeros(idx.shape, tl.int32) + _IQ4_W1
        w2 = tl.zeros(idx.shape, tl.int32) + _IQ4_W2
        w3 = tl.zeros(idx.shape, tl.int32) + _IQ4_W3
        low = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                        [w0, w1, sel & 0x7777], dtype=tl.int32, is_pure=True,
                                        pack=1)  # fmt: skip
        high = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                         [w2, w3, sel & 0x7777], dtype=tl.int32, is_pure=True,
                                         pack=1)  # fmt: skip
        pick = 0x3210 | ((sel & 0x8888) >> 1)  # byte i: i from `low`, 4 + i from `high`
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                         [low, high, pick], dtype=tl.int32, is_pure=True,
                                         pack=1)  # fmt: skip


@triton.jit
def _with_high_bits(QTYPE: tl.constexpr, lo, hi, hb):
    """_nibbles' (lo, hi) with the high bits `hb` (_load_high_bits) merged in: every byte then
    holds its plane's full value."""
    if QTYPE == 6 or QTYPE == 7 or QTYPE == 13:  # Q5_*: one byte of 5th bits per word
        lo = lo | _spread_bits(hb & 15)
        hi = hi | _spread_bits(hb >> 4)
    if QTYPE == 14:  # Q6_K: int16 per word, low byte = bit 4 of each value, high byte = bit 5
        lo = lo | _spread_bits(hb & 15) | (_spread_bits((hb >> 8) & 15) << 1)
        hi = hi | _spread_bits((hb >> 4) & 15) | (_spread_bits((hb >> 12) & 15) << 1)
    if QTYPE == 11:  # Q3_K: a byte of 3rd bits per word, as Q5's 5th bits, moved to bit 2
        lo = lo | (_spread_bits(hb & 15) >> 2)
        hi = hi | (_spread_bits(hb >> 4) >> 2)
    return lo, hi


@triton.jit
def _prepare_words(QTYPE: tl.constexpr, words, qh_ptr, row, s_qh, widx, wmask):
    """A word tile's full plane values (see _with_high_bits), loading its high bits at word
    indices `widx` after the nibbles are split (the order the GEMV was tuned with)."""
    lo, hi = _nibbles(QTYPE, words)
    return _with_high_bits(QTYPE, lo, hi, _load_high_bits(QTYPE, qh_ptr, row, s_qh, widx, wmask))


@triton.jit
def _plane(QTYPE: tl.constexpr, lo, hi, P: tl.constexpr, magic, USE_ASM: tl.constexpr):
    """Plane P of a prepared word tile as float32, the type's zero point already subtracted."""
    if QTYPE == 0:  # F32
        return lo.to(tl.float32, bitcast=True)
    if QTYPE == 30:  # BF16: a bf16 is the top half of the fp32 with the same value
        if P == 0:
            return (lo << 16).to(tl.float32, bitcast=True)
        else:
            return (lo & -65536).to(tl.float32, bitcast=True)
    if QTYPE == 1:  # F16
        if P == 0:
            return lo.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            return (lo >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    if QTYPE == 8:  # Q8_0: plane = byte P, biased by 128
        return _byte_plane(lo, P, magic, USE_ASM).to(tl.float32, bitcast=True) - (8388608.0 + 128.0)
    # nibble types: even planes in `lo`, odd planes in `hi`, byte P // 2
    if P % 2 == 0:
        v = _byte_plane(lo, P // 2, magic, USE_ASM).to(tl.float32, bitcast=True)
    else:
        v = _byte_plane(hi, P // 2, magic, USE_ASM).to(tl.float32, bitcast=True)
    if QTYPE == 2:  # Q4_0: q - 8
        return v - (8388608.0 + 8.0)
    elif QTYPE == 20 or QTYPE == 23:  # IQ4_NL / IQ4_XS: the code-book value, stored + 128
        return v - (8388608.0 + 128.0)
    elif QTYPE == 6:  # Q5_0: q - 16
        return v - (8388608.0 + 16.0)
    elif QTYPE == 14:  # Q6_K: q - 32
        return v - (8388608.0 + 32.0)
    elif QTYPE == 11:  # Q3_K: q - 4
        return v - (8388608.0 + 4.0)
    else:
        return v - 8388608.0


@triton.jit
def _load_scales(QTYPE: tl.constexpr, sc_ptr, mn_ptr, d_ptr, dmin_ptr, row, grp, mask, s_sc, s_d):
    """The stored scale fields of a [R, G] tile of groups, as fp32 (s0, s1, s2, s3); which field
    is which depends on the type (see _scale_maps). Floats get the mask as s0."""
    if QTYPE == 0 or QTYPE == 1 or QTYPE == 30:
        one = tl.where(mask, 1.0, 0.0) + tl.zeros(row.shape, tl.float32)
        return one, one, one, one
    if QTYPE == 12 or QTYPE == 13:  # Q4_K / Q5_K: d, dmin per super-block; sc, mn per group
        sup = row * s_d + grp // 8
        d = tl.load(d_ptr + sup, mask=mask, other=0.0).to(tl.float32)
        dmin = tl.load(dmin_ptr + sup, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(sc_ptr + row * s_sc + grp, mask=mask, other=0).to(tl.float32)
        mn = tl.load(mn_ptr + row * s_sc + grp, mask=mask, other=0).to(tl.float32)
        return d, dmin, sc, mn
    if QTYPE == 14 or QTYPE == 11:  # Q6_K / Q3_K: d per super-block, a scale per 16 elements
        d = tl.load(d_ptr + row * s_d + grp // 8, mask=mask, other=0.0).to(tl.float32)
        sc_lo = tl.load(sc_ptr + row * s_sc + 2 * grp, mask=mask, other=0).to(tl.float32)
        sc_hi = tl.load(sc_ptr + row * s_sc + 2 * grp + 1, mask=mask, other=0).to(tl.float32)
        return d, sc_lo, sc_hi, d
    if QTYPE == 23:  # IQ4_XS: d per super-block, an int8 scale (- 32 applied) per group
        d = tl.load(d_ptr + row * s_d + grp // 8, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(sc_ptr + row * s_sc + grp, mask=mask, other=0).to(tl.float32)
        return d, sc, d, d
    d = tl.load(sc_ptr + row * s_sc + grp, mask=mask, other=0.0).to(tl.float32)
    if QTYPE == 3 or QTYPE == 7:  # Q4_1 / Q5_1: d, m
        m = tl.load(mn_ptr + row * s_sc + grp, mask=mask, other=0.0).to(tl.float32)
        return d, m, d, d
    return d, d, d, d  # Q4_0 / Q5_0 / Q8_0: d


@triton.jit
def _scale_maps(QTYPE: tl.constexpr, s0, s1, s2, s3):
    """Per-group affine maps w = a * q + c from _load_scales's fields.

    Returns a_lo, a_hi, c [R, G] fp32; a_lo applies to planes 0..P/2-1 and a_hi to the rest
    (they differ only for Q6_K and Q3_K, whose scales cover 16 elements = planes 0-3 and 4-7).
    """
    if QTYPE == 0 or QTYPE == 1 or QTYPE == 30:
        return s0, s0, s0 * 0.0
    if QTYPE == 12 or QTYPE == 13:  # Q4_K / Q5_K: w = d * sc * q - dmin * mn
        a = s0 * s2
        return a, a, -(s1 * s3)
    if QTYPE == 14 or QTYPE == 11:  # Q6_K / Q3_K: w = d * sc16 * (q - 32 / q - 4)
        return s0 * s1, s0 * s2, s0 * 0.0
    if QTYPE == 3 or QTYPE == 7:  # Q4_1 / Q5_1: w = d * q + m
        return s0, s0, s1
    if QTYPE == 23:  # IQ4_XS: w = (d * sc) * kvalue
        a = s0 * s1
        return a, a, s0 * 0.0
    return s0, s0, s0 * 0.0  # Q4_0 / Q5_0 / Q8_0 / IQ4_NL: w = d * (q - zero point)


@triton.jit
def _group_scales(QTYPE: tl.constexpr, sc_ptr, mn_ptr, d_ptr, dmin_ptr, row, grp, mask, s_sc, s_d):
    """Per-group affine maps for a [R, G] tile: w = a * q + c (a_lo, a_hi, c; see _scale_maps)."""
    s0, s1, s2, s3 = _load_scales(QTYPE, sc_ptr, mn_ptr, d_ptr, dmin_ptr, row, grp, mask, s_sc, s_d)
    return _scale_maps(QTYPE, s0, s1, s2, s3)


@triton.jit
def _tile_words(WPG: tl.constexpr, BLOCK_G: tl.constexpr, qs_ptr, row, g0, g_limit, s_qs):
    """The packed words [R, BLOCK_G * WPG] of one K step (groups from `g_limit` on masked off),
    with what the rest of the step indexes by: each word's index for its high bits and the word
    mask [1, NW], and the step's groups [1, BLOCK_G] with their mask."""
    NW: tl.constexpr = BLOCK_G * WPG
    j = tl.arange(0, NW)
    jg = j // WPG
    jk = j % WPG
    grp = g0 + tl.arange(0, BLOCK_G)
    gmask = (grp < g_limit)[None, :]
    wmask = (g0 + jg < g_limit)[None, :]
    # int32 words (Q3_K's int16 per word widened: see _nibbles)
    words = tl.load(qs_ptr + row * s_qs + (g0 * WPG + j)[None, :], mask=wmask, other=0)
    return words.to(tl.int32), ((g0 + jg) * WPG + jk)[None, :], wmask, grp[None, :], gmask


@triton.jit
def _tile_loads(QTYPE: tl.constexpr, WPG: tl.constexpr, BLOCK_G: tl.constexpr, qs_ptr, qh_ptr,
                sc_ptr, mn_ptr, d_ptr, dmin_ptr, row, g0, g_limit, s_qs, s_qh, s_sc, s_d):
    """Every load of one K step of a [R rows, BLOCK_G groups] weight tile, groups from `g_limit`
    on masked off: the words [R, NW], their high bits (_load_high_bits) and the scale fields
    s0..s3 [R, BLOCK_G] (_load_scales). Apart from _tile_maps so a kernel can issue the next
    step's loads before it decodes this one."""
    words, widx, wmask, grp, gmask = _tile_words(WPG, BLOCK_G, qs_ptr, row, g0, g_limit, s_qs)
    hb = _load_high_bits(QTYPE, qh_ptr, row, s_qh, widx, wmask)
    s0, s1, s2, s3 = _load_scales(QTYPE, sc_ptr, mn_ptr, d_ptr, dmin_ptr, row, grp, gmask, s_sc,
                                  s_d)
    return words, hb, s0, s1, s2, s3


@triton.jit
def _tile_maps(QTYPE: tl.constexpr, WPG: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_G: tl.constexpr, words, hb, s0, s1, s2, s3):
    """_tile_loads's fields -> the prepared words (lo, hi; see _with_high_bits) and every word's
    affine map (a_lo, a_hi, c; see _scale_maps), all [BLOCK_N, BLOCK_G * WPG]."""
    lo, hi = _nibbles(QTYPE, words)
    lo, hi = _with_high_bits(QTYPE, lo, hi, hb)
    a_lo, a_hi, c = _scale_maps(QTYPE, s0, s1, s2, s3)  # [BN, BG]
    a_lo, a_hi, c = _per_word(WPG, BLOCK_N, BLOCK_G, a_lo, a_hi, c)
    return lo, hi, a_lo, a_hi, c


@triton.jit
def _weight_tile(QTYPE: tl.constexpr, WPG: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_G: tl.constexpr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dmin_ptr, row, g0,
                 g_limit, s_qs, s_qh, s_sc, s_d):  # fmt: skip
    """One K step of a [BLOCK_N rows, BLOCK_G groups] weight tile, groups from `g_limit` on
    masked off: the prepared words (lo, hi; see _prepare_words) and every word's affine map
    (a_lo, a_hi, c; see _group_scales), all [BLOCK_N, BLOCK_G * WPG]. For the fused tensor-core
    kernel and the dequantizer, which apply the maps per element; each load is issued where its
    value is first needed (the swapped kernel issues them a step ahead: _tile_loads)."""
    words, widx, wmask, grp, gmask = _tile_words(WPG, BLOCK_G, qs_ptr, row, g0, g_limit, s_qs)
    lo, hi = _prepare_words(QTYPE, words, qh_ptr, row, s_qh, widx, wmask)
    a_lo, a_hi, c = _group_scales(QTYPE, sc_ptr, mn_ptr, d_ptr, dmin_ptr, row, grp, gmask, s_sc,
                                  s_d)  # [BN, BG]
    a_lo, a_hi, c = _per_word(WPG, BLOCK_N, BLOCK_G, a_lo, a_hi, c)
    return lo, hi, a_lo, a_hi, c


@triton.jit
def _per_word(WPG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, a_lo, a_hi, c):
    """Per-word copies of the group maps: [BN, BG] -> [BN, BG * WPG] each."""
    NW: tl.constexpr = BLOCK_G * WPG
    a_lo = tl.reshape(tl.broadcast_to(a_lo[:, :, None], (BLOCK_N, BLOCK_G, WPG)), (BLOCK_N, NW))
    a_hi = tl.reshape(tl.broadcast_to(a_hi[:, :, None], (BLOCK_N, BLOCK_G, WPG)), (BLOCK_N, NW))
    c = tl.reshape(tl.broadcast_to(c[:, :, None], (BLOCK_N, BLOCK_G, WPG)), (BLOCK_N, NW))
    return a_lo, a_hi, c


@triton.jit
def _load_activations(ptr, mask):
    """Activations at `ptr` as fp32, kept in L1/L2 for the other programs that read them."""
    return tl.load(ptr, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)


@triton.jit
def _gated(gate, up, GATED_OUT: tl.constexpr):
    """act(gate) * up in fp32: GATED_OUT 1 GELU_tanh (GEGLU), 2 SiLU (SwiGLU, x * sigmoid(x))."""
    if GATED_OUT == 2:
        return gate / (1.0 + tl.exp(-gate)) * up  # exp overflows to inf for gate << 0: -> -0
    inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
    return 0.5 * gate * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)) * up  # 1 + tanh(inner)


@triton.jit(do_not_specialize=["M", "N", "n_groups", "groups_per_split", "stride_osplit"])
def _quant_gemv_kernel(
    x_ptr,  # [M, K] activations (fp32/bf16/fp16), unit stride along K
    xq_ptr, xm_ptr,  # with XPRE: x's q8_activations.Q8Rows (words, meta)
    out_ptr,  # [SPLIT_K, M, N] fp32; [M, N / 2] with GATED_OUT
    qs_ptr,  # [N, K/32 * WPG] int32 packed words
    qh_ptr, sc_ptr, mn_ptr, d_ptr, dmin_ptr,
    M, N, n_groups, groups_per_split,
    stride_xm, stride_osplit,
    s_qs, s_qh, s_sc, s_d,
    magic,  # 0x4B000000, see _byte_plane
    # 0, or a gate|up weight [gate (N/2 rows) | up] and act(gate) * up out: 1 GELU_tanh, 2 SiLU
    GATED_OUT: tl.constexpr,
    QTYPE: tl.constexpr,
    WPG: tl.constexpr,  # int32 words per 32-element group
    HAS_MIN: tl.constexpr,  # w = a*q + c with c != 0: needs sum(x) per group
    BLOCK_M: tl.constexpr,  # >= M: every activation row reuses each decoded weight tile
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software pipelining of the K loop (1 = off)
    PRELOAD: tl.constexpr,  # first K step's weights loaded before the PDL wait (_gemv_tile)
    USE_ASM: tl.constexpr,
    INT8_X: tl.constexpr,  # int8 activations and dp4a dot products (_gemv_step_int8)
    XPRE: tl.constexpr,  # INT8_X with x already quantized (xq_ptr, xm_ptr) instead of x_ptr
    PDL: tl.constexpr,  # launched with programmatic dependent launch (dependent_launch.py)
):
    _gemv_tile(x_ptr, xq_ptr, xm_ptr, out_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dmin_ptr,
               M, N, n_groups, groups_per_split, stride_xm, stride_osplit, N, 0, s_qs, s_qh, s_sc,
               s_d, magic, tl.program_id(0), tl.program_id(1), GATED_OUT, QTYPE, WPG, HAS_MIN,
               BLOCK_M, BLOCK_N, BLOCK_G, NUM_STAGES, PRELOAD, USE_ASM, INT8_X, XPRE,
               PDL)  # fmt: skip


@triton.jit(do_not_specialize=["M", "n_a", "n_b", "tiles_a"])
def _quant_gemv_pair_kernel(
    x_ptr,  # [M, K] activations, unit stride along K
    xq_ptr, xm_ptr,  # with XPRE: x's q8_activations.Q8Rows (words, meta)
    out_ptr,  # [M, n_a + n_b] fp32: A's outputs, then B's
    qs_a, qh_a, sc_a, mn_a, d_a, dmin_a,  # weight A (n_a rows), as _quant_gemv_kernel's
    qs_b, qh_b, sc_b, mn_b, d_b, dmin_b,  # weight B (n_b rows), another quant type
    M, n_a, n_b, n_groups, tiles_a, stride_xm,
    s_qs_a, s_qh_a, s_sc_a, s_d_a, s_qs_b, s_qh_b, s_sc_b, s_d_b,
    magic,
    QTYPE_A: tl.constexpr, WPG_A: tl.constexpr, HAS_MIN_A: tl.constexpr, BLOCK_N_A: tl.constexpr,
    BLOCK_G_A: tl.constexpr,
    QTYPE_B: tl.constexpr, WPG_B: tl.constexpr, HAS_MIN_B: tl.constexpr, BLOCK_N_B: tl.constexpr,
    BLOCK_G_B: tl.constexpr,
    BLOCK_M: tl.constexpr, NUM_STAGES: tl.constexpr, PRELOAD: tl.constexpr,
    USE_ASM: tl.constexpr, INT8_X: tl.constexpr, XPRE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Two unsplit GEMVs of one input in one launch (q|k and a v stored in another type): the
    first `tiles_a` programs take weight A, the rest weight B, one output row [A | B]."""
    pid = tl.program_id(0)
    n_out = n_a + n_b
    if pid < tiles_a:
        _gemv_tile(x_ptr, xq_ptr, xm_ptr, out_ptr, qs_a, qh_a, sc_a, mn_a, d_a, dmin_a, M, n_a,
                   n_groups, n_groups, stride_xm, 0, n_out, 0, s_qs_a, s_qh_a, s_sc_a, s_d_a, magic,
                   pid, 0, 0, QTYPE_A, WPG_A, HAS_MIN_A, BLOCK_M, BLOCK_N_A, BLOCK_G_A,
                   NUM_STAGES, PRELOAD, USE_ASM, INT8_X, XPRE, PDL)  # fmt: skip
    else:
        _gemv_tile(x_ptr, xq_ptr, xm_ptr, out_ptr, qs_b, qh_b, sc_b, mn_b, d_b, dmin_b, M, n_b,
                   n_groups, n_groups, stride_xm, 0, n_out, n_a, s_qs_b, s_qh_b, s_sc_b, s_d_b,
                   magic, pid - tiles_a, 0, 0, QTYPE_B, WPG_B, HAS_MIN_B, BLOCK_M, BLOCK_N_B,
                   BLOCK_G_B, NUM_STAGES, PRELOAD, USE_ASM, INT8_X, XPRE, PDL)  # fmt: skip


@triton.jit
def _gemv_tile(
    x_ptr, xq_ptr, xm_ptr, out_ptr, qs_ptr, qh_ptr, sc_ptr, mn_ptr, d_ptr, dmin_ptr,
    M, N, n_groups, groups_per_split, stride_xm, stride_osplit,
    out_n,  # the output's row width (N, or more when it holds another weight's outputs too)
    out_col0,  # this weight's first output column
    s_qs, s_qh, s_sc, s_d, magic,
    pid_n,  # BLOCK_N-row tile of the weight
    pid_k,  # split of K
    GATED_OUT: tl.constexpr, QTYPE: tl.constexpr, WPG: tl.constexpr, HAS_MIN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    NUM_STAGES: tl.constexpr, PRELOAD: tl.constexpr, USE_ASM: tl.constexpr,
    INT8_X: tl.constexpr, XPRE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program of the decode GEMV (see the module docstring): rows pid_n * BLOCK_N.. of the
    weight over split pid_k of K, for every activation row. With GATED_OUT (one split) the weight
    is a gate|up pair [gate | up], N/2 rows each: the program takes gate rows c.. and the up rows
    of the same outputs, BLOCK_N/2 of each, and stores act(gate) * up (ffn_down's input).

    It waits for the previous grid itself (dependent_launch.wait_for_previous). With PRELOAD it
    first issues the loads of its first K step's weights: no earlier kernel writes the weights,
    so their DRAM round trip overlaps the kernel before instead of following it, and only the
    activations (in L2, just written) are loaded after the wait. A K step that spans the whole
    row (BLOCK_G >= the row's groups) leaves nothing to load from DRAM after the wait."""
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    # Clamp rather than mask: rows past N re-read row N-1 and are never stored, so the weight loads
    # carry only the K mask.
    row = tl.minimum(rows, N - 1).to(tl.int64)[:, None]  # [BN, 1]
    if GATED_OUT:
        HALF: tl.constexpr = BLOCK_N // 2
        i = tl.arange(0, BLOCK_N)
        col = tl.minimum(pid_n * HALF + i % HALF, N // 2 - 1)  # [BN] the output of row i
        row = (col + tl.where(i < HALF, 0, N // 2)).to(tl.int64)[:, None]  # gate rows, up rows
    m_idx = tl.arange(0, BLOCK_M)
    g_begin = pid_k * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, n_groups)
    if PRELOAD:
        words, hb, s0, s1, s2, s3 = _tile_loads(QTYPE, WPG, BLOCK_G, qs_ptr, qh_ptr, sc_ptr,
                                                mn_ptr, d_ptr, dmin_ptr, row, g_begin, g_end,
                                                s_qs, s_qh, s_sc, s_d)  # fmt: skip
    wait_for_previous(PDL)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)  # reduced over groups once, after the loop
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    g_loop = g_begin
    if PRELOAD:
        lo, hi = _nibbles(QTYPE, words)
        lo, hi = _with_high_bits(QTYPE, lo, hi, hb)
        a_lo, a_hi, c = _scale_maps(QTYPE, s0, s1, s2, s3)  # [BN, BG]
        acc = _gemv_step(acc, x_ptr, xq_ptr, xm_ptr, M, stride_xm, n_groups, g_begin, g_end, lo,
                         hi, a_lo, a_hi, c, magic, QTYPE, WPG, HAS_MIN, BLOCK_M, BLOCK_N, BLOCK_G,
                         USE_ASM, INT8_X, XPRE)  # fmt: skip
        g_loop = g_begin + BLOCK_G
    NW: tl.constexpr = BLOCK_G * WPG  # words per row per K step
    j = tl.arange(0, NW)
    jg = j // WPG  # group of word slot j
    jk = j % WPG  # word within its group
    # The last split may run a few fully masked steps; bounds from arguments keep the loop simple.
    for g0 in tl.range(g_loop, g_begin + groups_per_split, BLOCK_G, num_stages=NUM_STAGES):
        grp = g0 + tl.arange(0, BLOCK_G)  # [BG]
        gmask = (grp < g_end)[None, :]  # [1, BG]
        wmask = (g0 + jg < g_end)[None, :]  # [1, NW]
        widx = (g0 * WPG + j)[None, :]  # [1, NW] word index in the row
        words = tl.load(qs_ptr + row * s_qs + widx, mask=wmask, other=0).to(tl.int32)  # [BN, NW]
        # Written as group*WPG + k so the compiler sees runs of WPG (not NW) contiguous words, which
        # keeps the per-word side arrays in the same register layout as `words`.
        lo, hi = _prepare_words(QTYPE, words, qh_ptr, row, s_qh, (g0 + jg) * WPG + jk, wmask)
        a_lo, a_hi, c = _group_scales(QTYPE, sc_ptr, mn_ptr, d_ptr, dmin_ptr, row, grp[None, :],
                                      gmask, s_sc, s_d)  # [BN, BG]
        acc = _gemv_step(acc, x_ptr, xq_ptr, xm_ptr, M, stride_xm, n_groups, g0, g_end, lo, hi,
                         a_lo, a_hi, c, magic, QTYPE, WPG, HAS_MIN, BLOCK_M, BLOCK_N, BLOCK_G,
                         USE_ASM, INT8_X, XPRE)  # fmt: skip
    cols = out_col0 + rows
    if GATED_OUT:
        _store_gated(out_ptr, acc, M, N // 2, pid_n, GATED_OUT, BLOCK_M, BLOCK_N)
    elif BLOCK_M == 1:
        out = out_ptr + pid_k * stride_osplit + cols
        tl.store(out, tl.sum(acc, axis=1), mask=rows < N)
    else:
        out = out_ptr + pid_k * stride_osplit + m_idx[:, None] * out_n + cols[None, :]
        tl.store(out, acc, mask=(m_idx[:, None] < M) & (rows[None, :] < N))


@triton.jit
def _store_gated(out_ptr, acc, M, F, pid_n, GATED_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):  # fmt: skip
    """Store act(gate) * up [M, F] from a GATED_OUT tile's sums: acc [BN, BG] (M = 1) or
    [BM, BN], its first BN/2 rows gates and the rest the ups of the same outputs."""
    HALF: tl.constexpr = BLOCK_N // 2
    cols = pid_n * HALF + tl.arange(0, HALF)  # [H]
    if BLOCK_M == 1:
        pairs = tl.trans(tl.reshape(tl.sum(acc, axis=1), (2, HALF)))  # [H, 2]: (gate, up)
        gate, up = tl.split(pairs)
        tl.store(out_ptr + cols, _gated(gate, up, GATED_OUT), mask=cols < F)
    else:
        pairs = tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1))  # [BM, H, 2]
        gate, up = tl.split(pairs)
        m_idx = tl.arange(0, BLOCK_M)[:, None]
        tl.store(out_ptr + m_idx * F + cols[None, :], _gated(gate, up, GATED_OUT),
                 mask=(m_idx < M) & (cols[None, :] < F))


@triton.jit
def _gemv_step(
    acc, x_ptr, xq_ptr, xm_ptr, M, stride_xm, n_groups, g0, g_end,
    lo, hi,  # [BN, NW] prepared words of the K step's groups g0.. (_with_high_bits)
    a_lo, a_hi, c,  # [BN, BG] their group maps (_scale_maps)
    magic,
    QTYPE: tl.constexpr, WPG: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, USE_ASM: tl.constexpr, INT8_X: tl.constexpr,
    XPRE: tl.constexpr,
):  # fmt: skip
    """acc plus one K step of the decode GEMV: every plane of the step's words times its
    activations, for every activation row. acc is [BN, BG] at M=1 (summed over groups at the
    end), else [BM, BN]. INT8_X: _gemv_step_int8 instead."""
    if INT8_X:
        return _gemv_step_int8(acc, x_ptr, xq_ptr, xm_ptr, M, stride_xm, n_groups, g0, g_end, lo,
                               hi, a_lo, a_hi, c, QTYPE, WPG, HAS_MIN, BLOCK_M, BLOCK_N, BLOCK_G,
                               USE_ASM, XPRE)  # fmt: skip
    NP: tl.constexpr = 32 // WPG  # planes
    NW: tl.constexpr = BLOCK_G * WPG
    j = tl.arange(0, NW)
    jg = j // WPG
    jk = j % WPG
    m_idx = tl.arange(0, BLOCK_M)
    wmask = (g0 + jg < g_end)[None, :]  # [1, NW]
    xcol = ((g0 + jg) * 32 + jk)[None, :]  # [1, NW] column of plane 0
    for m in tl.static_range(BLOCK_M):
        x_row = x_ptr + m * stride_xm + xcol
        xmask = wmask & (m < M)
        # plane p of every word times x[32g + p*WPG + k]. The plane decode does not depend on
        # m: pure ops, computed once and CSE'd across the unrolled m loop.
        xp = _load_activations(x_row, xmask)
        s_lo = _plane(QTYPE, lo, hi, 0, magic, USE_ASM) * xp  # [BN, NW]
        xs = xp  # [1, NW]
        for p in tl.static_range(1, NP):
            xp = _load_activations(x_row + p * WPG, xmask)
            f = _plane(QTYPE, lo, hi, p, magic, USE_ASM)
            if p < NP // 2:
                s_lo += f * xp
            elif p == NP // 2:
                s_hi = f * xp
            else:
                s_hi += f * xp
            if HAS_MIN:
                xs += xp
        # per-group sums: [BN, BG, WPG] -> [BN, BG]
        part = a_lo * tl.sum(tl.reshape(s_lo, (BLOCK_N, BLOCK_G, WPG)), axis=2)
        if NP > 1:
            part += a_hi * tl.sum(tl.reshape(s_hi, (BLOCK_N, BLOCK_G, WPG)), axis=2)
        if HAS_MIN:
            part += c * tl.sum(tl.reshape(xs, (1, BLOCK_G, WPG)), axis=2)
        if BLOCK_M == 1:
            acc += part
        else:
            acc = tl.where(m_idx[:, None] == m, acc + tl.sum(part, axis=1)[None, :], acc)
    return acc


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    """c + sum over the four bytes of a (unsigned) times those of b (signed): one IDP4A."""
    if USE_ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for k in tl.static_range(4):
            sb = (b >> (8 * k)) & 0xFF
            c += ((a >> (8 * k)) & 0xFF) * (sb - ((sb & 0x80) << 1))
        return c


@triton.jit
def _q8_words(x_ptr, M, stride_xm, m, g0, g_end, BLOCK_G: tl.constexpr):
    """Activation row m over groups g0.. quantized (q8_activations.quantize_q8_ref), as
    quantize_q8_tile returns it."""
    gi = tl.arange(0, BLOCK_G)[:, None, None]
    bi = tl.arange(0, 4)[None, :, None]
    ji = tl.arange(0, 8)[None, None, :]
    col = (g0 + gi) * 32 + bi * 8 + ji  # [BG, 4, 8]
    xt = _load_activations(x_ptr + m * stride_xm + col, (g0 + gi < g_end) & (m < M))
    return quantize_q8_tile(xt)


@triton.jit
def _q8_prequantized(xq_ptr, xm_ptr, n_groups, m, M, g0, g_end, WPG: tl.constexpr,
                     BLOCK_G: tl.constexpr):  # fmt: skip
    """Row m's Q8Rows over groups g0.. loaded in the layouts _gemv_step_int8 uses: (xa, xb)
    [1, NW] the activation words of each weight word's lo and hi bytes (xb unused at WPG 8),
    dx, sq_lo, sq [BG]. Masked groups read 0 (dx 0: they add nothing)."""
    NW: tl.constexpr = BLOCK_G * WPG
    j = tl.arange(0, NW)
    g = g0 + j // WPG
    wmask = (g < g_end) & (m < M)
    base = xq_ptr + m * (n_groups * 8) + g * 8
    if WPG == 4:  # word k pairs with activation words k (lo) and 4 + k (hi) of its group
        xa = tl.load(base + j % 4, mask=wmask, other=0)
        xb = tl.load(base + 4 + j % 4, mask=wmask, other=0)
    else:  # WPG == 8 (Q8_0): word k with activation word k
        xa = tl.load(base + j % 8, mask=wmask, other=0)
        xb = xa
    grp = g0 + tl.arange(0, BLOCK_G)
    gmask = (grp < g_end) & (m < M)
    meta = xm_ptr + m * (n_groups * 4) + grp * 4
    dx = tl.load(meta, mask=gmask, other=0.0)
    sq_lo = tl.load(meta + 1, mask=gmask, other=0.0)
    sq = tl.load(meta + 2, mask=gmask, other=0.0)
    return xa[None, :], xb[None, :], dx, sq_lo, sq


@triton.jit
def _gemv_step_int8(
    acc, x_ptr, xq_ptr, xm_ptr, M, stride_xm, n_groups, g0, g_end,
    lo, hi,  # [BN, NW] prepared words: byte b of word k of a group holds an unsigned plane value
    a_lo, a_hi, c,  # [BN, BG] group maps (_scale_maps)
    QTYPE: tl.constexpr, WPG: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, USE_ASM: tl.constexpr, XPRE: tl.constexpr,
):  # fmt: skip
    """_gemv_step with the activations quantized to int8 per group of 32 (as llama.cpp's MMVQ):
    four products per IDP4A instead of a decode, an FADD and an FMA per element, which is what
    bounds the fp32 step below memory bandwidth on big matrices. Result: dequant(w) @ q8(x).

    Byte b of a prepared word k holds plane 2b (lo) / 2b+1 (hi) at WPG = 4, plane b at WPG = 8;
    plane p of word k is element p * WPG + k, so both pair word k (and k + 4 for hi) with the
    activation word whose byte b is q[8b + k]: _q8_words' layout. Unsigned plane value u = q + z
    (zero point z): sum (u - z) xq = dp4a(u, xq) - z * sum(xq). Q6_K's two 16-element scales
    split bytes 0-1 (elements 0..15) from 2-3, as do Q3_K's."""
    NW: tl.constexpr = BLOCK_G * WPG
    m_idx = tl.arange(0, BLOCK_M)
    # zero points: Q3_K 4, Q4_0 8, Q5_0 16, Q6_K 32, 128 for Q8_0 and IQ4_NL / IQ4_XS (_nibbles
    # stores q + 128 and code-book value + 128), else 0
    Z: tl.constexpr = (4.0 * (QTYPE == 11) + 8.0 * (QTYPE == 2) + 16.0 * (QTYPE == 6)
                       + 32.0 * (QTYPE == 14)
                       + 128.0 * ((QTYPE == 8) | (QTYPE == 20) | (QTYPE == 23)))
    SCALES16: tl.constexpr = QTYPE == 14 or QTYPE == 11  # Q6_K / Q3_K: a scale per 16 elements
    for m in tl.static_range(BLOCK_M):
        if XPRE:  # quantized by the kernel that wrote x (q8_activations.Q8Rows)
            xa, xb, dx, sq_lo, sq = _q8_prequantized(xq_ptr, xm_ptr, n_groups, m, M, g0, g_end,
                                                     WPG, BLOCK_G)  # fmt: skip
        else:
            words, dx, sq_lo, sq = _q8_words(x_ptr, M, stride_xm, m, g0, g_end, BLOCK_G)
            if WPG == 4:  # lo pairs with activation words 0..3 of its group, hi with 4..7
                xa, xb = tl.split(tl.permute(tl.reshape(words, (BLOCK_G, 2, 4)), (0, 2, 1)))
                xa, xb = tl.reshape(xa, (1, NW)), tl.reshape(xb, (1, NW))
            else:
                xa = tl.reshape(words, (1, NW))
        if WPG == 4:
            xa = tl.broadcast_to(xa, (BLOCK_N, NW))
            xb = tl.broadcast_to(xb, (BLOCK_N, NW))
            if SCALES16:
                d_lo = _dp4a(hi, xb & 0xFFFF, _dp4a(lo, xa & 0xFFFF, 0, USE_ASM), USE_ASM)
                d_hi = _dp4a(hi, xb & -65536, _dp4a(lo, xa & -65536, 0, USE_ASM), USE_ASM)
            else:
                d_lo = _dp4a(hi, xb, _dp4a(lo, xa, 0, USE_ASM), USE_ASM)
        else:  # WPG == 8 (Q8_0): one word, bytes = planes 0..3
            xa = tl.broadcast_to(xa, (BLOCK_N, NW))
            d_lo = _dp4a(lo, xa, 0, USE_ASM)
        dot_lo = tl.sum(tl.reshape(d_lo, (BLOCK_N, BLOCK_G, WPG)), axis=2).to(tl.float32)
        if SCALES16:
            dot_hi = tl.sum(tl.reshape(d_hi, (BLOCK_N, BLOCK_G, WPG)), axis=2).to(tl.float32)
            part = a_lo * (dot_lo - Z * sq_lo[None, :])
            part += a_hi * (dot_hi - Z * (sq - sq_lo)[None, :])
        else:
            part = a_lo * (dot_lo - Z * sq[None, :])
            if HAS_MIN:
                part += c * sq[None, :]
        part = part * dx[None, :]  # [BN, BG]
        if BLOCK_M == 1:
            acc += part
        else:
            acc = tl.where(m_idx[:, None] == m, acc + tl.sum(part, axis=1)[None, :], acc)
    return acc


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP_M: tl.constexpr):  # fmt: skip
    """(row tile, column tile) of program `pid` in grouped order: GROUP_M row tiles run next to
    each other and share weight tiles in L2, so each weight tile is fetched from DRAM about once."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % num_in_group) % group_size, (pid % num_in_group) // group_size


@triton.jit(do_not_specialize=["M", "N", "n_groups", "groups_per_split", "stride_osplit"])
def _quant_gemm_kernel(
    x_ptr,  # [M, K] bf16 activations (fp16 pre-divided by xscale when USE_FP16), unit stride
    out_ptr,  # [SPLIT_K, M, N] fp32 partial sums (summed by the caller when SPLIT_K > 1)
    xscale_ptr,  # [M] fp32 power-of-two row scales (USE_FP16 only)
    qs_ptr,  # [N, K/32 * WPG] int32 packed words
    qh_ptr, sc_ptr, mn_ptr, d_ptr, dmin_ptr,
    M, N, n_groups, groups_per_split,  # groups_per_split: a multiple of BLOCK_G
    stride_xm, stride_osplit,
    s_qs, s_qh, s_sc, s_d,
    magic,  # 0x4B000000, see _byte_plane
    QTYPE: tl.constexpr,
    WPG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,  # groups per K step; each plane dot has K = BLOCK_G * WPG >= 16
    GROUP_M: tl.constexpr,
    USE_FP16: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    NP: tl.constexpr = 32 // WPG
    NW: tl.constexpr = BLOCK_G * WPG
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    xrow = tl.minimum(offs_m, M - 1)  # clamped: rows past M are computed but never stored
    row = tl.minimum(offs_n, N - 1).to(tl.int64)[:, None]  # [BN, 1]
    j = tl.arange(0, NW)
    jg = j // WPG
    jk = j % WPG
    x_rows = x_ptr + xrow.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # Split-K (program_id 1): few output tiles (a narrow N at small M) would leave most SMs idle.
    g_begin = tl.program_id(1) * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, n_groups)
    for g0 in range(g_begin, g_end, BLOCK_G):
        lo, hi, a_lo, a_hi, c = _weight_tile(QTYPE, WPG, BLOCK_N, BLOCK_G, qs_ptr, qh_ptr, sc_ptr,
                                             mn_ptr, d_ptr, dmin_ptr, row, g0, n_groups, s_qs,
                                             s_qh, s_sc, s_d)  # [BN, NW] each
        wmask = (g0 + jg < n_groups)[None, :]
        xcol = ((g0 + jg) * 32 + jk)[None, :]
        for p in tl.static_range(NP):
            # One dot per plane: columns p*WPG + k of each group, in the same order on both sides.
            if p < NP // 2:
                w = _plane(QTYPE, lo, hi, p, magic, USE_ASM) * a_lo + c  # [BN, NW]
            else:
                w = _plane(QTYPE, lo, hi, p, magic, USE_ASM) * a_hi + c
            xp = tl.load(x_rows + xcol + p * WPG, mask=wmask, other=0.0)  # [BM, NW]
            if USE_FP16:
                acc = tl.dot(xp, tl.trans(w.to(tl.float16)), acc)
            else:
                acc = tl.dot(xp, tl.trans(w.to(tl.bfloat16)), acc)
    if USE_FP16:
        acc = acc * tl.load(xscale_ptr + xrow)[:, None]
    out = out_ptr + tl.program_id(1) * stride_osplit + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# --------------------------------------------------------------------------------------------
# Launch configuration

# int32 words per 32-element group (planes per word = 32 / WPG), see quant_pack's docstring
_WPG = {F32: 32, F16: 16, BF16: 16, Q8_0: 8, Q4_0: 4, Q4_1: 4, Q5_0: 4, Q5_1: 4, Q4_K: 4, Q5_K: 4,
        Q6_K: 4, Q3_K: 4, IQ4_NL: 4, IQ4_XS: 4}
# Types whose words come with a second array of bits each (Q6_K's top two, Q3_K's third), kept
# in registers of their own: fewer rows per program (the sweeps' Q6_K rules)
_WIDE_TYPES = (Q6_K, Q3_K)
_HAS_MIN = (Q4_1, Q5_1, Q4_K, Q5_K)
# the types the decode GEMV can run with int8 activations (_gemv_step_int8): the quantized ones
INT8_X_TYPES = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)
_MAGIC = 0x4B000000  # float32 bits of 2^23


@cache
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _largest_pow2_divisor(n: int, cap: int) -> int:
    g = cap
    while g > 1 and n % g:
        g //= 2
    return g


def _split_k(tiles: int, target_programs: int, n_groups: int, block_g: int) -> int:
    """K splits that bring `tiles` output tiles to about `target_programs` programs, keeping at
    least two K steps of `block_g` groups in each."""
    return max(1, min(triton.cdiv(target_programs, tiles), n_groups // (2 * block_g)))


def _split_groups(n_groups: int, split_k: int, block_g: int) -> tuple[int, int]:
    """(groups per split, a multiple of block_g; the number of splits, none of them empty)."""
    groups_per_split = triton.cdiv(triton.cdiv(n_groups, split_k), block_g) * block_g
    return groups_per_split, triton.cdiv(n_groups, groups_per_split)


def gemv_config(qtype: int, m: int, n: int, n_groups: int, num_sms: int,
                preload: bool | None = None) -> dict:
    """BLOCK_N, BLOCK_G, SPLIT_K, num_warps, num_stages, PRELOAD, INT8_X for the decode kernel;
    `preload` (None: gemv_preload()) allows the preloaded whole-row configs of
    _gemv_config_preloaded; INT8_X as gemv_int8 says, with the tiles of _int8_tiles."""
    preload = gemv_preload() if preload is None else preload
    cfg = _gemv_tiles(qtype, m, n, n_groups, num_sms, preload)
    if not gemv_int8(qtype, m, n, n_groups):
        return dict(cfg, INT8_X=False)
    return dict(_int8_tiles(cfg, qtype, m, n, n_groups, preload), INT8_X=True)


# Matrices of at least this many elements take int8 activations at M <= GEMV_MAX_M (auto).
GEMV_INT8_MIN_ELEMS = 1 << 22


def gemv_int8(qtype: int, m: int, n: int, n_groups: int) -> bool:
    """Whether the decode GEMV quantizes its activations to int8 (_gemv_step_int8).

    LLCUDA_GEMV_INT8=1: everywhere it can; 0: never; auto (the default): for 4-6-bit weights of
    at least GEMV_INT8_MIN_ELEMS elements at M <= 4. H100, graph replays in a PDL chain
    (bench_quant_matmul.py --big-m1-sweep, BENCHMARKS.md twelfth session), fp32 -> int8 us:
    Llama-8B gate|up 55.6 -> 40.4, ffn_down Q4_K 30.1 -> 23.8, Q6_K 60.1 -> 53.6, o 4096x4096
    9.2 -> 7.6 (the fp32 preload tiles took 221 us before they were capped), Gemma 3 4B q|k 11.3
    -> 5.8; the 1B's gate|up 9.0 -> 8.1 and ffn_down 7.0 -> 4.6. Smaller matrices are latency-
    bound, and Q8_0 (8 bits a weight, already at 2.6 TB/s in fp32) gains nothing: both keep
    fp32 activations, and with them the tiny test twins and Gemma 3 270M's projections and head
    their exact-to-float-rounding GEMV. The int8 rounding of activations (llama.cpp's MMVQ does
    the same) moves a random-weight twin's log-probs by ~0.05 nats on average, 0.6 at most."""
    mode = os.environ.get("LLCUDA_GEMV_INT8", "auto")
    if mode == "0" or qtype not in INT8_X_TYPES:
        return False
    if mode == "1":
        return True
    return qtype != Q8_0 and m <= GEMV_MAX_M and n * n_groups * GROUP >= GEMV_INT8_MIN_ELEMS


def _int8_tiles(cfg: dict, qtype: int, m: int, n: int, n_groups: int, preload: bool) -> dict:
    """The int8 GEMV's tiles, from the big-m1 sweep: whole-row preloaded rows in 8-row tiles
    once K >= 2048 and N <= 8192 (its words are all it keeps live; Q4_K 4096x4096 7.6 us at 8
    rows vs 9.1 at 32, 4096x5120 9.9 vs 17.9 in 64-row tiles), also for an LM head (Q6_K
    4096x128256: 202 us vs 271 in fp32 tiles); wide outputs (gate|up) in 128-row tiles of 8
    warps (Q4_K 4096x28672 40.4 vs 46.3 at 4, Q5_0 1152x13824 8.1 vs 10.6); split rows
    (ffn_down) in K steps of twice the groups (Q6_K 14336x4096: 53.6 vs 70.6 us, Q4_K 23.8 vs
    26.7)."""
    if m == 1 and preload and 64 <= n_groups <= GEMV_PRELOAD_MAX_GROUPS and (
            n <= 8192 or n >= 65536):
        return dict(cfg, BLOCK_N=8, BLOCK_G=triton.next_power_of_2(n_groups), SPLIT_K=1,
                    num_warps=8, num_stages=1, PRELOAD=True)
    if cfg["PRELOAD"] or m > 1:  # several rows: the fp32 tiles, not swept for int8 yet
        return cfg
    if n >= 8192 and cfg["SPLIT_K"] == 1:
        return dict(cfg, BLOCK_N=128, num_warps=8)
    block_g = _largest_pow2_divisor(n_groups, 2 * cfg["BLOCK_G"])
    groups_per_split = triton.cdiv(n_groups, cfg["SPLIT_K"])
    if groups_per_split < block_g:  # every split keeps at least one whole step
        block_g = cfg["BLOCK_G"]
    return dict(cfg, BLOCK_G=block_g)


def _gemv_tiles(qtype: int, m: int, n: int, n_groups: int, num_sms: int,
                preload: bool) -> dict:
    """gemv_config's tiles.

    From the H100 sweep (bench_quant_matmul.py --sweep): at M=1, 128 rows per program and a
    3-stage cp.async pipeline were best on big matrices (Q4_K 4096x14336: 33.5 us vs 38.8 us with
    64 rows unpipelined), except Q6_K (254 registers at 128 rows: 40.7 us at 64 vs 51.8 at 128);
    splitting K paid only where the row tiles cover less than half the SMs (Q4_K 6912x1152:
    10.4 us at 13 splits vs 30 us unsplit).
    """
    wpg = _WPG[qtype]
    # 32 words (128 B) per row per K step: 8 threads x 16 B across a row, coalesced; a BLOCK_G
    # that divides K/32 keeps every step full.
    block_g = _largest_pow2_divisor(n_groups, 32 // wpg)
    # More rows per program reuse each activation load more, but every plane of the tile stays
    # live across the M rows: fewer rows when M > 1.
    if m == 1:
        return _gemv_config_m1(qtype, n, n_groups, num_sms, block_g, preload)
    block_n = 32 if m <= 4 else 16
    block_n = min(block_n, max(16, triton.next_power_of_2(n)))
    n_tiles = triton.cdiv(n, block_n)
    split_k = 1
    if n_tiles < num_sms // 2:  # few rows, long rows (ffn_down): split K over more programs
        split_k = _split_k(n_tiles, 4 * num_sms, n_groups, block_g)
    return {"BLOCK_N": block_n, "BLOCK_G": block_g, "SPLIT_K": split_k, "num_warps": 4,
            "num_stages": 3, "PRELOAD": False}


# Rows of at most this many 32-element groups (K <= 1152) are never split at M=1.
GEMV_SHORT_ROW_GROUPS = 36


def _gemv_config_m1(qtype: int, n: int, n_groups: int, num_sms: int, block_g: int,
                    preload: bool) -> dict:
    """The single-token decode GEMV. The projections of Gemma 3 1B / 270M are latency-bound, not
    bandwidth-bound (H100 sweeps of graph replays: BENCHMARKS.md, fifth and seventh sessions):
    - short rows (K <= 1152: q|k|v, gate|up, o) run unsplit. Narrow outputs (N <= 1152) in
      16-row tiles, 8 warps for the K-quants, 4 for the rest (in a chain of PDL launches: Q4_K
      1024x1152 3.42 us vs 4.61 at 32 rows and 4 warps, 1024x640 2.59 vs 3.44; Q8_0 1152x256
      2.61 vs 3.78); wider ones 32 rows up to N = 2048, 64 up to 8192 and 128 above (Q5_0
      1152x13824: 9.0 us), with 8 warps for an LM head (Q8_0 1152x262144: 121 us vs 129, 2.65
      TB/s; in the 1B twin's decode step, 125 -> 118 us);
    - long rows (ffn_down, K = 2048 or 6912) were fastest with ~2 programs per SM, even at one
      K step each (Q4_K 6912x1152: 9.7 us at 16 splits vs 10.8 at 13; Q4_K 2048x640: 6.3 at 8
      splits vs 7.1 at 4); Q6_K in 32-row tiles (its planes' registers), the rest in 64.
    Bigger matrices (Llama-8B FFNs) keep the earlier sweep's 128 rows, 3 stages, no split.
    With `preload`, rows of up to GEMV_PRELOAD_MAX_GROUPS groups and GEMV_PRELOAD_MAX_N outputs
    take _gemv_config_preloaded instead."""
    if preload and n_groups <= GEMV_PRELOAD_MAX_GROUPS and n <= GEMV_PRELOAD_MAX_N:
        return _gemv_config_preloaded(qtype, n, n_groups)
    warps = 4
    if n_groups <= GEMV_SHORT_ROW_GROUPS:
        if n <= 1152:
            block_n, warps = 16, 8 if qtype in (Q3_K, Q4_K, Q5_K, Q6_K) else 4
        else:
            block_n = 32 if n <= 2048 else 64 if n <= 8192 else 128
            warps = 8 if n >= 65536 else 4
    elif n >= 8192:
        block_n = 64 if qtype in _WIDE_TYPES else 128
    else:
        block_n = 32 if qtype in _WIDE_TYPES else 64
    block_n = min(block_n, max(16, triton.next_power_of_2(n)))
    n_tiles = triton.cdiv(n, block_n)
    split_k = 1
    # Fewer row tiles than SMs leave SMs idle: Q6_K's 32-row tiles of Llama-8B's ffn_down (128
    # tiles of 4 warps) took 53.6 us unsplit, 44.7 in 2 splits (H100, int8; 8B tg 184 -> 235).
    if n_groups > GEMV_SHORT_ROW_GROUPS and n_tiles < num_sms:
        want = 2 * num_sms / n_tiles  # splits for ~2 programs per SM, to the nearest power of 2
        split_k = 1 << max(0, round(math.log2(want)))
        split_k = max(1, min(split_k, n_groups // block_g))  # at least one K step each
    return {"BLOCK_N": block_n, "BLOCK_G": block_g, "SPLIT_K": split_k, "num_warps": warps,
            "num_stages": 3, "PRELOAD": False}


# Rows of at most this many groups (K <= 8192) and at most this many outputs take
# _gemv_config_preloaded at M=1.
GEMV_PRELOAD_MAX_GROUPS = 256
GEMV_PRELOAD_MAX_N = 4096


def _gemv_config_preloaded(qtype: int, n: int, n_groups: int) -> dict:
    """A GEMV of rows up to K = 8192 in one whole-row K step, every weight load issued before the
    PDL wait (PRELOAD, see _gemv_tile). H100, PDL chain (bench_quant_matmul.py --m1-sweep,
    BENCHMARKS.md eighth session), us from the tiles before to these: Q5_0 1152x1536 4.82 ->
    2.74, Q8_0 1152x256 2.65 -> 1.56, Q4_K 1024x1152 3.41 -> 2.58, Q5_0 640x1536 3.12 -> 2.21,
    Q4_K 1024x640 2.57 -> 1.85, the 270M's gate|up with its GEGLU epilogue Q5_0 640x4096 3.73
    -> 2.30, ffn_down Q4_K 2048x640 6.69 -> 2.38, Q4_K 6912x1152 9.65 -> 8.53, Q6_K 6912x1152
    10.41 -> 10.18. Rows per program: the most (8 to 32) that still give ~128 programs; 8 warps
    once a 4-warp thread would hold more than 32 registers of the tile (words, and their high
    bits for Q5_* / Q6_K). Not for wider outputs: the 1B's gate|up (Q5_0 1152x13824) took 22.6
    us this way (19.3 in 64-row tiles of 16 warps), 9.1 before: every program reloads the whole
    activation row, ~1.7x the weight's bytes at 16 rows. Split rows with only their first K step
    preloaded were slower (Q4_K 6912x1152 with GEGLU 13.1 -> 14.6 us), and LM heads gain
    nothing (126 us either way); they keep their tiles, loaded after the wait."""
    block_g = triton.next_power_of_2(n_groups)  # masked past the row's end
    block_n = 32
    # ~128 programs, and at most 32 words of the tile per thread of 8 warps: at 32 rows of 128
    # groups (Q4_K 4096x4096) the tile spilled, 221 us against 9 (big-m1 sweep)
    while block_n > 8 and (triton.cdiv(n, block_n) < 128
                           or block_n * block_g * _WPG[qtype] > 32 * 256):
        block_n //= 2
    registers = block_n * block_g * _WPG[qtype] * (2 if qtype in (Q5_0, Q5_1, Q5_K, *_WIDE_TYPES)
                                                   else 1)  # fmt: skip
    warps = 8 if registers > 32 * 128 else 4
    return {"BLOCK_N": block_n, "BLOCK_G": block_g, "SPLIT_K": 1, "num_warps": warps,
            "num_stages": 1, "PRELOAD": True}


def gemv_preload() -> bool:
    """Whether single-token GEMVs may take _gemv_config_preloaded (whole-row weight tiles loaded
    before the PDL wait); LLCUDA_GEMV_PRELOAD=0 switches it off, to compare."""
    return os.environ.get("LLCUDA_GEMV_PRELOAD", "1") != "0"


def gemm_config(qtype: int, m: int, n: int, n_groups: int, num_sms: int = 132) -> dict:
    """Tile sizes for the tensor-core kernel: one dot of K = 32 per plane per step.

    Shared memory (compiled for sm_90, bf16 activations): 4-bit types need 53/90/156/180 KiB at
    (32x64, 3 stages) / (64x128, 2) / (128x128, 2) / (128x256, 2); Q8_0 and floats less. H100
    allows 227 KiB; measured on H100, 128x256 beat 128x128 by 25% on the Q8_0 LM head at M=512.
    """
    nibble = _WPG[qtype] == 4
    if m <= 16:
        bm, bn, warps, stages = 16, 64, 4, 3
    elif m <= 32:
        bm, bn, warps, stages = 32, 64, 4, 3
    elif m <= 64:
        bm, bn, warps, stages = 64, 128, 4, 2 if nibble else 3
    else:
        bm, bn, warps, stages = 128, 256, 8, 2
    # Enough tiles to fill the SMs (Gemma's 640-wide projections at M=512 make only 12 otherwise).
    while bn > 64 and triton.cdiv(m, bm) * triton.cdiv(n, bn) < num_sms:
        bn //= 2
    # Still too few (a decode batch through a narrow projection: 18 tiles for 1152 outputs at
    # M=64 on 132 SMs): split K as well, keeping at least two K steps per program.
    block_g = 32 // _WPG[qtype]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split_k = _split_k(tiles, 2 * num_sms, n_groups, block_g) if tiles < num_sms else 1
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_G": block_g, "GROUP_M": 8, "SPLIT_K": split_k,
            "num_warps": warps, "num_stages": stages}


# --------------------------------------------------------------------------------------------
# Checked wrappers


class QuantMatmulError(ValueError):
    """Raised for arguments quant_matmul cannot take (shape, dtype or device mismatch)."""


def _check(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    if not isinstance(w, PackedWeight):
        raise QuantMatmulError(f"w must be a PackedWeight (pack_weight), got {type(w).__name__}")
    if x.dim() != 2:
        raise QuantMatmulError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.shape[1] != w.n_cols:
        raise QuantMatmulError(f"x has K={x.shape[1]} columns, weight expects {w.n_cols}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise QuantMatmulError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.device != w.device:
        raise QuantMatmulError(f"x is on {x.device}, weight on {w.device}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise QuantMatmulError("quant_matmul runs on CUDA tensors; use quant_matmul_ref on CPU")
    return x if x.stride(1) == 1 else x.contiguous()


def _weight_args(w: PackedWeight) -> tuple:
    # The kernels read the quants as int32 words (Q3_K's as its int16 per word); unused pointers
    # get qs (never dereferenced).
    qs = w.qs if w.qtype == Q3_K else w.qs.view(torch.int32)
    ptrs = [qs] + [t if t is not None else qs for t in (w.qh, w.sc, w.mn, w.d, w.dmin)]
    strides = [qs.stride(0)] + [t.stride(0) if t is not None else 0 for t in (w.qh, w.sc, w.d)]
    return (*ptrs,), (*strides,)


def _use_asm() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1"  # the interpreter cannot run inline PTX


# The gated activations the decode GEMV's epilogue computes (quant_gemv's gated_act).
# name -> the kernel's GATED_OUT.
GEMV_GATED_ACTS = {"gelu_tanh": 1, "silu": 2}


def quant_gemv(x: torch.Tensor, w: PackedWeight, config: dict | None = None,
               partials: bool = False, gated_act: str | None = None,
               xq: Q8Rows | None = None) -> torch.Tensor:  # fmt: skip
    """x [M<=16, K] @ dequant(w).T -> [M, N] fp32 with fp32 FMAs (the decode kernel); with
    `partials`, the split-K partial sums [S, M, N] unsummed (see quant_matmul). With
    `gated_act` (one of GEMV_GATED_ACTS), w is a gate|up weight [gate | up] of N/2 rows each and
    the result is act(x @ gate.T) * (x @ up.T) [M, N/2] (K unsplit): ffn_down's input, in one
    kernel. `xq`: x already quantized (pack_q8_ref's layout, written by the kernel that wrote
    x), read instead of quantizing x where the config takes int8 activations."""
    if gated_act is not None and gated_act not in GEMV_GATED_ACTS:
        raise QuantMatmulError(f"no GEMV epilogue for {gated_act!r}; epilogues: "
                               f"{sorted(GEMV_GATED_ACTS)}")  # fmt: skip
    gated = 0 if gated_act is None else GEMV_GATED_ACTS[gated_act]  # the kernel's GATED_OUT
    if gated and (w.n_rows % 2 or (w.split_sizes and len(set(w.split_sizes)) != 1)):
        raise QuantMatmulError(f"gated_act needs a gate|up weight of two equal halves, got "
                               f"{w.split_sizes or w.n_rows} rows")  # fmt: skip
    x = _check(x, w)
    m, n, n_groups = x.shape[0], w.n_rows, w.n_cols // GROUP
    if m > GEMV_KERNEL_MAX_M:
        raise QuantMatmulError(f"quant_gemv takes M <= {GEMV_KERNEL_MAX_M}, got {m}")
    dev = x.device.index if x.device.type == "cuda" else 0
    cfg = config or gemv_config(w.qtype, m, n, n_groups, _num_sms(dev))
    if gated:  # the activation needs whole sums: one split; a tile holds pairs of rows
        cfg = dict(cfg, SPLIT_K=1, BLOCK_N=max(2, cfg["BLOCK_N"]))
    groups_per_split, split_k = _split_groups(n_groups, cfg["SPLIT_K"], cfg["BLOCK_G"])
    out = torch.empty((split_k, m, n // 2 if gated else n), device=x.device,
                      dtype=torch.float32)  # fmt: skip
    ptrs, strides = _weight_args(w)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    int8 = cfg.get("INT8_X", False) and w.qtype in INT8_X_TYPES
    xq = _prequantized(x, xq) if int8 else None
    _quant_gemv_kernel[grid](
        x, *(xq or (x, x)), out, *ptrs, m, n, n_groups, groups_per_split, x.stride(0), m * n,
        *strides, _MAGIC,
        GATED_OUT=gated, QTYPE=w.qtype, WPG=_WPG[w.qtype], HAS_MIN=w.qtype in _HAS_MIN,
        BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=cfg["BLOCK_N"], BLOCK_G=cfg["BLOCK_G"],
        NUM_STAGES=cfg["num_stages"], PRELOAD=cfg.get("PRELOAD", False), USE_ASM=_use_asm(),
        INT8_X=int8, XPRE=xq is not None, num_warps=cfg["num_warps"],
        **pdl_launch_args(x.device),
    )  # fmt: skip
    return _reduce_splits(out, partials)


def gemv_pair_config(x: torch.Tensor, wa: PackedWeight, wb: PackedWeight) -> tuple | None:
    """The configs of quant_gemv_pair's two halves, or None when the pair cannot share one
    launch: not the decode GEMV, K split, or a different K."""
    if not (isinstance(wa, PackedWeight) and isinstance(wb, PackedWeight)) or x.dim() != 2:
        return None
    m, k = x.shape
    on_gpu = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if not (0 < m <= GEMV_KERNEL_MAX_M and wa.n_cols == wb.n_cols == k and on_gpu):
        return None
    if not (uses_gemv(m, wa) and uses_gemv(m, wb)):
        return None
    sms = _num_sms(x.device.index or 0) if x.is_cuda else 132
    configs = [gemv_config(w.qtype, m, w.n_rows, k // GROUP, sms) for w in (wa, wb)]
    if any(c["SPLIT_K"] != 1 for c in configs):
        return None
    return tuple(configs)


def quant_gemv_pair(x: torch.Tensor, wa: PackedWeight, wb: PackedWeight,
                    configs: tuple | None = None, xq: Q8Rows | None = None) -> torch.Tensor:
    """[x @ dequant(wa).T | x @ dequant(wb).T] -> [M, Na + Nb] fp32 in one launch, for two weights
    of one input in different quant types (a Q4_K_M layer's q|k and its higher-bit v). Needs
    gemv_pair_config(x, wa, wb) to be a pair of configs (pass it as `configs` if already
    asked). `xq` as quant_gemv's."""
    configs = configs or gemv_pair_config(x, wa, wb)
    if configs is None:
        raise QuantMatmulError("quant_gemv_pair needs two unsplit decode GEMVs of the same K")
    x = _check(x, wa)
    cfg_a, cfg_b = configs
    m, na, nb = x.shape[0], wa.n_rows, wb.n_rows
    out = torch.empty((m, na + nb), device=x.device, dtype=torch.float32)
    (ptrs_a, strides_a), (ptrs_b, strides_b) = _weight_args(wa), _weight_args(wb)
    tiles_a = triton.cdiv(na, cfg_a["BLOCK_N"])
    grid = (tiles_a + triton.cdiv(nb, cfg_b["BLOCK_N"]),)
    int8 = (all(c.get("INT8_X", False) for c in configs)
            and wa.qtype in INT8_X_TYPES and wb.qtype in INT8_X_TYPES)  # fmt: skip
    xq = _prequantized(x, xq) if int8 else None
    _quant_gemv_pair_kernel[grid](
        x, *(xq or (x, x)), out, *ptrs_a, *ptrs_b, m, na, nb, x.shape[1] // GROUP, tiles_a,
        x.stride(0), *strides_a, *strides_b, _MAGIC,
        QTYPE_A=wa.qtype, WPG_A=_WPG[wa.qtype], HAS_MIN_A=wa.qtype in _HAS_MIN,
        BLOCK_N_A=cfg_a["BLOCK_N"], BLOCK_G_A=cfg_a["BLOCK_G"],
        QTYPE_B=wb.qtype, WPG_B=_WPG[wb.qtype], HAS_MIN_B=wb.qtype in _HAS_MIN,
        BLOCK_N_B=cfg_b["BLOCK_N"], BLOCK_G_B=cfg_b["BLOCK_G"],
        BLOCK_M=max(1, triton.next_power_of_2(m)), NUM_STAGES=cfg_a["num_stages"],
        PRELOAD=cfg_a.get("PRELOAD", False) and cfg_b.get("PRELOAD", False), USE_ASM=_use_asm(),
        INT8_X=int8, XPRE=xq is not None,
        num_warps=max(cfg_a["num_warps"], cfg_b["num_warps"]),
        **pdl_launch_args(x.device),
    )  # fmt: skip
    return out


def gemv_prequantized() -> bool:
    """Whether the norms write Q8Rows for the int8 decode GEMVs to read (LLCUDA_GEMV_XPRE=1),
    asked once at load (ops.decode_reads_q8_rows), or the GEMVs quantize x in every program
    (unset or 0, the default until a device run has checked and timed the prequantized path
    beside llama.cpp)."""
    return os.environ.get("LLCUDA_GEMV_XPRE", "0") == "1"


def _prequantized(x: torch.Tensor, xq: Q8Rows | None) -> Q8Rows | None:
    """xq, checked to be x's Q8Rows in the layout the kernel reads; None stays None (the kernel
    quantizes x itself)."""
    if xq is None:
        return None
    m, k = x.shape
    words, meta = xq
    if (words.shape != (m, k // 4) or meta.shape != (m, k // GROUP, 4) or words.dtype != torch.int32
            or meta.dtype != torch.float32 or not (words.is_contiguous() and meta.is_contiguous())
            or words.device != x.device):  # fmt: skip
        raise QuantMatmulError(f"xq must be the Q8Rows of x [{m}, {k}] (q8_activations), got "
                               f"words {tuple(words.shape)} {words.dtype}, meta "
                               f"{tuple(meta.shape)} {meta.dtype}")  # fmt: skip
    return xq


def _reduce_splits(out: torch.Tensor, partials: bool) -> torch.Tensor:
    """[S, M, N] split-K partial sums -> [M, N], or as they are for a caller that sums them."""
    if partials:
        return out
    return out[0] if out.shape[0] == 1 else out.sum(dim=0)


def _use_fp16(device: torch.device) -> bool:
    # bf16 tensor cores need sm_80; is_bf16_supported() says True on sm_75 (emulation), so ask
    # the capability directly.
    return device.type == "cuda" and _capability(device.index or 0) < (8, 0)


@cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _gemm_activations(x: torch.Tensor, fp16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (the tensor-core GEMMs' activations, their fp32 row scales [M] (fp16 only;
    else x, unused)): bf16, or fp16 with each row divided by a power of two.

    Cast once here rather than per tile: half the shared memory per pipeline stage and half the
    L2 traffic (every N-tile re-reads them)."""
    if fp16:
        # Scale each row so max|x| lands in (0.5, 1]: Gemma's activations overflow fp16 otherwise.
        # A power of two keeps the scaling itself exact.
        amax = x.abs().amax(dim=1).float()
        xscale = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax))), 1.0)
        xscale = torch.where(torch.isfinite(xscale), xscale, 1.0).contiguous()  # [M]
        return (x.float() / xscale[:, None]).to(torch.float16), xscale
    return x.to(torch.bfloat16).contiguous(), x


def quant_gemm(x: torch.Tensor, w: PackedWeight, config: dict | None = None,
               use_fp16: bool | None = None, partials: bool = False) -> torch.Tensor:
    """x [M, K] @ dequant(w).T -> [M, N] fp32 on tensor cores (bf16, or fp16 below sm_80); with
    `partials`, the split-K partial sums [S, M, N] unsummed."""
    x = _check(x, w)
    m, n, n_groups = x.shape[0], w.n_rows, w.n_cols // GROUP
    dev = x.device.index if x.device.type == "cuda" else 0
    cfg = config or gemm_config(w.qtype, m, n, n_groups, _num_sms(dev))
    fp16 = _use_fp16(x.device) if use_fp16 is None else use_fp16
    x, xscale = _gemm_activations(x, fp16)
    ptrs, strides = _weight_args(w)
    groups_per_split, split_k = _split_groups(n_groups, cfg.get("SPLIT_K", 1), cfg["BLOCK_G"])
    partial = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    _quant_gemm_kernel[grid](
        x, partial, xscale, *ptrs, m, n, n_groups, groups_per_split, x.stride(0), m * n, *strides,
        _MAGIC,
        QTYPE=w.qtype, WPG=_WPG[w.qtype], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_G=cfg["BLOCK_G"], GROUP_M=cfg["GROUP_M"], USE_FP16=fp16, USE_ASM=_use_asm(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return _reduce_splits(partial, partials)


def quant_matmul(x: torch.Tensor, w: PackedWeight, partials: bool = False,
                 xq: Q8Rows | None = None) -> torch.Tensor:  # fmt: skip
    """y = x @ dequantize(w).T: x [M, K] (fp32/bf16/fp16, CUDA) -> [M, N] fp32.

    M <= matmul_path.GEMV_MAX_M takes the fp32 GEMV kernel; larger M a tensor-core path (bf16
    products, fp16 below sm_80), chosen by `matmul_path`. With `partials`, the result comes as
    [S, M, N] split-K partial sums (S >= 1) for a consumer that adds them itself
    (fused_norm.residual_rms_norm), which saves the reduction kernel of the tall-K projections.
    `xq`: x's Q8Rows where the kernel that wrote x also quantized it (quant_gemv reads them).
    """
    if not isinstance(w, PackedWeight) or x.dim() != 2 or x.shape[0] == 0:
        _check(x, w)  # raises for a bad argument; each path below checks the rest once
        out = torch.empty((0, w.n_rows), device=x.device, dtype=torch.float32)
        return out.unsqueeze(0) if partials else out
    if w.qtype in LOWBIT_TYPES:  # Q2_K and the FIELD_TYPES: quant_lowbit (IQ4_*, Q3_K run here)
        from llcuda.kernels.quant_lowbit import lowbit_matmul

        return lowbit_matmul(x, w, partials=partials)
    path = matmul_path(x.shape[0], w.n_rows, w.n_cols, bf16=not _use_fp16(x.device))
    if path == "gemv":
        return quant_gemv(x, w, partials=partials, xq=xq)
    if path == "dense":
        from llcuda.kernels.quant_tc import quant_gemm_dense

        return quant_gemm_dense(x, w, partials=partials)
    if path == "swap":
        from llcuda.kernels.quant_tc import quant_gemm_swap

        return quant_gemm_swap(x, w, partials=partials)
    return quant_gemm(x, w, partials=partials)


def uses_gemv(m: int, w: PackedWeight) -> bool:
    """Whether quant_matmul sends an M-row product with `w` to the decode GEMV (never for the
    LOWBIT_TYPES, whose GEMV is quant_lowbit's: no gated epilogue, no pairing)."""
    if w.qtype in LOWBIT_TYPES:
        return False
    return matmul_path(m, w.n_rows, w.n_cols, bf16=True) == "gemv"


def quant_matmul_fused(x: torch.Tensor, w: PackedWeight) -> tuple[torch.Tensor, ...]:
    """One launch over a `fuse_packed` weight (e.g. gate|up); returns one [M, N_i] view per part."""
    if w.split_sizes is None:
        raise QuantMatmulError("quant_matmul_fused needs a weight made by fuse_packed")
    return quant_matmul(x, w).split(list(w.split_sizes), dim=1)


def quant_matmul_ref(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """Pure-torch reference: x.float() @ dequantize_packed(w).T (fp32)."""
    return x.float() @ dequantize_packed(w).T
