"""dequantize_ref against hand-computed blocks and, bit for bit, against gguf-py's dequantize."""

from __future__ import annotations

import time

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llcuda.gguf.constants import QUANT_SIZES, GGMLType
from llcuda.gguf.reader import GGUFFile
from llcuda.kernels import iq_tables
from llcuda.kernels.dequant_ref import SUPPORTED_TYPES, dequantize_ref, row_bytes

IQ4_KV = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
BLOCK_TYPES = sorted(t for t in SUPPORTED_TYPES if QUANT_SIZES[t][0] > 1)
FLOAT_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16]
# byte offsets of the f16 scale fields in each block (GGUF-NOTES section 2)
F16_FIELDS = {
    GGMLType.Q4_0: [0],
    GGMLType.Q4_1: [0, 2],
    GGMLType.Q5_0: [0],
    GGMLType.Q5_1: [0, 2],
    GGMLType.Q8_0: [0],
    GGMLType.Q2_K: [80, 82],
    GGMLType.Q3_K: [108],
    GGMLType.Q4_K: [0, 2],
    GGMLType.Q5_K: [0, 2],
    GGMLType.Q6_K: [208],
    GGMLType.IQ4_NL: [0],
    GGMLType.IQ4_XS: [0],
    GGMLType.IQ2_XXS: [0],
    GGMLType.IQ2_XS: [0],
    GGMLType.IQ2_S: [0],
    GGMLType.IQ3_XXS: [0],
    GGMLType.IQ3_S: [0],
    GGMLType.IQ1_S: [0],
    GGMLType.IQ1_M: [],  # its f16 is spread over four nibbles: set_iq1_m_d
    GGMLType.MXFP4: [],  # an e8m0 exponent byte: every value is finite or inf, never NaN
    GGMLType.TQ1_0: [52],
    GGMLType.TQ2_0: [64],
}
KSIGNS = iq_tables.ksigns_np().tolist()


def set_iq1_m_d(blocks: np.ndarray, d: np.ndarray) -> None:
    """Store f16 `d` [n] in IQ1_M blocks [n, 56]: nibble k of d in the top nibble of u16 k of
    the scales (bytes 48..55)."""
    s = blocks[:, 48:56].copy().view(np.uint16)
    bits = d.astype(np.float16).view(np.uint16)
    for k in range(4):
        s[:, k] = (s[:, k] & 0x0FFF) | (((bits >> (4 * k)) & 0xF) << 12)
    blocks[:, 48:56] = s.view(np.uint8)


def gguf_dequant(raw: np.ndarray, qtype: GGMLType) -> np.ndarray:
    out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(qtype)))
    return np.ascontiguousarray(out, dtype=np.float32)


def assert_bit_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == ref.shape
    a, b = ours.numpy().view(np.int32), ref.view(np.int32)
    if not np.array_equal(a, b):
        i = np.flatnonzero(a.ravel() != b.ravel())
        raise AssertionError(
            f"{len(i)} elements differ, first at {i[0]}: {ours.numpy().ravel()[i[0]]!r} "
            f"vs gguf {ref.ravel()[i[0]]!r}"
        )


# ------------------------------------------------------------------- hand-built blocks


def f16(x: float) -> bytes:
    return np.float16(x).tobytes()


def test_q4_0_literal_block():
    # d = 0.5; byte i holds element i (low nibble = i) and element 16+i (high nibble = 15-i)
    block = f16(0.5) + bytes(i | ((15 - i) << 4) for i in range(16))
    out = dequantize_ref(torch.tensor(list(block), dtype=torch.uint8), GGMLType.Q4_0)
    expected = [0.5 * (i - 8) for i in range(16)] + [0.5 * (15 - i - 8) for i in range(16)]
    assert out.tolist() == expected
    assert out[0].item() == -4.0 and out[15].item() == 3.5 and out[16].item() == 3.5


def test_q8_0_literal_block():
    qs = np.array([-128, -1, 0, 1, 127] + [2] * 27, dtype=np.int8)
    block = f16(0.25) + qs.tobytes()
    out = dequantize_ref(torch.tensor(list(block), dtype=torch.uint8), GGMLType.Q8_0)
    assert out[:5].tolist() == [-32.0, -0.25, 0.0, 0.25, 31.75]
    assert out[5:].tolist() == [0.5] * 27


