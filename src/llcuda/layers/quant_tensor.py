"""QuantTensor: a weight matrix kept in its GGUF blocks, plus a reader for small float tensors.

Loading a model must not copy its weights: on CPU `QuantTensor.data` is a zero-copy uint8 view of
the file mapping (pages are read from disk on first touch), and `.to("cuda")` uploads the raw
blocks as they are. Kernels dequantize on the fly; `dequantize()` is the slow reference path.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from llcuda.gguf.constants import QUANT_SIZES, GGMLType
from llcuda.gguf.reader import GGUFFile
from llcuda.kernels.dequant_ref import dequantize_ref, row_bytes


def tensor_from_readonly(arr: np.ndarray) -> torch.Tensor:
    """Zero-copy torch view of a read-only numpy array (e.g. a slice of a read-only mmap).

    torch has no read-only tensors and warns about that; the warning is silenced here only, and
    callers must treat the result as immutable (writing into a read-only mapping faults).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


class QuantTensor:
    """A 2-D weight `[rows, cols]` (rows = out features, cols = in features) in GGUF blocks.

    data: uint8 `[rows, row_bytes]`; each row is `cols / block_elems` whole blocks of `qtype`.
    """

    def __init__(self, data: torch.Tensor, qtype: GGMLType, shape: tuple[int, int]) -> None:
        qtype = GGMLType(qtype)
        rows, cols = shape
        if data.dtype != torch.uint8 or data.dim() != 2:
            raise ValueError(
                f"QuantTensor data must be uint8 [rows, row_bytes], got {data.dtype} "
                f"{tuple(data.shape)}"
            )
        expected = (rows, row_bytes(qtype, cols))
        if tuple(data.shape) != expected:
            raise ValueError(
                f"QuantTensor of shape {shape} in {qtype.name} needs data {expected}, "
                f"got {tuple(data.shape)}"
            )
        self.data = data
        self.qtype = qtype
        self.shape = (rows, cols)

    @classmethod
    def from_gguf(cls, g: GGUFFile, name: str) -> QuantTensor:
        """Zero-copy view of tensor `name`; the shape is the GGUF ne reversed (`[ne1, ne0]`)."""
        info = g.tensors.get(name)
        if info is None:
            raise KeyError(f"{g.path}: no tensor named {name!r}")
        rows, cols = info.rows_cols
        raw = g.tensor_bytes(name).reshape(rows, info.row_bytes)
        return cls(tensor_from_readonly(raw), info.ggml_type, (rows, cols))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def block_elems(self) -> int:
        return QUANT_SIZES[self.qtype][0]

    def dequantize(self, rows: slice | None = None) -> torch.Tensor:
        """float32 `[n_rows, cols]` of the selected rows (default all), on this tensor's device."""
        data = self.data if rows is None else self.data[rows]
        return dequantize_ref(data, self.qtype)

    def to(self, device: torch.device | str) -> QuantTensor:
        """A new QuantTensor with the raw bytes copied to `device` (always a copy, never a view)."""
        device = torch.device(device)
        data = self.data.to(device, copy=True)
        return QuantTensor(data, self.qtype, self.shape)

    def __repr__(self) -> str:
        return (
            f"QuantTensor(shape={self.shape}, qtype={self.qtype.name}, nbytes={self.nbytes}, "
            f"device={self.device})"
        )


def read_float_tensor(g: GGUFFile, name: str) -> torch.Tensor:
    """A small tensor (norm weights, rope factors) as an owned float32 tensor, ne reversed."""
    info = g.tensors.get(name)
    if info is None:
        raise KeyError(f"{g.path}: no tensor named {name!r}")
    rows, cols = info.rows_cols
    raw = tensor_from_readonly(g.tensor_bytes(name).reshape(rows, info.row_bytes))
    out = dequantize_ref(raw, info.ggml_type)  # a fresh tensor: never aliases the mapping
    return out.reshape(tuple(reversed(info.shape)))
