"""Repack raw GGUF weight blocks into a struct-of-arrays layout for the Triton matmul kernels.

GGUF rows are runs of 18/22/34/144/176/210-byte blocks: most are only 2-byte aligned and mix f16
scales with the quants, so a GPU kernel that reads them raw issues narrow, scattered loads. At load
time we split every block into separate row-major arrays indexed by *group* = 32 consecutive
elements of a row (every supported type is made of 32-element groups or sub-blocks).

The quants of a group are WPG 32-bit words. A word holds one element of each of P = 32 / WPG
*planes*: plane p of word k is element p * WPG + k of the group. A kernel that pulls plane p out of
a [rows, words] tile gets a tensor laid out exactly like the tile, whose matching activations
x[32g + p*WPG + k] are again a contiguous run: no shuffles between weight and activation layouts.

    qs    4/5/6-bit types (WPG 4, P 8): uint8 [N, K/2]; plane p of word k sits in nibble p
          (byte p // 2, low nibble for even p). Q3_K (WPG 4, P 8): int16 [N, K/8], one per
          word, the low two bits of its values: low byte = bit 0, high byte = bit 1, each in the
          Q5 bit order of qh below. Q8_0 (WPG 8, P 4): uint8 [N, K], plane p in byte p,
          the int8 bit pattern. F16/BF16 (WPG 16, P 2): [N, K] of that dtype, plane p in half p.
          F32 (WPG 32, P 1): the weight itself [N, K].
    qh    Q5_0/Q5_1/Q5_K: uint8 [N, K/8], one byte per word: bit b is the 5th bit of plane 2b and
          bit 4+b that of plane 2b+1 (so a multiply spreads each half into place, see the kernels).
          Q3_K: the same with the 3rd bit (hmask). Q6_K: int16 [N, K/8], one per word: low byte
          = bit 4 of the values, high byte = bit 5, each in the Q5 bit order. (One array entry
          per word, loaded beside the word: an int64 of a group's top bits that all four words
          read, as llama.cpp's MMVQ lays Q6_K's qh, made Q6_K's decode GEMV 2.4-3.2x slower on an
          H100, fifteenth session.)
    sc    Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: float16 d [N, K/32]. Q4_K/Q5_K: uint8 6-bit scale [N, K/32].
          Q6_K / Q3_K: int8 scale per 16 elements [N, K/16] (planes 0-3 of group g use 2g, 4-7
          use 2g+1; Q3_K's is its 6-bit scale - 32).
    mn    Q4_1/Q5_1: float16 m [N, K/32]. Q4_K/Q5_K: uint8 6-bit min [N, K/32].
    d     Q4_K/Q5_K/Q6_K/Q3_K: float16 super-block scale [N, K/256].
    dmin  Q4_K/Q5_K: float16 super-block min scale [N, K/256].

Sizes equal the raw bytes except Q4_K/Q5_K, whose 12-byte packed 6-bit scales become 16 bytes
(148/144 and 180/176 bytes per 256 elements, <= 1.03x), and Q3_K, whose become 16 int8 (114/110,
1.036x), so kernels need no 6-bit unpacking.

IQ4_NL is packed as Q4_0 and IQ4_XS as Q4_K's quants (nibble planes of their code-book
indices): IQ4_NL's sc holds d [N, K/32]; IQ4_XS's sc the int8 scale - 32 per group and d
[N, K/256] (138 B / 256 against the raw 136, 1.015x). The kernels map the indices through the
code book per word (quant_matmul._iq4_bytes).

The low-bit types (LOWBIT_TYPES: Q2_K and FIELD_TYPES; kernels in quant_lowbit.py) keep the
elements of a row in their natural order instead of planes: word i of a row holds elements
(32 / bits) * i.. in bits ascending (element j of the word at bit bits * j):

    Q2_K    qs uint8 [N, K/4] (2-bit words); sc uint8 [N, K/16] the raw scale byte per 16
            elements (scale low nibble, min high nibble); d, dmin float16 [N, K/256]. 84 B / 256.
The IQ1/IQ2/IQ3 grid types, TQ1_0, TQ2_0 and MXFP4 (FIELD_TYPES) keep their raw block fields,
each field of every block in one row-major array (see FIELD_TYPES), decoded per element.
`dequantize_packed` is the pure-torch meaning of the layout (and the CPU fallback).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from llcuda.gguf.constants import QUANT_SIZES, GGMLType
from llcuda.kernels.dequant_ref import dequantize_ref, iq1_m_d
from llcuda.kernels.iq_tables import IQ4_KVALUES

# GGML type ids (the GGUF file format's numbering, `ggml.h`).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
Q2_K, Q3_K, IQ4_NL, IQ4_XS = 10, 11, 20, 23
IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ3_S, IQ2_S, IQ1_M = 16, 17, 18, 19, 21, 22, 29
TQ1_0, TQ2_0, MXFP4 = 34, 35, 39

# type id -> (elements per block, bytes per block, name) of the types packed here; the sizes are
# gguf.constants.QUANT_SIZES' (ggml-common.h)
QUANT_BLOCKS: dict[int, tuple[int, int, str]] = {
    qid: (*QUANT_SIZES[GGMLType(qid)], GGMLType(qid).name)
    for qid in (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, IQ4_NL,
                IQ4_XS, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, TQ1_0, TQ2_0, MXFP4)
}  # fmt: skip
# The grid / ternary / MXFP4 types are split into their raw fields, row-major: array name ->
# (byte offset in the block, bytes per block). "d" becomes float16 [N, blocks]; the rest stay
# uint8 [N, blocks * bytes]. IQ1_M's d, spread over its scales' top nibbles, is also stored
# whole (a derived float16 [N, K/256]: 58 B / 256 against the raw 56, 1.036x).
FIELD_TYPES: dict[int, dict[str, tuple[int, int]]] = {
    IQ2_XXS: {"d": (0, 2), "qs": (2, 64)},
    IQ2_XS: {"d": (0, 2), "qs": (2, 64), "sc": (66, 8)},
    IQ2_S: {"d": (0, 2), "qs": (2, 32), "signs": (34, 32), "qh": (66, 8), "sc": (74, 8)},
    IQ3_XXS: {"d": (0, 2), "qs": (2, 64), "qh": (66, 32)},
    IQ3_S: {"d": (0, 2), "qs": (2, 64), "qh": (66, 8), "signs": (74, 32), "sc": (106, 4)},
    IQ1_S: {"d": (0, 2), "qs": (2, 32), "qh": (34, 16)},
    IQ1_M: {"qs": (0, 32), "qh": (32, 16), "sc": (48, 8)},
    TQ1_0: {"qs": (0, 48), "qh": (48, 4), "d": (52, 2)},
    TQ2_0: {"qs": (0, 64), "d": (64, 2)},
    MXFP4: {"sc": (0, 1), "qs": (1, 16)},
}
# Types packed in natural element order for quant_lowbit's kernels (see the module docstring)
LOWBIT_TYPES = frozenset({Q2_K, *FIELD_TYPES})
FLOAT_TYPES = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
GROUP = 32  # elements per group: the unit every kernel walks K in

# Rows repacked per step, to bound the temporary int tensors (~K bytes per row each).
_PACK_CHUNK_ROWS = 8192


class QuantPackError(ValueError):
    """Raised when a weight cannot be packed (unsupported type, wrong row size, bad tensor)."""


@dataclass(frozen=True)
class PackedWeight:
    """A [n_rows, n_cols] weight (out features x in features) in the repacked layout above."""

    qtype: int
    n_rows: int  # N, output features
    n_cols: int  # K, input features
    qs: torch.Tensor
    qh: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None
    d: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    signs: torch.Tensor | None = None  # IQ2_S / IQ3_S: one sign byte per 8 elements
    # When several weights were fused along N (e.g. ffn_gate | ffn_up): their row counts.
    split_sizes: tuple[int, ...] | None = None

    @property
    def device(self) -> torch.device:
        return self.qs.device

    @property
    def type_name(self) -> str:
        return QUANT_BLOCKS[self.qtype][2]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in self._arrays().values() if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clone(self) -> PackedWeight:
        """The same weight in memory of its own (contiguous copies of every array)."""
        arrays = {name: None if t is None else t.clone(memory_format=torch.contiguous_format)
                  for name, t in self._arrays().items()}  # fmt: skip
        return replace(self, **arrays)

    def _arrays(self) -> dict[str, torch.Tensor | None]:
        return {"qs": self.qs, "qh": self.qh, "sc": self.sc, "mn": self.mn, "d": self.d,
                "dmin": self.dmin, "signs": self.signs}  # fmt: skip


def qtype_id(qtype) -> int:
    """Accept an int, llcuda's GGMLType or gguf's GGMLQuantizationType (all IntEnum-like)."""
    qid = int(qtype)
    if qid not in QUANT_BLOCKS:
        raise QuantPackError(f"unsupported quant type {qtype!r}; supported: "
                             + ", ".join(v[2] for v in QUANT_BLOCKS.values()))
    return qid


def row_bytes(qtype, n_cols: int) -> int:
    elems, nbytes, name = QUANT_BLOCKS[qtype_id(qtype)]
    if n_cols % elems:
        raise QuantPackError(f"{name} rows must hold a multiple of {elems} elements, got {n_cols}")
    return n_cols // elems * nbytes


def _f16_field(blocks: torch.Tensor, off: int) -> torch.Tensor:
    # blocks [n, nb, block_bytes] uint8 -> [n, nb] float16 read from bytes off..off+1
    return blocks[..., off : off + 2].contiguous().view(torch.float16).squeeze(-1)


def _to_planes(v: torch.Tensor, wpg: int) -> torch.Tensor:
    # v [n, G, 32] in element order -> [n, G, wpg (word k), 32 // wpg (plane p)], e = p * wpg + k
    return v.reshape(v.shape[0], v.shape[1], 32 // wpg, wpg).transpose(2, 3)


def _from_planes(v: torch.Tensor) -> torch.Tensor:
    # inverse of _to_planes: [n, G, wpg, P] -> [n, G * 32] in element order
    return v.transpose(2, 3).reshape(v.shape[0], -1)


def _pack_nibble_planes(q: torch.Tensor) -> torch.Tensor:
    # q [n, G, 32] values (low 4 bits used), element order -> uint8 [n, G * 16]: word k of a group
    # holds element 4p + k in nibble p, i.e. byte b = plane 2b | plane 2b+1 << 4
    qp = _to_planes(q & 15, 4)  # [n, G, 4, 8]
    return (qp[..., 0::2] | (qp[..., 1::2] << 4)).reshape(q.shape[0], -1)


def _pack_bit_planes(bit: torch.Tensor) -> torch.Tensor:
    # bit [n, G, 32] in {0, 1}, element order -> uint8 [n, G * 4]: one byte per 4-bit word, bit b =
    # plane 2b, bit 4+b = plane 2b+1
    bp = _to_planes(bit, 4).to(torch.int32)  # [n, G, 4, 8]
    shifts = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7], device=bit.device, dtype=torch.int32)
    return (bp << shifts).sum(-1).to(torch.uint8).reshape(bit.shape[0], -1)


def _pack_two_bit_planes(v: torch.Tensor) -> torch.Tensor:
    # v [n, G, 32] 2-bit values, element order -> int16 [n, G * 4]: one per 4-bit word, low byte
    # = bit 0 of its values, high byte = bit 1, each in _pack_bit_planes' order
    y = _pack_bit_planes(v & 1).to(torch.int32) | (_pack_bit_planes(v >> 1).to(torch.int32) << 8)
    return torch.where(y >= 2**15, y - 2**16, y).to(torch.int16)


def _unpack_two_bit_planes(y: torch.Tensor) -> torch.Tensor:
    # inverse of _pack_two_bit_planes: int16 [n, G * 4] -> int32 [n, G * 32], element order
    y = y.to(torch.int32)
    return _unpack_bit_planes(y & 255) | (_unpack_bit_planes((y >> 8) & 255) << 1)


def _kquant_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # s [n, nb, 12] packed 6-bit scales/mins of Q4_K/Q5_K -> sc, mn [n, nb*8] uint8
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    return sc.reshape(s.shape[0], -1), mn.reshape(s.shape[0], -1)


def _kquant_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    # qs [n, nb, 128] of Q4_K/Q5_K: chunk c of 32 bytes holds sub-block 2c in its low nibbles and
    # sub-block 2c+1 in its high nibbles -> [n, nb*8, 32] 4-bit values in element order
    v = qs.reshape(qs.shape[0], qs.shape[1], 4, 1, 32)
    return torch.cat([v & 15, v >> 4], dim=3).reshape(qs.shape[0], -1, 32)


def _legacy_values(b: torch.Tensor, qid: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    # Q4_0/Q4_1/Q5_0/Q5_1 blocks [n, nb, bb]: d (m) (qh u32) qs[16] -> values [n, nb, 32], scales
    has_m, has_h = qid in (Q4_1, Q5_1), qid in (Q5_0, Q5_1)
    off = 4 if has_m else 2
    fields = {"sc": _f16_field(b, 0)}
    if has_m:
        fields["mn"] = _f16_field(b, 2)
    h = None
    if has_h:
        qh = b[..., off : off + 4].contiguous().view(torch.int32)  # [n, nb, 1], bit e = element e
        lanes = torch.arange(32, device=b.device, dtype=torch.int32)
        h = (qh >> lanes) & 1
        off += 4
    qs = b[..., off : off + 16]
    q = torch.cat([qs & 15, qs >> 4], dim=-1)
    if h is not None:
        fields["qh"] = _pack_bit_planes(h)
    return q, fields


def _pack_rows(raw: torch.Tensor, qid: int, n_cols: int) -> dict[str, torch.Tensor]:
    """Repack raw rows [n, row_bytes] uint8 into the arrays of the module docstring."""
    n = raw.shape[0]
    if qid == F32:
        return {"qs": raw.view(torch.float32)}
    if qid in FLOAT_TYPES:  # F16 / BF16: element 16p + k -> half p of word k
        v = raw.view(FLOAT_TYPES[qid]).reshape(n, -1, 32)
        return {"qs": _to_planes(v, 16).reshape(n, -1).contiguous()}
    elems, bb, _ = QUANT_BLOCKS[qid]
    b = raw.reshape(n, n_cols // elems, bb)  # [n, nb, block_bytes]
    if qid == Q8_0:
        q = b[..., 2:34]  # [n, nb, 32] int8 bit patterns, element order
        return {"qs": _to_planes(q, 8).reshape(n, -1), "sc": _f16_field(b, 0)}
    if qid in (Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL):  # IQ4_NL: Q4_0's layout, code-book indices
        q, fields = _legacy_values(b, Q4_0 if qid == IQ4_NL else qid)
        fields["qs"] = _pack_nibble_planes(q)
        return fields
    if qid == IQ4_XS:
        return _pack_iq4_xs(b)
    if qid in (Q4_K, Q5_K):
        sc, mn = _kquant_scales(b[..., 4:16])
        out = {"d": _f16_field(b, 0), "dmin": _f16_field(b, 2), "sc": sc, "mn": mn}
        qs_off = 16 if qid == Q4_K else 48
        out["qs"] = _pack_nibble_planes(_kquant_low_nibbles(b[..., qs_off : qs_off + 128]))
        if qid == Q5_K:
            # qh[l] bit j = 5th bit of element 32j + l of the super-block
            qh = b[..., 16:48].reshape(n, -1, 1, 32)
            j = torch.arange(8, device=raw.device, dtype=torch.uint8).view(1, 1, 8, 1)
            bits = (qh >> j) & 1
            out["qh"] = _pack_bit_planes(bits.reshape(n, -1, 32))
        return out
    if qid == Q6_K:
        # ql [128] qh [64] sc [16] int8, d f16. Element 128h + 32g + l: low 4 bits in nibble g//2 of
        # ql[64h + 32(g%2) + l], top 2 bits in bits 2g of qh[32h + l].
        ql = b[..., 0:128].reshape(n, -1, 2, 1, 2, 32)  # [n, nb, h, g//2, g%2, l]
        lo = torch.cat([ql & 15, ql >> 4], dim=3).reshape(n, -1, 32)  # [n, nb*8, 32]
        qh = b[..., 128:192].reshape(n, -1, 2, 1, 32)  # [n, nb, h, g, l]
        shifts = torch.arange(0, 8, 2, device=raw.device, dtype=torch.uint8).view(1, 1, 1, 4, 1)
        hi = ((qh >> shifts) & 3).reshape(n, -1, 32)  # [n, nb*8, 32] element order
        return {
            "qs": _pack_nibble_planes(lo),
            "qh": _pack_two_bit_planes(hi),
            "sc": b[..., 192:208].contiguous().view(torch.int8).reshape(n, -1),
            "d": _f16_field(b, 208),
        }
    if qid == Q3_K:
        return _pack_q3_k(b)
    if qid in LOWBIT_TYPES:
        return _pack_lowbit(b, qid)
    raise QuantPackError(f"no packer for type {qid}")  # unreachable: qtype_id filters


def _bits_to_words(v: torch.Tensor, bits: int) -> torch.Tensor:
    """v [n, E] values of `bits` bits in element order -> uint8 [n, E * bits / 8]: the bytes of
    little-endian int32 words holding 32 / bits consecutive elements each, element j at bit
    bits * j (so byte b holds elements 8 / bits * b.. the same way)."""
    per_byte = 8 // bits
    v = v.to(torch.int32).reshape(v.shape[0], -1, per_byte)
    shifts = torch.arange(0, 8, bits, device=v.device, dtype=torch.int32)
    return (v << shifts).sum(-1).to(torch.uint8)


def _pack_iq4_xs(b: torch.Tensor) -> dict[str, torch.Tensor]:
    """IQ4_XS blocks [n, nb, 136] -> nibble planes of the code-book indices, the int8 scale - 32
    per group, d per super-block."""
    n = b.shape[0]
    qs = b[..., 8:136].reshape(n, -1, 8, 16)  # sub-block ib: low nibbles 0-15, high 16-31
    idx = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, -1, 32)  # [n, K/32, 32]
    sh = b[..., 2].to(torch.int32) | (b[..., 3].to(torch.int32) << 8)  # [n, nb]
    sl = b[..., 4:8].to(torch.int32)
    lo = torch.stack([sl & 15, sl >> 4], dim=-1).reshape(n, -1, 8)  # [n, nb, 8]
    hi = (sh[..., None] >> (2 * torch.arange(8, device=b.device))) & 3
    sc = ((lo | (hi << 4)) - 32).to(torch.int8).reshape(n, -1)
    return {"qs": _pack_nibble_planes(idx), "sc": sc, "d": _f16_field(b, 0)}


def _pack_fields(b: torch.Tensor, qid: int) -> dict[str, torch.Tensor]:
    """Blocks [n, nb, block_bytes] of a FIELD_TYPES type -> its field arrays."""
    n = b.shape[0]
    out = {}
    for name, (off, size) in FIELD_TYPES[qid].items():
        if name == "d":
            out["d"] = _f16_field(b, off)
        else:
            out[name] = b[..., off : off + size].reshape(n, -1)
    if qid == IQ1_M:  # d: nibble k in the top nibble of the k-th u16 of the scales
        sc = b[..., 48:56].to(torch.int32)
        out["d"] = iq1_m_d(sc[..., 0::2] | (sc[..., 1::2] << 8))  # u16 [n, nb, 4] -> [n, nb]
    return out


def _kquant_2bit_values(qs: torch.Tensor) -> torch.Tensor:
    # qs [n, nb, 64] of Q2_K / Q3_K: element 128h + 32j + l is bits 2j.. of byte 32h + l ->
    # [n, nb * 256] 2-bit values in element order
    n = qs.shape[0]
    shifts = torch.arange(0, 8, 2, device=qs.device, dtype=torch.uint8).view(1, 1, 1, 4, 1)
    return ((qs.reshape(n, -1, 2, 1, 32) >> shifts) & 3).reshape(n, -1)


def _pack_q3_k(b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Q3_K blocks [n, nb, 110] (hmask[32] qs[64] scales[12] d) -> the plane-type arrays of the
    module docstring: value q + 4 = low 2 bits | 3rd bit << 2, a scale per 16 elements."""
    n = b.shape[0]
    low = _kquant_2bit_values(b[..., 32:96]).view(n, -1, 32)  # [n, K/32, 32]
    # hmask byte l bit (e // 32) is the 3rd bit of element e = 32 (e // 32) + l
    hm = b[..., 0:32].reshape(n, -1, 1, 32)
    bit = (hm >> torch.arange(8, device=b.device, dtype=torch.uint8).view(1, 1, 8, 1)) & 1
    sc = b[..., 96:108]
    lo = torch.cat([sc[..., 0:8] & 15, sc[..., 0:8] >> 4], dim=-1)  # [n, nb, 16]
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)
    hi = (sc[..., 8:12].unsqueeze(-2) >> shifts) & 3  # [n, nb, s // 4, s % 4]
    scales = (lo | (hi.reshape(n, -1, 16) << 4)).to(torch.int8) - 32
    return {"qs": _pack_two_bit_planes(low), "qh": _pack_bit_planes(bit.reshape(n, -1, 32)),
            "sc": scales.reshape(n, -1), "d": _f16_field(b, 108)}  # fmt: skip


