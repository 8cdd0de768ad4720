"""quant_matmul_cpu / dequantize_cpu against the specification, dequantize_ref.

The fast decoders must give dequantize_ref's float32 bits exactly; the matmul may differ from
`x @ dequantize_ref(W).T` only by summation order, and not at all for one-hot rows of x.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from llcuda.gguf.constants import QUANT_SIZES, GGMLType
from llcuda.kernels.dequant_ref import dequantize_ref
from llcuda.kernels.quant_matmul_cpu import FAST_TYPES, dequantize_cpu, quant_matmul_cpu
from llcuda.kernels.reference import quant_matmul_ref
from llcuda.layers.quant_tensor import QuantTensor
from tests.unit.test_dequant_ref import f16, random_rows

FAST = sorted(FAST_TYPES)


def weight(qtype: GGMLType, rows: int, n_blocks: int, seed: int = 0) -> QuantTensor:
    raw = torch.from_numpy(random_rows(qtype, seed, rows, n_blocks))
    block_elems = QUANT_SIZES[qtype][0]
    if qtype == GGMLType.MXFP4:  # e8m0 exponents 2^-28..2^12: finite sums (e up to 255 overflow)
        e = torch.randint(100, 141, (rows, n_blocks), generator=torch.Generator().manual_seed(seed))
        raw.view(rows, n_blocks, -1)[..., 0] = e.to(torch.uint8)
    return QuantTensor(raw, qtype, (rows, n_blocks * block_elems))


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    diff = (a.view(torch.int32) != b.view(torch.int32)).nonzero()
    assert len(diff) == 0, f"{len(diff)} elements differ, first at {diff[0].tolist()}"


def assert_matmul_close(got: torch.Tensor, x: torch.Tensor, w: QuantTensor) -> None:
    """Within fp32 rounding of the exact x @ W.T: 1e-6 of the sum of |products| (the scales of
    random blocks span 2^-24..2^15, so a fixed tolerance would not do)."""
    w64 = dequantize_ref(w.data, w.qtype).double()
    expected = x.double() @ w64.T
    bound = (x.double().abs() @ w64.abs().T) * 1e-6
    assert ((got.double() - expected).abs() <= bound).all()


def test_fast_types_cover_the_real_model_mix():
    assert {GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K} <= FAST_TYPES


def test_q4_0_literal_block():
    # d = 0.5; byte i holds element i (low nibble = i) and element 16 + i (high nibble = 15 - i)
    block = f16(0.5) + bytes(i | ((15 - i) << 4) for i in range(16))
    out = dequantize_cpu(torch.tensor(list(block), dtype=torch.uint8).view(1, 18), GGMLType.Q4_0)
    assert out[0].tolist() == [0.5 * (i - 8) for i in range(16)] + [
        0.5 * (7 - i) for i in range(16)
    ]


# ------------------------------------------------------------------------------ literal blocks


def test_q8_0_literal_block():
    qs = np.array([-128, -1, 0, 1, 127] + [2] * 27, dtype=np.int8)
    raw = torch.tensor(list(f16(0.25) + qs.tobytes()), dtype=torch.uint8).view(1, 34)
    assert dequantize_cpu(raw, GGMLType.Q8_0)[0, :6].tolist() == [
        -32.0,
        -0.25,
        0.0,
        0.25,
        31.75,
        0.5,
    ]


def test_q5_0_literal_block():
    # byte i: low nibble i (element i), high nibble 15 - i (element 16 + i); 5th bits set on
    # elements 0, 9 and 31 only -> q = nibble + 16 * bit, value 0.5 * (q - 16)
    qh = (1 << 0) | (1 << 9) | (1 << 31)
    block = f16(0.5) + qh.to_bytes(4, "little") + bytes(i | ((15 - i) << 4) for i in range(16))
    out = dequantize_cpu(torch.tensor(list(block), dtype=torch.uint8).view(1, 22), GGMLType.Q5_0)
    q = [i for i in range(16)] + [15 - i for i in range(16)]
    for e in (0, 9, 31):
        q[e] += 16
    assert out[0].tolist() == [0.5 * (v - 16) for v in q]


def test_q4_k_literal_block():
    # d = 1, dmin = 0.5; scale j = j + 1 and min j = 2j (all < 16, so only the simple 6-bit
    # layout is used: bytes 0-3 scales 0-3, bytes 4-7 mins 0-3, bytes 8-11 hold both for 4-7)
    sc, mn = [j + 1 for j in range(8)], [2 * j for j in range(8)]
    scales = bytes(sc[:4]) + bytes(mn[:4]) + bytes(sc[4 + k] | (mn[4 + k] << 4) for k in range(4))
    qs = bytes((c + k) % 16 | ((15 - k) % 16) << 4 for c in range(4) for k in range(32))
    block = f16(1.0) + f16(0.5) + scales + qs
    out = dequantize_cpu(torch.tensor(list(block), dtype=torch.uint8).view(1, 144), GGMLType.Q4_K)
    expected = []
    for c in range(4):
        for p in range(2):  # low nibbles: sub-block 2c, high nibbles: 2c + 1
            s = 2 * c + p
            expected += [
                sc[s] * (((c + k) % 16) if p == 0 else (15 - k) % 16) - 0.5 * mn[s]
                for k in range(32)
            ]
    assert out[0].tolist() == expected


def test_q6_k_literal_block():
    # ql byte i = i % 16 | (i // 8 % 16) << 4, qh byte i = i, scales 1..16 (int8), d = 0.5
    ql = bytes((i % 16) | ((i // 8) % 16) << 4 for i in range(128))
    qh = bytes(range(64))
    scales = np.arange(1, 17, dtype=np.int8).tobytes()
    block = ql + qh + scales + f16(0.5)
    out = dequantize_cpu(torch.tensor(list(block), dtype=torch.uint8).view(1, 210), GGMLType.Q6_K)
    expected = []
    for e in range(256):
        h, g, l = e // 128, (e % 128) // 32, e % 32
        lo = (ql[64 * h + 32 * (g % 2) + l] >> (4 * (g // 2))) & 0xF
        hi = (qh[32 * h + l] >> (2 * g)) & 3
        expected.append(0.5 * (e // 16 + 1) * ((lo | hi << 4) - 32))
    assert out[0].tolist() == expected


# ---------------------------------------------------------------- random blocks, bit for bit


@pytest.mark.parametrize("qtype", FAST, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,n_blocks", [(1, 1), (3, 5), (7, 2), (64, 3)])
def test_dequantize_cpu_bit_equal_to_ref(qtype, rows, n_blocks):
    w = weight(qtype, rows, n_blocks, seed=rows * 100 + n_blocks)
    assert_bits_equal(dequantize_cpu(w.data, qtype), dequantize_ref(w.data, qtype))


@pytest.mark.parametrize("qtype", FAST, ids=lambda t: t.name)
def test_dequantize_cpu_unaligned_rows(qtype):
    # rows starting at an odd byte offset of their storage (the decoders read int16 / int32 views)
    w = weight(qtype, 4, 3, seed=5)
    buf = torch.zeros(w.data.numel() + 1, dtype=torch.uint8)
    buf[1:] = w.data.reshape(-1)
    shifted = buf[1:].view(w.data.shape)
    assert shifted.storage_offset() == 1
    assert_bits_equal(dequantize_cpu(shifted, qtype), dequantize_ref(w.data, qtype))


def test_dequantize_cpu_real_model_tensors(real_model_path):
    from llcuda.gguf.reader import GGUFFile

    g = GGUFFile(real_model_path)
    try:
        seen = set()
        for name, info in g.tensors.items():
            if info.ggml_type in FAST_TYPES and info.ggml_type not in seen:
                seen.add(info.ggml_type)
                w = QuantTensor.from_gguf(g, name)
                rows = w.data[:300]
                assert_bits_equal(dequantize_cpu(rows, w.qtype), dequantize_ref(rows, w.qtype))
        assert seen == {GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K}
    finally:
        g.close()


# ------------------------------------------------------------------------------------- matmul


@pytest.mark.parametrize("qtype", [*FAST, GGMLType.Q4_1], ids=lambda t: t.name)
def test_one_hot_rows_give_the_exact_columns(qtype):
    # x = identity: every output is a single product 1 * w plus exact zeros, so no rounding
    # (values compared, not bits: a -0.0 weight comes out as +0.0 once zeros are added)
    w = weight(qtype, 5, 2, seed=3)
    x = torch.eye(w.shape[1])
    assert torch.equal(quant_matmul_cpu(x, w), dequantize_ref(w.data, qtype).T)


@pytest.mark.parametrize("qtype", [*FAST, GGMLType.Q4_1, GGMLType.Q5_K], ids=lambda t: t.name)
@pytest.mark.parametrize("num_tokens", [1, 3, 17])
@pytest.mark.parametrize("tile_elems", [1, 700, 1 << 20])
def test_matmul_matches_dequantized_reference(qtype, num_tokens, tile_elems):
    # 37 rows: with tile_elems 1 every tile is one row, with 700 the last tile is partial
    w = weight(qtype, 37, 3, seed=num_tokens)
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, w.shape[1], generator=gen)
    got = quant_matmul_cpu(x, w, tile_elems)
    assert got.dtype == torch.float32 and got.shape == (num_tokens, 37)
    assert_matmul_close(got, x, w)


def test_matmul_real_model_shape_lm_head_like():
    # many tiles of a wide Q8_0 weight and a bf16 input (promoted to fp32)
    w = weight(GGMLType.Q8_0, 1000, 20, seed=9)
    x = torch.randn(2, 640).to(torch.bfloat16)
    assert_matmul_close(quant_matmul_cpu(x, w, 64 * 640), x.float(), w)


def test_quant_matmul_ref_uses_the_fast_path_on_cpu():
    w = weight(GGMLType.Q5_0, 9, 2, seed=2)
    x = torch.randn(4, 64)
    assert torch.equal(quant_matmul_ref(x, w), quant_matmul_cpu(x, w))


def test_bad_arguments():
    w = weight(GGMLType.Q8_0, 2, 1)
    with pytest.raises(ValueError, match="num_tokens, 32"):
        quant_matmul_cpu(torch.randn(1, 31), w)
    with pytest.raises(ValueError, match="num_tokens, 32"):
        quant_matmul_cpu(torch.randn(32), w)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_cpu(w.data.to(torch.int16), GGMLType.Q8_0)
    with pytest.raises(ValueError, match="multiple of the block size"):
        dequantize_cpu(w.data[:, :33], GGMLType.Q8_0)


def test_scratch_made_under_inference_mode_is_reused_outside_it():
    # scratch buffers live per thread: a fresh thread makes them under inference_mode first
    w = weight(GGMLType.Q6_K, 8, 2, seed=4)
    x = torch.randn(2, 512)
    results = []

    def run() -> None:
        with torch.inference_mode():
            results.append(quant_matmul_cpu(x, w).clone())
        results.append(quant_matmul_cpu(x, w))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(results) == 2 and torch.equal(results[0], results[1])


def test_decoders_run_on_one_thread_and_restore_the_count():
    from llcuda.kernels.quant_matmul_cpu import _one_intra_op_thread

    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="boom"), _one_intra_op_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
        quant_matmul_cpu(torch.randn(1, 64), weight(GGMLType.Q5_0, 300, 2))
        quant_matmul_cpu(torch.randn(9, 64), weight(GGMLType.Q5_0, 300, 2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)
