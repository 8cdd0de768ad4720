"""The code books of the IQ quant types: one place for every grid and sign table.

Source: llama.cpp's `ggml-common.h` (`iq2xxs_grid`, `iq2xs_grid`, `iq2s_grid`, `iq3xxs_grid`,
`iq3s_grid`, `iq1s_grid`, `ksigns_iq2xs`), as gguf-py restates them in `gguf/quants.py`: each grid
is a hex string of 2- or 3-bit codes (`grid_hex`) plus the byte value of each code (`grid_map`).
gguf is a runtime dependency, so the tables are read from gguf-py's classes rather than copied;
the decoding below is gguf-py's `init_grid` restated, and tests/unit/test_iq_tables.py checks
known entries of llama.cpp's tables against it independently.

`grid(qtype)` is int8 [n_entries, values_per_entry]: entry i of llama.cpp's grid, its bytes in
memory order (byte j of the little-endian uint32/uint64 is value j). `ksigns()` is uint8 [128]:
7 sign bits plus an 8th that makes the count of minus signs even (`i | parity(i) << 7`), which is
how the IQ2/IQ3 types store 8 signs in 7 bits. `IQ4_KVALUES` is the 16-entry code book of
IQ4_NL and IQ4_XS (`kvalues_iq4nl`), `MXFP4_KVALUES` MXFP4's (`kvalues_mxfp4`).
"""

from __future__ import annotations

from functools import cache

import gguf.quants as gq
import numpy as np
import torch

from llcuda.gguf.constants import GGMLType

# IQ4_NL / IQ4_XS non-linear code book (llama.cpp kvalues_iq4nl)
IQ4_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# MXFP4's E2M1 values, doubled (llama.cpp kvalues_mxfp4; its scale is 2^(e - 128), half of e8m0)
MXFP4_KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)

# The gguf-py class holding each type's grid (IQ1_M shares IQ1_S's, IQ2_XXS's ksigns serve all).
_GRID_CLASSES = {
    GGMLType.IQ2_XXS: gq.IQ2_XXS,
    GGMLType.IQ2_XS: gq.IQ2_XS,
    GGMLType.IQ2_S: gq.IQ2_S,
    GGMLType.IQ3_XXS: gq.IQ3_XXS,
    GGMLType.IQ3_S: gq.IQ3_S,
    GGMLType.IQ1_S: gq.IQ1_S,
    GGMLType.IQ1_M: gq.IQ1_S,
}
GRID_TYPES = frozenset(_GRID_CLASSES)  # the types with a grid (grid() takes these)


@cache
def _grid_np(qtype: GGMLType) -> np.ndarray:
    cls = _GRID_CLASSES[GGMLType(qtype)]
    n_codes = len(cls.grid_map)
    bits = max(1, (n_codes - 1).bit_length())  # 3 codes -> 2 bits, 8 codes -> 3 bits
    per_byte = 8 // bits  # codes per hex byte (2-bit: 4; 3-bit codes are stored 2 per byte)
    hexchars = np.frombuffer(cls.grid_hex, dtype=np.uint8).reshape(-1, 2)
    nib = np.where(hexchars > 0x40, hexchars + 9, hexchars) & 0x0F  # '0'-'9', 'a'-'f' -> 0..15
    byte = (nib[:, 0] << 4) | nib[:, 1]
    shifts = np.arange(0, 8, 8 // per_byte, dtype=np.uint8)
    codes = (byte[:, None] >> shifts[None, :]) & ((1 << bits) - 1)
    values = np.array(cls.grid_map, dtype=np.int16)[codes.reshape(-1)]
    out = values.astype(np.int8).reshape(cls.grid_shape)
    assert np.array_equal(out.astype(np.int16).reshape(-1), values), "grid value out of int8"
    return out


def grid_np(qtype: GGMLType) -> np.ndarray:
    """int8 [n_entries, values_per_entry]: the grid of an IQ1/IQ2/IQ3 type (read-only)."""
    g = _grid_np(GGMLType(qtype))
    g.setflags(write=False)
    return g


def ksigns_np() -> np.ndarray:
    """uint8 [128]: ksigns_iq2xs, generated (i | parity(i) << 7)."""
    i = np.arange(128, dtype=np.uint8)
    parity = np.unpackbits(i[:, None], axis=1).sum(axis=1) & 1
    return (i | (parity.astype(np.uint8) << 7)).astype(np.uint8)


@cache
def _grid_t(qtype: GGMLType, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(grid_np(qtype).copy()).to(device)


@cache
def _ksigns_t(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(ksigns_np()).to(device)


def grid(qtype: GGMLType, device: torch.device | str = "cpu") -> torch.Tensor:
    """int8 [n_entries, values_per_entry] on `device` (cached per device; do not modify)."""
    return _grid_t(GGMLType(qtype), torch.device(device))


def ksigns(device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [128] on `device` (cached per device; do not modify)."""
    return _ksigns_t(torch.device(device))