def _pack_lowbit(b: torch.Tensor, qid: int) -> dict[str, torch.Tensor]:
    """Blocks [n, nb, block_bytes] of a LOWBIT_TYPES type -> the natural-order arrays."""
    if qid in FIELD_TYPES:
        return _pack_fields(b, qid)
    low = _kquant_2bit_values(b[..., 16:80])  # Q2_K: [n, K] element order
    return {"qs": _bits_to_words(low, 2), "sc": b[..., 0:16].reshape(b.shape[0], -1),
            "d": _f16_field(b, 80), "dmin": _f16_field(b, 82)}  # fmt: skip


def pack_weight(data: torch.Tensor, qtype, n_cols: int) -> PackedWeight:
    """Repack raw GGUF rows `data` (uint8 [N, row_bytes]) of `qtype` holding `n_cols` (K) each.

    Run once at load, on the device the weight will live on. The result shares no memory with
    `data` except for F16/BF16/F32 (a view), so the raw tensor can be dropped afterwards.
    """
    qid = qtype_id(qtype)
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 2:
        raise QuantPackError("data must be a 2-D uint8 tensor [n_rows, row_bytes]")
    if n_cols <= 0 or n_cols % GROUP:
        raise QuantPackError(f"n_cols must be a positive multiple of {GROUP}, got {n_cols}")
    want = row_bytes(qid, n_cols)
    if data.shape[1] != want:
        raise QuantPackError(
            f"{QUANT_BLOCKS[qid][2]} rows of {n_cols} elements take {want} bytes, "
            f"got {data.shape[1]}"
        )
    data = data.contiguous()
    n_rows = data.shape[0]
    if qid in FLOAT_TYPES:
        return PackedWeight(qid, n_rows, n_cols, **_pack_rows(data, qid, n_cols))
    fields: dict[str, torch.Tensor] = {}
    for i in range(0, n_rows, _PACK_CHUNK_ROWS):  # into the arrays in place: no second copy
        part = _pack_rows(data[i : i + _PACK_CHUNK_ROWS], qid, n_cols)
        for name, t in part.items():
            if name not in fields:
                fields[name] = t.new_empty((n_rows, *t.shape[1:]))
            fields[name][i : i + t.shape[0]] = t
    return PackedWeight(qid, n_rows, n_cols, **fields)