def _k_scale_min(s: bytes, j: int) -> tuple[int, int]:
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def hand_dequant(block: bytes, t: GGMLType) -> list[float]:
    """Element-by-element formulas of GGUF-NOTES section 2, in float64 (exact for our scales)."""
    T = GGMLType
    half = lambda off: float(np.frombuffer(block[off : off + 2], dtype=np.float16)[0])  # noqa: E731
    if t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL):
        d = half(0)
        m = half(2) if t in (T.Q4_1, T.Q5_1) else 0.0
        qs_off = {T.Q4_0: 2, T.Q4_1: 4, T.Q5_0: 6, T.Q5_1: 8, T.IQ4_NL: 2}[t]
        qh_off = {T.Q5_0: 2, T.Q5_1: 4}.get(t)
        out = []
        for e in range(32):
            q = block[qs_off + e] & 0xF if e < 16 else block[qs_off + e - 16] >> 4
            if qh_off is not None:
                qh = int.from_bytes(block[qh_off : qh_off + 4], "little")
                q |= ((qh >> e) & 1) << 4
            if t == T.Q4_0:
                out.append(d * (q - 8))
            elif t == T.Q5_0:
                out.append(d * (q - 16))
            elif t == T.IQ4_NL:
                out.append(d * IQ4_KV[q])
            else:
                out.append(d * q + m)
        return out
    if t == T.Q8_0:
        return [half(0) * v for v in np.frombuffer(block[2:34], dtype=np.int8).tolist()]
    if t == T.MXFP4:
        kv = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]  # e2m1, doubled
        q = [block[1 + e] & 0xF if e < 16 else block[1 + e - 16] >> 4 for e in range(32)]
        return [2.0 ** (block[0] - 128) * kv[v] for v in q]
    out = []
    for e in range(256):
        h, j, l = e // 128, (e % 128) // 32, e % 32
        if t == T.Q2_K:
            sc = block[e // 16]
            q = (block[16 + 32 * h + l] >> (2 * j)) & 3
            out.append(half(80) * (sc & 0xF) * q - half(82) * (sc >> 4))
        elif t == T.Q3_K:
            q2 = (block[32 + 32 * h + l] >> (2 * j)) & 3
            hb = (block[l] >> (4 * h + j)) & 1
            s = e // 16
            lo = (block[96 + s % 8] >> (4 * (s // 8))) & 0xF
            hi = (block[96 + 8 + s % 4] >> (2 * (s // 4))) & 3
            out.append(half(108) * ((lo | hi << 4) - 32) * (q2 - (0 if hb else 4)))
        elif t in (T.Q4_K, T.Q5_K):
            qs_off = 16 if t == T.Q4_K else 48
            c, sub = e // 64, e // 32
            byte = block[qs_off + 32 * c + e % 32]
            q = byte & 0xF if e % 64 < 32 else byte >> 4
            if t == T.Q5_K and (block[16 + e % 32] >> sub) & 1:
                q += 16
            sc, m = _k_scale_min(block[4:16], sub)
            out.append(half(0) * sc * q - half(2) * m)
        elif t == T.Q6_K:
            lo = (block[64 * h + 32 * (j % 2) + l] >> (4 * (j // 2))) & 0xF
            hi = (block[128 + 32 * h + l] >> (2 * j)) & 3
            sc = np.frombuffer(block[192:208], dtype=np.int8)[e // 16]
            out.append(half(208) * int(sc) * ((lo | hi << 4) - 32))
        elif t == T.IQ4_XS:
            ib = e // 32
            scales_h = int.from_bytes(block[2:4], "little")
            ls_lo = (block[4 + ib // 2] >> (4 * (ib % 2))) & 0xF
            ls = ls_lo | (((scales_h >> (2 * ib)) & 3) << 4)
            byte = block[8 + 16 * ib + (e % 32) % 16]
            q = byte & 0xF if e % 32 < 16 else byte >> 4
            out.append(half(0) * (ls - 32) * IQ4_KV[q])
        else:
            out.append(_hand_lowbit(block, t, e, half))
    return out


def _hand_lowbit(block: bytes, t: GGMLType, e: int, half) -> float:
    """Element e of an IQ / ternary / MXFP4 block, from llama.cpp's dequantize_row_* formulas."""
    T = GGMLType
    u16 = lambda off: int.from_bytes(block[off : off + 2], "little")  # noqa: E731
    u32 = lambda off: int.from_bytes(block[off : off + 4], "little")  # noqa: E731
    sign = lambda byte, bit: -1.0 if (byte >> bit) & 1 else 1.0  # noqa: E731
    nib = lambda off, i: (block[off + i // 2] >> (4 * (i % 2))) & 0xF  # noqa: E731
    if t in (T.IQ2_XXS, T.IQ3_XXS):
        ib = e // 32
        w = u32(2 + 8 * ib + 4) if t == T.IQ2_XXS else u32(66 + 4 * ib)
        s = KSIGNS[(w >> (7 * ((e % 32) // 8))) & 127]
        if t == T.IQ2_XXS:
            g = iq_tables.grid_np(t)[block[2 + 8 * ib + (e % 32) // 8]][e % 8]
            return half(0) * (0.5 + (w >> 28)) * 0.25 * int(g) * sign(s, e % 8)
        g = iq_tables.grid_np(t)[block[2 + e // 4]][e % 4]
        return half(0) * (0.5 + (w >> 28)) * 0.5 * int(g) * sign(s, e % 8)
    if t in (T.IQ2_XS, T.IQ2_S):
        i = e // 8
        if t == T.IQ2_XS:
            q = u16(2 + 2 * i)
            idx, s, sc = q & 511, KSIGNS[q >> 9], nib(66, e // 16)
        else:
            idx = block[2 + i] | (((block[66 + i // 4] >> (2 * (i % 4))) & 3) << 8)
            s, sc = block[34 + i], nib(74, e // 16)
        g = iq_tables.grid_np(t)[idx][e % 8]
        return half(0) * (0.5 + sc) * 0.25 * int(g) * sign(s, e % 8)
    if t == T.IQ3_S:
        i = e // 4
        idx = block[2 + i] | (((block[66 + i // 8] >> (i % 8)) & 1) << 8)
        g = iq_tables.grid_np(t)[idx][e % 4]
        return half(0) * (1 + 2 * nib(106, e // 32)) * int(g) * sign(block[74 + e // 8], e % 8)
    if t == T.IQ1_S:
        i, qh = e // 8, u16(34 + 2 * (e // 32))
        idx = block[2 + i] | (((qh >> (3 * (i % 4))) & 7) << 8)
        delta = -0.125 if qh & 0x8000 else 0.125
        g = iq_tables.grid_np(t)[idx][e % 8]
        return half(0) * (2 * ((qh >> 12) & 7) + 1) * (int(g) + delta)
    if t == T.IQ1_M:
        sc = [u16(48 + 2 * k) for k in range(4)]
        d_bits = sum(((sc[k] >> 12) & 0xF) << (4 * k) for k in range(4))
        d = float(np.array([d_bits], dtype=np.uint16).view(np.float16)[0])
        i, n = e // 8, nib(32, e // 8)
        idx = block[i] | ((n & 7) << 8)
        delta = -0.125 if n & 8 else 0.125
        s = (sc[(e // 16) // 4] >> (3 * ((e // 16) % 4))) & 7
        g = iq_tables.grid_np(t)[idx][e % 8]
        return d * (2 * s + 1) * (int(g) + delta)
    if t == T.TQ1_0:
        if e < 160:
            byte, k = block[e % 32], e // 32
        elif e < 240:
            byte, k = block[32 + (e - 160) % 16], (e - 160) // 16
        else:
            byte, k = block[48 + (e - 240) % 4], (e - 240) // 4
        q = (byte * 3**k) % 256  # digit k of the byte's base-3 fraction, in the top bits
        return half(52) * (((q * 3) >> 8) - 1)
    if t == T.TQ2_0:
        q = (block[32 * (e // 128) + e % 32] >> (2 * ((e % 128) // 32))) & 3
        return half(64) * (q - 1)
    raise AssertionError(t)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_hand_built_blocks(qtype):
    # quant bytes random, scales powers of two so float64 formulas are exact in float32
    rng = np.random.default_rng(int(qtype))
    _, block_bytes = QUANT_SIZES[qtype]
    blocks = []
    for scale in (0.5, 0.25, 2.0):
        b = bytearray(rng.integers(0, 256, block_bytes, dtype=np.uint8).tobytes())
        for k, off in enumerate(F16_FIELDS[qtype]):
            b[off : off + 2] = f16(scale / (k + 1) if k == 0 else scale / 8)
        if qtype == GGMLType.IQ1_M:
            arr = np.frombuffer(bytes(b), dtype=np.uint8).reshape(1, -1).copy()
            set_iq1_m_d(arr, np.array([scale]))
            b = bytearray(arr.tobytes())
        if qtype == GGMLType.MXFP4:
            b[0] = 128 + int(np.log2(scale))  # scale 2^(e - 128)
        blocks.append(bytes(b))
    raw = torch.tensor(list(b"".join(blocks)), dtype=torch.uint8)
    out = dequantize_ref(raw, qtype)
    expected = [x for b in blocks for x in hand_dequant(b, qtype)]
    assert out.tolist() == expected


def test_float_types_hand_built():
    vals = np.array([1.5, -2.0, 0.0, 65504.0], dtype=np.float32)
    f32 = torch.from_numpy(vals.view(np.uint8).copy())
    assert dequantize_ref(f32, GGMLType.F32).tolist() == vals.tolist()
    f16raw = torch.from_numpy(vals.astype(np.float16).view(np.uint8).copy())
    assert dequantize_ref(f16raw, GGMLType.F16).tolist() == vals.tolist()
    # bf16 of 1.5 is 0x3FC0, of -2.0 is 0xC000
    bf = torch.tensor([0xC0, 0x3F, 0x00, 0xC0], dtype=torch.uint8)
    assert dequantize_ref(bf, GGMLType.BF16).tolist() == [1.5, -2.0]


# ------------------------------------------------------------------- random blocks vs gguf-py


def random_rows(qtype: GGMLType, seed: int, n_rows: int, n_blocks: int) -> np.ndarray:
    """Random bytes; f16 scale fields replaced by finite values (incl. subnormals and zeros)."""
    rng = np.random.default_rng(seed)
    _, block_bytes = QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_rows, n_blocks * block_bytes), dtype=np.uint8)
    blocks = raw.reshape(-1, block_bytes)
    for off in F16_FIELDS.get(qtype, []):
        exps = rng.choice([-24.0, -14.0, -8.0, -4.0, 0.0, 4.0, 15.0], size=len(blocks))
        vals = (rng.uniform(-1.0, 1.0, len(blocks)) * 2.0**exps).astype(np.float16)
        vals[rng.random(len(blocks)) < 0.05] = 0.0
        assert np.isfinite(vals).all()
        blocks[:, off : off + 2] = vals.view(np.uint8).reshape(-1, 2)
    if qtype == GGMLType.IQ1_M:
        set_iq1_m_d(blocks, rng.uniform(-1.0, 1.0, len(blocks)) * 2.0 ** rng.integers(-14, 15))
    return raw


@pytest.mark.parametrize("qtype", BLOCK_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_many_random_blocks_bit_equal_gguf(qtype):
    # float types keep their NaNs / Infs: gguf keeps NaN payloads and so must we
    n_blocks = 512 if QUANT_SIZES[qtype][0] > 1 else 8192
    raw = random_rows(qtype, seed=1000 + int(qtype), n_rows=4, n_blocks=n_blocks)
    assert_bit_equal(dequantize_ref(torch.from_numpy(raw), qtype), gguf_dequant(raw, qtype))


@settings(max_examples=60, deadline=None)
@given(
    qtype=st.sampled_from(BLOCK_TYPES + FLOAT_TYPES),
    seed=st.integers(0, 2**32 - 1),
    n_rows=st.integers(1, 3),
    n_blocks=st.integers(1, 4),
)
def test_random_blocks_bit_equal_gguf(qtype, seed, n_rows, n_blocks):
    raw = random_rows(qtype, seed, n_rows, n_blocks)
    assert_bit_equal(dequantize_ref(torch.from_numpy(raw), qtype), gguf_dequant(raw, qtype))


def test_leading_dims_and_noncontiguous_rows():
    qtype = GGMLType.Q4_K
    raw = random_rows(qtype, seed=7, n_rows=6, n_blocks=2)
    ref = gguf_dequant(raw, qtype)
    t = torch.from_numpy(raw)
    assert_bit_equal(dequantize_ref(t.view(2, 3, -1), qtype), ref.reshape(2, 3, -1))
    assert_bit_equal(dequantize_ref(t[::2], qtype), ref[::2])


@pytest.mark.parametrize("qtype", BLOCK_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_unaligned_storage_offset(qtype):
    # rows sliced out of a file mapping need not start on an aligned address
    raw = random_rows(qtype, seed=11, n_rows=2, n_blocks=2 if QUANT_SIZES[qtype][0] > 1 else 64)
    shifted = torch.zeros(raw.size + 3, dtype=torch.uint8)
    shifted[3:] = torch.from_numpy(raw).flatten()
    view = shifted[3:].view(raw.shape)
    assert view.storage_offset() == 3
    assert_bit_equal(dequantize_ref(view, qtype), gguf_dequant(raw, qtype))


def test_row_bytes():
    assert row_bytes(GGMLType.Q4_K, 2048) == 8 * 144
    assert row_bytes(GGMLType.Q5_0, 640) == 20 * 22
    assert row_bytes(GGMLType.F32, 640) == 2560
    with pytest.raises(ValueError, match="not a multiple"):
        row_bytes(GGMLType.Q4_K, 640)


def test_bad_input_rejected():
    with pytest.raises(ValueError, match="uint8"):
        dequantize_ref(torch.zeros(18, dtype=torch.int8), GGMLType.Q4_0)
    with pytest.raises(ValueError, match="multiple of the block size"):
        dequantize_ref(torch.zeros(20, dtype=torch.uint8), GGMLType.Q4_0)
    with pytest.raises(NotImplementedError, match="NVFP4"):
        dequantize_ref(torch.zeros(36, dtype=torch.uint8), GGMLType.NVFP4)


@pytest.mark.parametrize("qtype", [GGMLType.TQ1_0, GGMLType.TQ2_0, GGMLType.MXFP4],
                         ids=lambda t: t.name)  # fmt: skip
def test_gguf_quantized_blocks_bit_equal(qtype):
    # the types gguf-py can quantize: real-looking blocks (with zeros, -1/0/+1, exact scales)
    rng = np.random.default_rng(int(qtype))
    x = rng.standard_normal((8, 512)).astype(np.float32)
    x[0] = 0.0  # an all-zero row: scale 0
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType(int(qtype)))
    ours = dequantize_ref(torch.from_numpy(np.ascontiguousarray(raw)), qtype)
    assert_bit_equal(ours, gguf_dequant(raw, qtype))
    assert (ours[0] == 0).all() and torch.isfinite(ours).all()


# ------------------------------------------------------------------- the real model


def test_real_model_every_tensor_sampled_rows(real_model_path):
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    with GGUFFile(real_model_path) as g:
        types = set()
        for info in g.tensors.values():
            n_rows, _ = info.rows_cols
            raw = g.tensor_bytes(info.name).reshape(n_rows, info.row_bytes)
            rows = np.unique(np.concatenate([[0, n_rows - 1], rng.integers(0, n_rows, 16)]))
            sample = np.ascontiguousarray(raw[rows])
            ours = dequantize_ref(torch.from_numpy(sample), info.ggml_type)
            assert_bit_equal(ours, gguf_dequant(sample, info.ggml_type))
            assert torch.isfinite(ours).all(), info.name
            types.add(info.ggml_type)
    assert types == {GGMLType.F32, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.Q6_K}
    assert time.perf_counter() - t0 < 20
