"""iq_tables: the IQ grids and signs against entries of llama.cpp's ggml-common.h, and gguf-py."""

from __future__ import annotations

import gguf.quants as gq
import numpy as np
import pytest
import torch

from llcuda.gguf.constants import GGMLType
from llcuda.kernels import iq_tables


def entry(value: int, n: int) -> list[int]:
    """A grid entry written as llama.cpp's hex constant -> its bytes in memory order (LE)."""
    return [(value >> (8 * j)) & 0xFF for j in range(n)]


# (type, shape, {index: llama.cpp's constant}): leading entries of each grid, and IQ2_XXS's last
KNOWN = [
    (GGMLType.IQ2_XXS, (256, 8), {0: 0x0808080808080808, 1: 0x080808080808082B,
                                  2: 0x0808080808081919, 3: 0x0808080808082B08,
                                  5: 0x0808080808190819, 255: 0x2B2B2B1908081908}),
    (GGMLType.IQ2_XS, (512, 8), {0: 0x0808080808080808, 1: 0x080808080808082B}),
    (GGMLType.IQ2_S, (1024, 8), {0: 0x0808080808080808, 1: 0x080808080808082B}),
    (GGMLType.IQ3_XXS, (256, 4), {0: 0x04040404, 1: 0x04040414}),
    (GGMLType.IQ3_S, (512, 4), {0: 0x01010101, 1: 0x01010103}),
]  # fmt: skip


@pytest.mark.parametrize("qtype,shape,entries", KNOWN, ids=lambda v: getattr(v, "name", ""))
def test_grid_entries_match_llama_cpp(qtype, shape, entries):
    g = iq_tables.grid_np(qtype)
    assert g.shape == shape and g.dtype == np.int8
    for i, value in entries.items():
        assert g[i].tolist() == entry(value, shape[1]), (qtype.name, i)


def test_iq1_grids():
    # iq1s_grid holds int8 -1/0/+1: 0xffffffffffffffff, 0xffffffffffffff01, ..., 0x0101010101010101
    g = iq_tables.grid_np(GGMLType.IQ1_S)
    assert g.shape == (2048, 8)
    assert g[0].tolist() == [-1] * 8 and g[1].tolist() == [1] + [-1] * 7
    assert set(np.unique(g).tolist()) == {-1, 0, 1}
    assert np.array_equal(iq_tables.grid_np(GGMLType.IQ1_M), g)


@pytest.mark.parametrize("qtype", [t for t, _, _ in KNOWN] + [GGMLType.IQ1_S])
def test_grids_equal_gguf_py(qtype):
    cls = {
        GGMLType.IQ2_XXS: gq.IQ2_XXS,
        GGMLType.IQ2_XS: gq.IQ2_XS,
        GGMLType.IQ2_S: gq.IQ2_S,
        GGMLType.IQ3_XXS: gq.IQ3_XXS,
        GGMLType.IQ3_S: gq.IQ3_S,
        GGMLType.IQ1_S: gq.IQ1_S,
    }[qtype]
    cls.init_grid()
    assert np.array_equal(iq_tables.grid_np(qtype).astype(np.float32), cls.grid[0, 0])


def test_ksigns():
    ks = iq_tables.ksigns_np()
    assert ks.tobytes() == gq.IQ2_XXS.ksigns
    assert ks[:8].tolist() == [0x00, 0x81, 0x82, 0x03, 0x84, 0x05, 0x06, 0x87]
    # every entry has an even number of set bits (an even count of minus signs)
    assert all(bin(int(v)).count("1") % 2 == 0 for v in ks)


def test_torch_tables_cached_per_device():
    t = iq_tables.grid(GGMLType.IQ2_XS)
    assert t.dtype == torch.int8 and t.shape == (512, 8)
    assert iq_tables.grid(GGMLType.IQ2_XS, "cpu") is t
    assert iq_tables.ksigns().tolist() == iq_tables.ksigns_np().tolist()
    with pytest.raises(ValueError, match="read-only"):
        iq_tables.grid_np(GGMLType.IQ2_XS)[0, 0] = 1