def fuse_packed(weights: list[PackedWeight]) -> PackedWeight:
    """Concatenate packed weights of one type and K along N (e.g. ffn_gate | ffn_up).

    One matmul launch then reads them all; `quant_matmul_fused` splits the output again.
    """
    if not weights:
        raise QuantPackError("fuse_packed needs at least one weight")
    w0 = weights[0]
    for w in weights[1:]:
        if (w.qtype, w.n_cols, w.device) != (w0.qtype, w0.n_cols, w0.device):
            raise QuantPackError("fused weights must share qtype, n_cols and device")
    fields = {}
    for name in w0._arrays():
        ts = [getattr(w, name) for w in weights]
        fields[name] = None if ts[0] is None else torch.cat(ts).contiguous()
    sizes = tuple(s for w in weights for s in (w.split_sizes or (w.n_rows,)))
    return replace(w0, n_rows=sum(w.n_rows for w in weights), split_sizes=sizes, **fields)


def row_slice(w: PackedWeight, start: int, stop: int) -> PackedWeight:
    """Rows start..stop-1 of w as views into its arrays (every array is row-major along N), for
    a kernel that takes part of a matrix at a time; the slice is one weight (no split_sizes)."""
    if not 0 <= start < stop <= w.n_rows:
        raise QuantPackError(f"row slice {start}:{stop} is outside the weight's {w.n_rows} rows")
    arrays = {name: None if t is None else t[start:stop] for name, t in w._arrays().items()}
    return replace(w, n_rows=stop - start, split_sizes=None, **arrays)


