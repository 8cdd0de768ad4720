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

# IQ4_NL / IQ4_XS non-linear code book (llama.cpp kvalues_iq4nl)
_IQ4_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


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
    return torch.tensor(_IQ4_KVALUES, dtype=torch.float32, device=device)


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
