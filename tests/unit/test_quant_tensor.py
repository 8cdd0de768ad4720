"""QuantTensor: zero-copy loading from GGUF, dequantization, copies, memory on the real model."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from llcuda.gguf.constants import GGMLType
from llcuda.gguf.reader import GGUFFile
from llcuda.layers.quant_tensor import QuantTensor, read_float_tensor


@pytest.fixture()
def small_gguf(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    weight = rng.standard_normal((6, 64)).astype(np.float32)
    q = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)  # uint8 [6, 68]
    norm = rng.standard_normal(64).astype(np.float32)
    half = rng.standard_normal((2, 32)).astype(np.float16)
    w.add_tensor("w.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("norm.weight", norm)
    w.add_tensor("h.weight", half)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "m.gguf", {"q": q, "norm": norm, "half": half}


def test_from_gguf_is_zero_copy_and_silent(small_gguf):
    path, arrays = small_gguf
    with GGUFFile(path) as g:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            qt = QuantTensor.from_gguf(g, "w.weight")
        assert qt.shape == (6, 64) and qt.qtype == GGMLType.Q8_0
        assert qt.data.dtype == torch.uint8 and tuple(qt.data.shape) == (6, 68)
        assert qt.data.data_ptr() == g.tensor_bytes("w.weight").ctypes.data
        assert qt.nbytes == 6 * 68 and qt.device == torch.device("cpu")
        assert "Q8_0" in repr(qt)


def test_dequantize_matches_gguf(small_gguf):
    path, arrays = small_gguf
    with GGUFFile(path) as g:
        qt = QuantTensor.from_gguf(g, "w.weight")
        ref = gguf.quants.dequantize(arrays["q"], gguf.GGMLQuantizationType.Q8_0)
        full = qt.dequantize()
        assert full.dtype == torch.float32 and tuple(full.shape) == (6, 64)
        assert np.array_equal(full.numpy(), ref)
        assert np.array_equal(qt.dequantize(slice(2, 5)).numpy(), ref[2:5])


def test_to_copies_bytes(small_gguf):
    path, _ = small_gguf
    with GGUFFile(path) as g:
        qt = QuantTensor.from_gguf(g, "w.weight")
        moved = qt.to("cpu")
        assert moved is not qt and moved.data.data_ptr() != qt.data.data_ptr()
        assert torch.equal(moved.data, qt.data) and moved.shape == qt.shape
        moved.data.zero_()  # an owned copy: writable, and the mapping is untouched
        assert not torch.equal(moved.data, qt.data)


def test_read_float_tensor(small_gguf):
    path, arrays = small_gguf
    with GGUFFile(path) as g:
        norm = read_float_tensor(g, "norm.weight")
        assert norm.dtype == torch.float32 and tuple(norm.shape) == (64,)
        assert np.array_equal(norm.numpy(), arrays["norm"])
        norm.add_(1.0)  # owned memory
        half = read_float_tensor(g, "h.weight")
        assert tuple(half.shape) == (2, 32)
        assert np.array_equal(half.numpy(), arrays["half"].astype(np.float32))
        with pytest.raises(KeyError, match="missing.weight"):
            read_float_tensor(g, "missing.weight")
        with pytest.raises(KeyError, match="missing.weight"):
            QuantTensor.from_gguf(g, "missing.weight")


def test_bad_construction():
    with pytest.raises(ValueError, match="uint8"):
        QuantTensor(torch.zeros(2, 34, dtype=torch.int8), GGMLType.Q8_0, (2, 32))
    with pytest.raises(ValueError, match=r"needs data \(2, 34\)"):
        QuantTensor(torch.zeros(2, 36, dtype=torch.uint8), GGMLType.Q8_0, (2, 32))
    with pytest.raises(ValueError, match="not a multiple"):
        QuantTensor(torch.zeros(2, 144, dtype=torch.uint8), GGMLType.Q4_K, (2, 250))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_real_model_weights_stay_in_the_mapping(real_model_path):
    size = real_model_path.stat().st_size
    before = _rss_bytes()
    g = GGUFFile(real_model_path)
    weights, norms = {}, {}
    for name, info in g.tensors.items():
        if len(info.shape) == 1:
            norms[name] = read_float_tensor(g, name)
        else:
            weights[name] = QuantTensor.from_gguf(g, name)
    touched = 0
    for qt in weights.values():
        touched += int(qt.data.flatten()[::4096].sum(dtype=torch.int64))  # one byte per page
    assert touched > 0
    grown = _rss_bytes() - before
    print(f"RSS grew by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB file")
    assert grown < 1.5 * size, f"RSS grew by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
    assert len(weights) == 236 - 109 and len(norms) == 109
    emb = weights["token_embd.weight"]
    assert emb.shape == (262144, 640) and emb.qtype == GGMLType.Q8_0
    assert weights["blk.0.ffn_down.weight"].shape == (640, 2048)
    assert weights["blk.0.attn_q.weight"].shape == (1024, 640)
    assert norms["blk.0.attn_q_norm.weight"].shape == (256,)