def _unpack_nibble_planes(qs: torch.Tensor) -> torch.Tensor:
    # uint8 [n, G * 16] -> int32 [n, G * 32] 4-bit values in element order
    by = qs.reshape(qs.shape[0], -1, 4, 4).to(torch.int32)  # [n, G, word, byte]
    return _from_planes(torch.stack([by & 15, by >> 4], dim=-1).flatten(-2))  # plane 2b+h


def _unpack_bit_planes(x: torch.Tensor) -> torch.Tensor:
    # uint8/int [n, G * 4] -> int32 [n, G * 32] bits in element order
    shifts = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7], device=x.device, dtype=torch.int32)
    x = x.to(torch.int32).reshape(x.shape[0], -1, 4, 1)
    return _from_planes((x >> shifts) & 1)


def dequantize_packed(w: PackedWeight) -> torch.Tensor:
    """float32 [N, K]: the values the kernels multiply with (pure torch; also the CPU fallback)."""
    n, k, qid = w.n_rows, w.n_cols, w.qtype
    if qid == F32:
        return w.qs.float()
    if qid in FLOAT_TYPES:
        return _from_planes(w.qs.reshape(n, -1, 16, 2)).float()
    if qid == Q8_0:
        q = _from_planes(w.qs.view(torch.int8).reshape(n, -1, 8, 4)).float().view(n, -1, 32)
        return (q * w.sc.float()[..., None]).view(n, k)
    if qid in LOWBIT_TYPES:
        return _dequantize_lowbit(w)
    if qid == Q3_K:  # q + 4 = the low two bits | the 3rd bit << 2
        return _scaled_per_16(w, (_unpack_two_bit_planes(w.qs) | (_unpack_bit_planes(w.qh) << 2))
                              - 4)  # fmt: skip
    q = _unpack_nibble_planes(w.qs)  # [n, K]
    if qid in (IQ4_NL, IQ4_XS):
        kv = torch.tensor(IQ4_KVALUES, dtype=torch.float32, device=w.device)
        v = kv[q.long()].view(n, -1, 32)  # [n, K/32, 32]
        if qid == IQ4_NL:
            return (w.sc.float()[..., None] * v).view(n, k)
        dl = w.d.float().repeat_interleave(8, dim=1) * w.sc.float()  # [n, K/32]
        return (dl[..., None] * v).view(n, k)
    if qid in (Q5_0, Q5_1, Q5_K):
        q = q | (_unpack_bit_planes(w.qh) << 4)
    if qid == Q6_K:
        return _scaled_per_16(w, (q | (_unpack_two_bit_planes(w.qh) << 4)) - 32)
    q = q.view(n, -1, 32)
    if qid in (Q4_K, Q5_K):
        d = w.d.float().repeat_interleave(8, dim=1)  # [n, K/32]
        dmin = w.dmin.float().repeat_interleave(8, dim=1)
        a, c = d * w.sc.float(), -(dmin * w.mn.float())
        return (q.float() * a[..., None] + c[..., None]).view(n, k)
    d = w.sc.float()[..., None]
    if qid in (Q4_1, Q5_1):
        return (q.float() * d + w.mn.float()[..., None]).view(n, k)
    offset = 8 if qid == Q4_0 else 16
    return ((q - offset).float() * d).view(n, k)


