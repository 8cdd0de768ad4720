"""Reference dequantizers in pure torch: the specification every fast kernel is checked against.

`dequantize_ref(raw, qtype)` turns GGUF blocks (uint8 `[..., row_bytes]`) into float32
`[..., n_cols]`, bit for bit equal to gguf-py's numpy `gguf.quants.dequantize`. Bit equality needs
the same float32 operation order as gguf-py: e.g. Q4_0 is `d * (q - 8)` (the integer offset first),
K-quants fold the sub-block scale into d first (`(d * sc) * q - (dmin * m)`). Block layouts are in
GGUF-NOTES.md section 2 (llama.cpp `ggml-common.h`).

Works on any device (all ops are elementwise torch ops); the reshapes assume `raw` is contiguous.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llcuda.gguf.constants import QK_K, QUANT_SIZES, GGMLType
from llcuda.kernels import iq_tables


def row_bytes(qtype: GGMLType, n_cols: int) -> int:
    """Bytes of one row of `n_cols` elements stored as `qtype`."""
    block_elems, block_bytes = QUANT_SIZES[GGMLType(qtype)]
    if n_cols % block_elems:
        raise ValueError(
            f"{GGMLType(qtype).name}: row length {n_cols} is not a multiple of the block size "
            f"{block_elems}"
        )
    return n_cols // block_elems * block_bytes


# ---------------------------------------------------------------------------------- field helpers
# `b` is always uint8 [n_blocks, block_bytes]; results keep a leading n_blocks dim.


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """The little-endian f16 at byte `off` of each block as float32 [n_blocks, 1].

    Built from the two bytes rather than a dtype view: block starts are only 2-byte aligned
    (or not at all for a sliced row), and `Tensor.view(dtype)` needs aligned storage offsets.
    """
    bits = b[:, off : off + 1].to(torch.int32) | (b[:, off + 1 : off + 2].to(torch.int32) << 8)
    bits = bits - ((bits & 0x8000) << 1)  # to the signed int16 range so the cast is exact
    return bits.to(torch.int16).view(torch.float16).to(torch.float32)


def _f16_to_f32(h: torch.Tensor) -> torch.Tensor:
    """int16 bit patterns -> float32, keeping NaN payloads as numpy does.

    torch's cast quiets signalling NaNs (sets the top mantissa bit); numpy keeps the bits
    (`sign | 0x7f800000 | mantissa << 13`), so NaNs are rebuilt from their bits to stay bit-equal.
    """
    out = h.view(torch.float16).to(torch.float32)
    bits = h.to(torch.int32)
    nan_bits = ((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x03FF) << 13)
    return torch.where(torch.isnan(out), nan_bits.view(torch.float32), out)


def _shifts(values: list[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """uint8 shift amounts: uint8 >> uint8 stays uint8 (an int64 tensor would promote to int64)."""
    return torch.tensor(values, dtype=torch.uint8, device=device).view(shape)


def _u32_bits(b: torch.Tensor, off: int) -> torch.Tensor:
    """Bits 0..31 of the little-endian u32 at byte `off`: uint8 [n_blocks, 32] of 0/1.

    Bit e of a little-endian u32 is bit e % 8 of its byte e // 8.
    """
    word = b[:, off : off + 4].unsqueeze(-1)  # [n_blocks, 4, 1]
    return ((word >> _shifts(list(range(8)), (1, 1, 8), b.device)) & 1).flatten(1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k]: all low nibbles, then all high nibbles (the 32-element layout)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 scale bytes into 8 six-bit scales and 8 six-bit mins (uint8)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)  # [n, 8]
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)  # [n, 8]
    return sc, mn


# ---------------------------------------------------------------------------------- block decoders
# each takes uint8 [n_blocks, block_bytes] and returns float32 [n_blocks, block_elems]. Bit work is
# done in uint8 and offsets are subtracted in int8 (exact), so only the final products are float.


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:18]).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:20]).to(torch.float32)
    return d * q + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = (_nibbles(b[:, 6:22]) | (_u32_bits(b, 2) << 4)).to(torch.int8) - 16
    return d * q.to(torch.float32)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 8:24]) | (_u32_bits(b, 4) << 4)
    return d * q.to(torch.float32) + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = b[:, 2:34].contiguous().view(torch.int8).to(torch.float32)
    return q * d


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    # element 128*h + 32*j + l is bits 2j..2j+1 of qs[32*h + l]
    qs = b[:, 16:80].reshape(n, 2, 1, 32)
    q = ((qs >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3).view(n, 16, 16)
    return (dl * q.to(torch.float32) - ml).view(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, sc = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    # 16 six-bit scales: low 4 bits from bytes 0-7 (both nibbles), high 2 bits from bytes 8-11
    lo = (sc[:, 0:8].reshape(n, 1, 8) >> _shifts([0, 4], (1, 2, 1), b.device)) & 0x0F
    hi = (sc[:, 8:12].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], (1, 4, 1), b.device)) & 3
    scales = (lo.reshape(n, 16) | (hi.reshape(n, 16) << 4)).to(torch.int8) - 32
    dl = (d * scales.to(torch.float32)).view(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3
    hb = (hmask.reshape(n, 1, 1, 32) >> _shifts(list(range(8)), (1, 1, 8, 1), b.device)) & 1
    # the -4 offset applies where the high bit is *clear*
    q = ql.reshape(n, 16, 16).to(torch.int8) - ((hb ^ 1) << 2).reshape(n, 16, 16).to(torch.int8)
    return (dl * q.to(torch.float32)).view(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    ds = (d * sc.to(torch.float32)).view(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).view(n, 8, 1)
    # 4 chunks of 32 bytes: low nibbles = sub-block 2c, high nibbles = sub-block 2c+1
    qs = b[:, 16:144].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).view(n, 8, 32).to(torch.float32)
    return (ds * q - dm).view(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    ds = (d * sc.to(torch.float32)).view(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).view(n, 8, 1)
    qs = b[:, 48:176].reshape(n, 4, 1, 32)
    ql = torch.cat([qs & 0x0F, qs >> 4], dim=2).view(n, 8, 32)
    # bit j of qh[l] is the 5th bit of sub-block j, element l
    qh = (b[:, 16:48].reshape(n, 1, 32) >> _shifts(list(range(8)), (1, 8, 1), b.device)) & 1
    q = (ql | (qh << 4)).to(torch.float32)
    return (ds * q - dm).view(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _f16(b, 208)
    dsc = (d * scales).view(n, 16, 1)
    # ql: per 128-element half, 64 bytes; low nibbles = groups 0,1, high nibbles = groups 2,3
    lo = (ql.reshape(n, 2, 1, 64) >> _shifts([0, 4], (1, 1, 2, 1), b.device)) & 0x0F
    hi = (qh.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3
    q = (lo.view(n, 2, 4, 32) | (hi << 4)).to(torch.int8) - 32  # [n, 2, 4, 32]
    return (dsc * q.view(n, 16, 16).to(torch.float32)).view(n, QK_K)


def _iq4_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(iq_tables.IQ4_KVALUES, dtype=torch.float32, device=device)


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:18]).long()
    return d * _iq4_table(b.device)[q]


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 0)
    scales_h = (b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)).view(n, 1)
    ib = torch.arange(8, device=b.device, dtype=torch.int32)
    sl = b[:, 4:8].to(torch.int32)
    # sub-block ib: nibble ib % 2 of byte ib // 2
    lo = torch.stack([sl & 0x0F, sl >> 4], dim=-1).view(n, 8)
    hi = (scales_h >> (2 * ib)) & 3
    dl = (d * ((lo | (hi << 4)) - 32).to(torch.float32)).view(n, 8, 1)
    qs = b[:, 8:136].reshape(n, 8, 16)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).long()  # [n, 8, 32]
    return (dl * _iq4_table(b.device)[q]).view(n, QK_K)


# ---------------------------------------------------------------------------------- IQ / low-bit
# The float operation order of each follows gguf-py's quants.py (bit equality, see the docstring).


def _u16(b: torch.Tensor, off: int, count: int) -> torch.Tensor:
    """`count` little-endian u16 from byte `off` of each block: int32 [n_blocks, count]."""
    v = b[:, off : off + 2 * count].reshape(b.shape[0], count, 2).to(torch.int32)
    return v[..., 0] | (v[..., 1] << 8)


def _u32(b: torch.Tensor, off: int, count: int) -> torch.Tensor:
    """`count` little-endian u32 from byte `off` of each block: int64 [n_blocks, count]."""
    v = b[:, off : off + 4 * count].reshape(b.shape[0], count, 4).to(torch.int64)
    return v[..., 0] | (v[..., 1] << 8) | (v[..., 2] << 16) | (v[..., 3] << 24)


def _sign_bits(s: torch.Tensor) -> torch.Tensor:
    """uint8/int [..., k] sign bytes -> float32 [..., k, 8]: +1 where bit j is clear, else -1."""
    bits = (s.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=s.device)) & 1
    return 1.0 - 2.0 * bits.to(torch.float32)


def _grid_values(qtype: GGMLType, index: torch.Tensor) -> torch.Tensor:
    """Grid entries of `index` (int [...]) as float32 [..., values_per_entry]."""
    return iq_tables.grid(qtype, index.device)[index.long()].to(torch.float32)


def _iq2_xxs(b: torch.Tensor) -> torch.Tensor:
    # per 32 elements: 4 grid bytes (8 values each), then a u32 of 4 x 7-bit sign indices and a
    # 4-bit scale on top
    n = b.shape[0]
    d = _f16(b, 0)
    w = _u32(b, 2, 16).view(n, 8, 2)
    db = (d * (0.5 + (w[..., 1] >> 28).to(torch.float32)) * 0.25).view(n, 8, 1, 1)
    sign_idx = (w[..., 1:2] >> torch.tensor([0, 7, 14, 21], device=b.device)) & 0x7F  # [n, 8, 4]
    signs = _sign_bits(iq_tables.ksigns(b.device)[sign_idx])  # [n, 8, 4, 8]
    grid = _grid_values(GGMLType.IQ2_XXS, b[:, 2:66].reshape(n, 8, 8)[..., 0:4])
    return (db * grid * signs).view(n, QK_K)


def _iq2_xs(b: torch.Tensor) -> torch.Tensor:
    # 32 u16: 9-bit grid index, 7-bit sign index; 16 four-bit scales (one per 16 elements)
    n = b.shape[0]
    d = _f16(b, 0)
    qs = _u16(b, 2, 32)
    sc = b[:, 66:74]
    scales = torch.stack([sc & 0x0F, sc >> 4], dim=-1).view(n, 16).to(torch.float32)
    db = (d * (0.5 + scales) * 0.25).view(n, 16, 1, 1)
    signs = _sign_bits(iq_tables.ksigns(b.device)[(qs >> 9).long()]).view(n, 16, 2, 8)
    grid = _grid_values(GGMLType.IQ2_XS, qs & 511).view(n, 16, 2, 8)
    return (db * grid * signs).view(n, QK_K)


def _iq2_s(b: torch.Tensor) -> torch.Tensor:
    # qs[32] low 8 index bits, signs[32] one byte per 8 values, qh[8] 2 high index bits each,
    # 16 four-bit scales
    n = b.shape[0]
    d = _f16(b, 0)
    sc = b[:, 74:82]
    scales = torch.stack([sc & 0x0F, sc >> 4], dim=-1).view(n, 16).to(torch.float32)
    db = (d * (0.5 + scales) * 0.25).view(n, 16, 1, 1)
    signs = _sign_bits(b[:, 34:66]).view(n, 16, 2, 8)
    qh = (b[:, 66:74].unsqueeze(-1) >> _shifts([0, 2, 4, 6], (1, 1, 4), b.device)) & 3
    index = b[:, 2:34].to(torch.int32) | (qh.reshape(n, 32).to(torch.int32) << 8)
    grid = _grid_values(GGMLType.IQ2_S, index).view(n, 16, 2, 8)
    return (db * grid * signs).view(n, QK_K)


def _iq3_xxs(b: torch.Tensor) -> torch.Tensor:
    # qs[64] grid bytes (4 values each), then per 32 elements a u32: 4 x 7-bit sign indices and a
    # 4-bit scale
    n = b.shape[0]
    d = _f16(b, 0)
    w = _u32(b, 66, 8)  # [n, 8]
    db = (d * (0.5 + (w >> 28).to(torch.float32)) * 0.5).view(n, 8, 1, 1)
    sign_idx = (w.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21], device=b.device)) & 0x7F
    signs = _sign_bits(iq_tables.ksigns(b.device)[sign_idx])  # [n, 8, 4, 8]
    grid = _grid_values(GGMLType.IQ3_XXS, b[:, 2:66]).view(n, 8, 4, 8)
    return (db * grid * signs).view(n, QK_K)


def _iq3_s(b: torch.Tensor) -> torch.Tensor:
    # qs[64] low index bits, qh[8] 9th bits, signs[32] one byte per 8 values, 8 four-bit scales
    n = b.shape[0]
    d = _f16(b, 0)
    sc = b[:, 106:110]
    scales = torch.stack([sc & 0x0F, sc >> 4], dim=-1).view(n, 8)
    db = (d * (1 + 2 * scales.to(torch.int32)).to(torch.float32)).view(n, 8, 1, 1)
    signs = _sign_bits(b[:, 74:106]).view(n, 8, 4, 8)
    qh = (b[:, 66:74].unsqueeze(-1) >> _shifts(list(range(8)), (1, 1, 8), b.device)) & 1
    index = b[:, 2:66].to(torch.int32) | (qh.reshape(n, 64).to(torch.int32) << 8)
    grid = _grid_values(GGMLType.IQ3_S, index).view(n, 8, 4, 8)
    return (db * grid * signs).view(n, QK_K)


_IQ1_DELTA = 0.125


def _iq1_s(b: torch.Tensor) -> torch.Tensor:
    # qs[32] low index bits; per 32 elements a u16: 4 x 3 high index bits, 3-bit scale, delta sign
    n = b.shape[0]
    d = _f16(b, 0)
    qh = _u16(b, 34, 8)  # [n, 8]
    dl = (d * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)).view(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, _IQ1_DELTA, -_IQ1_DELTA).view(n, 8, 1, 1)
    hi = (qh.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9], device=b.device)) & 7  # [n, 8, 4]
    index = b[:, 2:34].to(torch.int32) | (hi.reshape(n, 32) << 8)
    grid = _grid_values(GGMLType.IQ1_S, index).view(n, 8, 4, 8)
    return (dl * (grid + delta)).view(n, QK_K)


def iq1_m_d(s: torch.Tensor) -> torch.Tensor:
    """An IQ1_M block's d from the four u16 of its scales (int32 [..., 4]): float16 [...], bit
    nibble k of d in the top nibble of u16 k (quant_pack stores it whole from this too)."""
    d_bits = (s[..., 0] >> 12) | ((s[..., 1] >> 8) & 0xF0) | ((s[..., 2] >> 4) & 0xF00)
    d_bits = d_bits | (s[..., 3] & 0xF000)
    return (d_bits - ((d_bits & 0x8000) << 1)).to(torch.int16).view(torch.float16)


def _iq1_m(b: torch.Tensor) -> torch.Tensor:
    # qs[32] low index bits; qh[16] a nibble per 8 values (3 high index bits, delta sign);
    # scales: 4 u16 of 4 x 3-bit scales each, the f16 d spread over their top nibbles
    n = b.shape[0]
    s = _u16(b, 48, 4)  # [n, 4]
    d = iq1_m_d(s).to(torch.float32).unsqueeze(-1)  # [n, 1]
    sub = (s.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9], device=b.device)) & 7  # [n, 4, 4]
    dl = (d * (2 * sub.reshape(n, 16) + 1).to(torch.float32)).view(n, 8, 2, 1, 1)
    qh = torch.stack([b[:, 32:48] & 0x0F, b[:, 32:48] >> 4], dim=-1).reshape(n, 32)
    index = b[:, 0:32].to(torch.int32) | ((qh & 7).to(torch.int32) << 8)
    delta = torch.where((qh & 8) == 0, _IQ1_DELTA, -_IQ1_DELTA).view(n, 8, 2, 2, 1)
    grid = _grid_values(GGMLType.IQ1_M, index).view(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).view(n, QK_K)


# MXFP4 e2m1 values, doubled (the block's e8m0 scale is halved to match)
_MXFP4_KVALUES = iq_tables.MXFP4_KVALUES


def _mxfp4(b: torch.Tensor) -> torch.Tensor:
    # e (e8m0 exponent byte), qs[16]: element e < 16 low nibble of qs[e], else high of qs[e - 16]
    e = b[:, 0:1].to(torch.int32)
    # 2^(e - 128) as float32 bits: subnormal for e < 2 (ggml_e8m0_to_fp32_half)
    d = torch.where(e < 2, 0x00200000 << e.clamp(max=1), (e - 1) << 23).view(torch.float32)
    kv = torch.tensor(_MXFP4_KVALUES, dtype=torch.float32, device=b.device)
    return d * kv[_nibbles(b[:, 1:17]).long()]


def _tq1_0(b: torch.Tensor) -> torch.Tensor:
    # base-3 digits: byte * 3^k (mod 256) puts digit k in the top bits, read as (x * 3) >> 8
    n = b.shape[0]
    d = _f16(b, 52)
    p5 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8, device=b.device)
    q0 = (b[:, 0:32].reshape(n, 1, 32) * p5.view(1, 5, 1)).reshape(n, 160)  # uint8 wraps
    q1 = (b[:, 32:48].reshape(n, 1, 16) * p5.view(1, 5, 1)).reshape(n, 80)
    q2 = (b[:, 48:52].reshape(n, 1, 4) * p5[:4].view(1, 4, 1)).reshape(n, 16)
    q = torch.cat([q0, q1, q2], dim=-1).to(torch.int32)
    return d * (((q * 3) >> 8) - 1).to(torch.float32)


def _tq2_0(b: torch.Tensor) -> torch.Tensor:
    # element 128h + 32j + l is bits 2j..2j+1 of qs[32h + l], minus 1
    n = b.shape[0]
    d = _f16(b, 64)
    q = (b[:, 0:64].reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), b.device)) & 3
    return d * (q.reshape(n, QK_K).to(torch.int8) - 1).to(torch.float32)


_BLOCK_DECODERS: dict[GGMLType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
    GGMLType.IQ4_NL: _iq4_nl,
    GGMLType.IQ4_XS: _iq4_xs,
    GGMLType.IQ2_XXS: _iq2_xxs,
    GGMLType.IQ2_XS: _iq2_xs,
    GGMLType.IQ2_S: _iq2_s,
    GGMLType.IQ3_XXS: _iq3_xxs,
    GGMLType.IQ3_S: _iq3_s,
    GGMLType.IQ1_S: _iq1_s,
    GGMLType.IQ1_M: _iq1_m,
    GGMLType.MXFP4: _mxfp4,
    GGMLType.TQ1_0: _tq1_0,
    GGMLType.TQ2_0: _tq2_0,
}
SUPPORTED_TYPES: frozenset[GGMLType] = frozenset(
    {GGMLType.F32, GGMLType.F16, GGMLType.BF16, *_BLOCK_DECODERS}
)


def dequantize_ref(raw: torch.Tensor, qtype: GGMLType) -> torch.Tensor:
    """uint8 `[..., row_bytes]` GGUF rows -> float32 `[..., n_cols]`, as gguf-py computes them."""
    qtype = GGMLType(qtype)
    if raw.dtype != torch.uint8:
        raise ValueError(f"dequantize_ref expects uint8 bytes, got {raw.dtype}")
    if raw.dim() == 0:
        raise ValueError("dequantize_ref expects at least 1-D bytes [..., row_bytes]")
    if qtype not in SUPPORTED_TYPES:
        raise NotImplementedError(f"no reference dequantizer for {qtype.name}")
    block_elems, block_bytes = QUANT_SIZES[qtype]
    nbytes = raw.shape[-1]
    if nbytes % block_bytes:
        raise ValueError(
            f"{qtype.name}: row of {nbytes} bytes is not a multiple of the block size "
            f"({block_bytes} bytes)"
        )
    lead = raw.shape[:-1]
    n_cols = nbytes // block_bytes * block_elems
    raw = raw.contiguous()
    if raw.storage_offset() % 4:
        raw = raw.clone()  # float views below need 4-byte aligned storage
    if qtype == GGMLType.F32:
        return raw.view(torch.float32).clone()
    if qtype == GGMLType.F16:
        return _f16_to_f32(raw.view(torch.int16))
    if qtype == GGMLType.BF16:
        return (raw.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    blocks = raw.reshape(-1, block_bytes)  # [n_blocks, block_bytes]
    out = _BLOCK_DECODERS[qtype](blocks)  # [n_blocks, block_elems]
    return out.reshape(*lead, n_cols)
