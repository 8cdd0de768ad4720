"""Float weights -> well-formed GGML blocks, for the random-weight twins (tests and benchmarks).

Q4_0, Q8_0 and F16 go through gguf-py's own `gguf.quants.quantize` (llama.cpp's reference
quantizers restated in numpy). gguf-py 0.19 has no quantizer for the K-quants or IQ types, so
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS and IQ2_XS are made here: a plain min/max (or
max-abs) fit per sub-block, and for IQ2_XS the nearest grid point per 8 values (not llama.cpp's
iterative searches, which only lower the rounding error), packed in the block layouts of
GGUF-NOTES section 2 and gguf-py's dequantizers. Any well-formed block is a valid weight: the
twins are defined by their bytes, and every reader (llcuda, gguf-py's `dequantize`,
transformers, llama.cpp) decodes the same values.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llcuda.gguf.constants import QUANT_SIZES, GGMLType
from llcuda.kernels.iq_tables import IQ4_KVALUES

QUANTIZABLE = (
    GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q8_0,
    GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q2_K, GGMLType.Q3_K,
    GGMLType.IQ4_NL, GGMLType.IQ4_XS, GGMLType.IQ2_XS,
)  # fmt: skip


def _f16_round(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(f16 bytes [n, 2], the f32 value they hold [n])."""
    h = x.astype(np.float16)
    return h.view(np.uint8).reshape(-1, 2), h.astype(np.float32)