def _scaled_per_16(w: PackedWeight, q: torch.Tensor) -> torch.Tensor:
    """Q6_K / Q3_K: signed values q int32 [N, K] times d * their 16-element scale, float32 [N, K]
    in gguf-py's operation order (bit-equal)."""
    scale = w.d.float().repeat_interleave(16, dim=1) * w.sc.float()  # [N, K/16]
    return (q.float().view(w.n_rows, -1, 16) * scale[..., None]).view(w.n_rows, w.n_cols)


def _words_to_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of _bits_to_words: uint8 [n, E * bits / 8] -> int32 [n, E] in element order."""
    shifts = torch.arange(0, 8, bits, device=x.device, dtype=torch.int32)
    return ((x.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)).reshape(x.shape[0], -1)


def raw_blocks(w: PackedWeight) -> torch.Tensor:
    """The GGUF rows uint8 [N, row_bytes] a FIELD_TYPES weight was packed from."""
    fields = FIELD_TYPES[w.qtype]
    nb = w.n_cols // QUANT_BLOCKS[w.qtype][0]
    parts = []
    for name, (_, size) in sorted(fields.items(), key=lambda kv: kv[1][0]):
        t = getattr(w, name)
        if name == "d":
            t = t.contiguous().view(torch.uint8)
        parts.append(t.reshape(w.n_rows, nb, size))
    return torch.cat(parts, dim=-1).reshape(w.n_rows, -1)


def _dequantize_lowbit(w: PackedWeight) -> torch.Tensor:
    """float32 [N, K] of a LOWBIT_TYPES weight, in gguf-py's operation order (bit-equal)."""
    n, k, qid = w.n_rows, w.n_cols, w.qtype
    if qid in FIELD_TYPES:  # the split is lossless: the reference of the raw blocks
        return dequantize_ref(raw_blocks(w), qid)
    q = _words_to_bits(w.qs, 2).view(n, -1, 16)  # Q2_K: [n, K/16, 16]
    dl = w.d.float().repeat_interleave(16, dim=1) * (w.sc & 15).float()  # [n, K/16]
    ml = w.dmin.float().repeat_interleave(16, dim=1) * (w.sc >> 4).float()
    return (dl[..., None] * q.float() - ml[..., None]).view(n, k)
