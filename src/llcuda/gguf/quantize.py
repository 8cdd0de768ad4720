"""Float weights -> well-formed GGML blocks, for the random-weight twins (tests and benchmarks).

Q4_0, Q8_0 and F16 go through gguf-py's own `gguf.quants.quantize` (llama.cpp's reference
quantizers restated in numpy). gguf-py 0.19 has no quantizer for the K-quants, so Q4_K, Q5_K and
Q6_K are made here: a plain min/max fit per sub-block (not llama.cpp's iterative `make_qkx2`
search, which only lowers the rounding error), packed in the block layouts of GGUF-NOTES
section 2. Any well-formed block is a valid weight: the twins are defined by their bytes, and
every reader (llcuda, gguf-py's `dequantize`, transformers, llama.cpp) decodes the same values.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llcuda.gguf.constants import QK_K, QUANT_SIZES, GGMLType

QUANTIZABLE = (
    GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q8_0,
    GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
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


_K_QUANTIZERS = {GGMLType.Q4_K: _q4_k, GGMLType.Q5_K: _q5_k, GGMLType.Q6_K: _q6_k}


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
        assert block_elems == QK_K
        blocks = _K_QUANTIZERS[qtype](x.reshape(-1, QK_K))
        return blocks.reshape(rows, cols // block_elems * block_bytes)
    return gguf_quants.quantize(x, GGMLQuantizationType(int(qtype)))