def _asym_fit(x: np.ndarray, qmax: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: x [n, 8, 32] ~ d*sc[j]*q - dmin*m[j], q in 0..qmax, sc and m 6-bit.
    Returns (d bytes, dmin bytes, sc [n, 8], m [n, 8], q [n, 8, 32]) as uint8."""
    lo = np.minimum(x.min(axis=2), 0.0)  # [n, 8]: the sub-block minimum, never above 0
    scale = (x.max(axis=2) - lo) / qmax  # [n, 8]
    neg_min = -lo
    d = scale.max(axis=1) / 63.0  # [n]
    dmin = neg_min.max(axis=1) / 63.0
    d_bytes, d32 = _f16_round(d)
    dmin_bytes, dmin32 = _f16_round(dmin)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[:, None] > 0, np.rint(scale / d32[:, None]), 0).clip(0, 63)
        m = np.where(dmin32[:, None] > 0, np.rint(neg_min / dmin32[:, None]), 0).clip(0, 63)
        step = (d32[:, None] * sc)[..., None]  # [n, 8, 1]
        offset = (dmin32[:, None] * m)[..., None]
        q = np.where(step > 0, np.rint((x + offset) / step), 0).clip(0, qmax)
    return d_bytes, dmin_bytes, sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8)


def _pack_scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 12-byte 6-bit scale/min field of Q4_K and Q5_K (inverse of get_scale_min_k4)."""
    s = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    s[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    s[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return s


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q [n, 256] (low 4 bits used) -> qs [n, 128]: byte 32c+l holds elements 64c+l (low nibble)
    and 64c+32+l (high nibble)."""
    q = q.reshape(-1, 4, 2, 32) & 0xF  # [n, chunk, half, l]
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _asym_fit(x.reshape(-1, 8, 32), 15)
    return np.concatenate([d, dmin, _pack_scales_k4(sc, m), _pack_nibbles(q)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _asym_fit(x.reshape(-1, 8, 32), 31)
    high = (q >> 4) & 1  # [n, 8 sub-blocks, 32]: bit j of qh[l] is bit 4 of element 32j+l
    qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    qs = _pack_nibbles(q.reshape(-1, 256))
    return np.concatenate([d, dmin, _pack_scales_k4(sc, m), qh, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    xs = x.reshape(-1, 16, 16)  # [n, sub-block, 16]
    scale = np.abs(xs).max(axis=2) / 31.0  # [n, 16]
    d_bytes, d32 = _f16_round(scale.max(axis=1) / 127.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[:, None] > 0, np.rint(scale / d32[:, None]), 0).clip(0, 127)
        step = (d32[:, None] * sc)[..., None]
        q = np.where(step > 0, np.rint(xs / step), 0).clip(-32, 31) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # [n, h, g, l]
    lo, hi = q & 0xF, q >> 4
    # ql[64h + 32(g%2) + l] = lo(g) | lo(g+2) << 4 ; qh[32h + l] = sum_g hi(g) << 2g
    ql = (lo[:, :, 0:2] | (lo[:, :, 2:4] << 4)).reshape(-1, 128)
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    qh = (hi << shifts).sum(axis=2).astype(np.uint8).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d_bytes], axis=1)


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """q [n, 256] in 0..3 -> qs [n, 64]: element 128h + 32j + l in bits 2j of byte 32h + l."""
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)  # [n, h, j, l]
    return (
        (q << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None])
        .sum(axis=2)
        .astype(np.uint8)
        .reshape(-1, 64)
    )


def _q2_k(x: np.ndarray) -> np.ndarray:
    xs = x.reshape(-1, 16, 16)  # [n, sub-block, 16]
    lo = np.minimum(xs.min(axis=2), 0.0)
    scale, neg_min = (xs.max(axis=2) - lo) / 3, -lo  # [n, 16]
    d_bytes, d32 = _f16_round(scale.max(axis=1) / 15.0)
    dmin_bytes, dmin32 = _f16_round(neg_min.max(axis=1) / 15.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[:, None] > 0, np.rint(scale / d32[:, None]), 0).clip(0, 15)
        m = np.where(dmin32[:, None] > 0, np.rint(neg_min / dmin32[:, None]), 0).clip(0, 15)
        step, offset = (d32[:, None] * sc)[..., None], (dmin32[:, None] * m)[..., None]
        q = np.where(step > 0, np.rint((xs + offset) / step), 0).clip(0, 3)
    scales = (sc.astype(np.uint8) | (m.astype(np.uint8) << 4)).astype(np.uint8)
    return np.concatenate([scales, _pack_2bit(q.reshape(-1, 256)), d_bytes, dmin_bytes], axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    xs = x.reshape(-1, 16, 16)
    scale = np.abs(xs).max(axis=2) / 4.0  # [n, 16]: q in -4..3
    d_bytes, d32 = _f16_round(scale.max(axis=1) / 31.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[:, None] > 0, np.rint(scale / d32[:, None]), 0).clip(0, 31)
        step = (d32[:, None] * sc)[..., None]
        q = np.where(step > 0, np.rint(xs / step), 0).clip(-4, 3).astype(np.int16) + 4
    q = q.reshape(-1, 256)  # 0..7: the low 2 bits in qs, bit 2 in hmask
    hbit = (q >> 2).reshape(-1, 8, 32).astype(np.uint8)  # [n, e // 32, e % 32]
    hmask = (hbit << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    s6 = (sc.astype(np.int16) + 32).astype(np.uint8)  # [n, 16] six-bit, 32 = zero
    packed = np.zeros((x.shape[0], 12), dtype=np.uint8)
    packed[:, 0:8] = (s6[:, 0:8] & 0xF) | ((s6[:, 8:16] & 0xF) << 4)
    hi = (s6 >> 4).reshape(-1, 4, 4)  # [n, s // 4, s % 4]
    packed[:, 8:12] = (hi << (2 * np.arange(4, dtype=np.uint8))[None, :, None]).sum(axis=1)
    return np.concatenate([hmask, _pack_2bit(q & 3), packed, d_bytes], axis=1)


_IQ4_KVALUES = np.array(IQ4_KVALUES, dtype=np.float32)


def _iq4_codes(xs: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Nearest code-book index of xs / step (step [..., 1]; 0 where step is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(step != 0, xs / step, 0.0)
    return np.abs(t[..., None] - _IQ4_KVALUES).argmin(axis=-1).astype(np.uint8)


def _iq4_nibbles(q: np.ndarray) -> np.ndarray:
    """q [..., 32] -> [..., 16]: element e < 16 in the low nibble of byte e, else the high."""
    return q[..., :16] | (q[..., 16:] << 4)


def _signed_amax(xs: np.ndarray) -> np.ndarray:
    """The value of largest magnitude along the last axis, with its sign [..., 1]."""
    return np.take_along_axis(xs, np.abs(xs).argmax(axis=-1)[..., None], axis=-1)


def _iq4_nl(x: np.ndarray) -> np.ndarray:
    xs = x.reshape(-1, 32)
    d_bytes, d32 = _f16_round(_signed_amax(xs)[:, 0] / -127.0)  # amax lands on code -127
    return np.concatenate([d_bytes, _iq4_nibbles(_iq4_codes(xs, d32[:, None]))], axis=1)


def _iq4_xs(x: np.ndarray) -> np.ndarray:
    xs = x.reshape(-1, 8, 32)
    sub = _signed_amax(xs)[..., 0] / -127.0  # [n, 8] ideal sub-block scales
    d_bytes, d32 = _f16_round(np.abs(sub).max(axis=1) / 31.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(d32[:, None] > 0, np.rint(sub / d32[:, None]), 0).clip(-32, 31)
    q = _iq4_codes(xs, (d32[:, None] * ls)[..., None])  # [n, 8, 32]
    ls6 = (ls + 32).astype(np.uint16)
    scales_h = (((ls6 >> 4) & 3) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1)
    scales_l = (ls6[:, 0::2] & 0xF) | ((ls6[:, 1::2] & 0xF) << 4)
    return np.concatenate([
        d_bytes, scales_h.astype(np.uint16).view(np.uint8).reshape(-1, 2),
        scales_l.astype(np.uint8), _iq4_nibbles(q).reshape(-1, 128),
    ], axis=1)  # fmt: skip


def _iq2_xs(x: np.ndarray) -> np.ndarray:
    # per 8 values: signs (an odd count of minus signs flips the smallest one: the 8th sign is
    # implied by parity), then the grid point nearest to |x| / scale over all 512
    from llcuda.kernels.iq_tables import grid_np  # numpy tables; no torch op runs

    grid = grid_np(GGMLType.IQ2_XS).astype(np.float32)  # [512, 8]
    xs = x.reshape(-1, 16, 2, 8)  # [n, scale group, 8-group, 8]
    neg = xs < 0
    odd = neg.sum(axis=-1) % 2 == 1
    smallest = np.abs(xs).argmin(axis=-1)
    flip = odd[..., None] & (np.arange(8) == smallest[..., None])
    neg ^= flip
    mag = np.abs(xs)
    group_scale = mag.max(axis=(2, 3)) / 43.0  # [n, 16]: the largest value lands on 0x2b
    d_bytes, d32 = _f16_round(group_scale.max(axis=1) / (15.5 * 0.25))
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(d32[:, None] > 0, np.rint(group_scale / (d32[:, None] * 0.25) - 0.5), 0)
        s = s.clip(0, 15)
        db = (d32[:, None] * (0.5 + s) * 0.25)[..., None, None]  # [n, 16, 1, 1]
        target = np.where(db > 0, mag / db, 0.0)  # [n, 16, 2, 8]
    t = target.reshape(-1, 8)
    err = (t**2).sum(1)[:, None] - 2 * t @ grid.T + (grid**2).sum(1)[None, :]  # [groups, 512]
    idx = err.argmin(axis=1).astype(np.uint16)
    bits = (neg.reshape(-1, 8)[:, :7] << np.arange(7)).sum(axis=1).astype(np.uint16)
    qs = (idx | (bits << 9)).reshape(-1, 32)
    s = s.astype(np.uint8)
    scales = s[:, 0::2] | (s[:, 1::2] << 4)
    return np.concatenate([d_bytes, qs.view(np.uint8).reshape(-1, 64), scales], axis=1)


_K_QUANTIZERS = {
    GGMLType.Q4_K: _q4_k, GGMLType.Q5_K: _q5_k, GGMLType.Q6_K: _q6_k, GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k, GGMLType.IQ4_NL: _iq4_nl, GGMLType.IQ4_XS: _iq4_xs,
    GGMLType.IQ2_XS: _iq2_xs,
}  # fmt: skip


def quantize(weights: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """weights [rows, cols] float32 -> the tensor's GGUF data: float32 / float16 values, or
    uint8 blocks [rows, cols / block_elems * block_bytes]."""
    qtype = GGMLType(qtype)
    if weights.ndim != 2:
        raise ValueError(f"quantize takes a 2-D weight, got shape {weights.shape}")
    if qtype not in QUANTIZABLE:
        raise ValueError(f"cannot quantize to {qtype.name} (supported: "
                         f"{', '.join(t.name for t in QUANTIZABLE)})")  # fmt: skip
    rows, cols = weights.shape
    block_elems, block_bytes = QUANT_SIZES[qtype]
    if cols % block_elems:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block_elems}, got {cols}")
    x = np.ascontiguousarray(weights, dtype=np.float32)
    if qtype == GGMLType.F32:
        return x
    if qtype in _K_QUANTIZERS:
        blocks = _K_QUANTIZERS[qtype](x.reshape(-1, block_elems))
        return blocks.reshape(rows, cols // block_elems * block_bytes)
    return gguf_quants.quantize(x, GGMLQuantizationType(int(qtype)))
