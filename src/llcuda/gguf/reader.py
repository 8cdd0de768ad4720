"""Our own GGUF v2/v3 reader: memory-maps the file and parses header, metadata and tensor infos.

Layout (llama.cpp `ggml/include/gguf.h`): magic `GGUF`, u32 version, i64 n_tensors, i64 n_kv,
the KV pairs, the tensor infos, padding to `general.alignment`, then the tensor data. Every length
and count read from the file is checked against the bytes left before anything is allocated, so a
garbage or truncated file fails fast with a `GGUFError` naming the file and the problem.

Tensor data is never copied: `tensor_bytes(name)` is a read-only uint8 view of the mapping.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llcuda.gguf.constants import (
    GGML_MAX_DIMS,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    QUANT_SIZES,
    SCALAR_DTYPES,
    SCALAR_FORMATS,
    GGMLType,
    GGUFValueType,
)

SUPPORTED_VERSIONS = (2, 3)
_MAX_ARRAY_NESTING = 8
_INT64_MAX = 2**63 - 1

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_SCALARS = {t: struct.Struct(f) for t, f in SCALAR_FORMATS.items()}


class GGUFError(ValueError):
    """The file is not a GGUF file we can read; the message names the file and the problem."""


class UnsupportedModelError(GGUFError):
    """A valid GGUF file whose architecture or tensor types llcuda cannot run."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # ne, innermost (contiguous) dimension first, as stored in GGUF
    ggml_type: GGMLType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    n_elements: int

    @property
    def rows_cols(self) -> tuple[int, int]:
        """(rows, cols) of the row-major bytes: for a 2-D weight, (out_features, in_features)."""
        cols = self.shape[0] if self.shape else 1
        return (self.n_elements // cols if cols else 0, cols)

    @property
    def row_bytes(self) -> int:
        block_elems, block_bytes = QUANT_SIZES[self.ggml_type]
        return self.rows_cols[1] // block_elems * block_bytes


class GGUFFile:
    """A GGUF file opened read-only through mmap.

    metadata values are plain Python (str, int, float, bool); arrays of strings are `list[str]`
    (utf-8, undecodable bytes replaced), arrays of numbers are 1-D numpy arrays (owned copies; bool
    arrays have dtype bool), arrays of arrays are lists.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise GGUFError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise GGUFError(f"{self.path}: is a directory, not a GGUF file")
        self._size = self.path.stat().st_size
        if self._size < 4:
            raise GGUFError(f"{self.path}: not a GGUF file (only {self._size} bytes)")
        with open(self.path, "rb") as f:
            self._mm: mmap.mmap | None = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ public API

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: missing metadata key 'general.architecture'")
        return arch

    @property
    def file_size(self) -> int:
        return self._size

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of tensor `name`: a read-only zero-copy uint8 view of the mapping."""
        info = self._info(name)
        if self._mm is None:
            raise GGUFError(f"{self.path}: file is closed")
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def check_supported(
        self, supported_archs: Iterable[str], supported_types: Iterable[GGMLType]
    ) -> None:
        """Raise UnsupportedModelError naming the architecture or the first unsupported tensors."""
        archs = set(supported_archs)
        if self.architecture not in archs:
            raise UnsupportedModelError(
                f"{self.path}: unsupported architecture {self.architecture!r} "
                f"(supported: {', '.join(sorted(archs))})"
            )
        types = set(supported_types)
        bad = [t for t in self.tensors.values() if t.ggml_type not in types]
        if bad:
            listed = ", ".join(f"{t.name} ({t.ggml_type.name})" for t in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise UnsupportedModelError(
                f"{self.path}: unsupported tensor type: {listed}{more} "
                f"(supported: {', '.join(sorted(t.name for t in types))})"
            )

    def close(self) -> None:
        """Drop the mapping. Views handed out by tensor_bytes keep their pages alive until freed."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views still export the buffer; the mapping goes when they do

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, version={self.version}, "
            f"tensors={len(self.tensors)}, kv={len(self.metadata)})"
        )

    def _info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    # ------------------------------------------------------------------ parsing

    def _fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def _need(self, n: int, what: str) -> None:
        if n > self._size - self._pos:
            raise self._fail(
                f"truncated file: {what} needs {n} bytes at offset {self._pos} "
                f"but the file has {self._size} bytes"
            )

    def _scalar(self, s: struct.Struct, what: str) -> Any:
        self._need(s.size, what)
        (v,) = s.unpack_from(self._mm, self._pos)
        self._pos += s.size
        return v

    def _string(self, what: str) -> str:
        n = self._scalar(_U64, f"length of {what}")
        self._need(n, what)
        s = self._mm[self._pos : self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _parse(self) -> None:
        self._pos = 0
        magic = self._mm[:4]
        if magic != GGUF_MAGIC:
            raise self._fail(f"not a GGUF file (first bytes {magic!r}, expected b'GGUF')")
        self._pos = 4
        self.version: int = self._scalar(_U32, "header (version)")
        if self.version not in SUPPORTED_VERSIONS:
            hint = ""
            if self.version & 0xFFFF == 0:
                hint = " (a big-endian file? only little-endian GGUF is supported)"
            raise self._fail(
                f"unsupported GGUF version {self.version}{hint}; supported: {SUPPORTED_VERSIONS}"
            )
        n_tensors = self._scalar(_I64, "header (tensor count)")
        n_kv = self._scalar(_I64, "header (metadata count)")
        # a KV pair is at least 8 (key length) + 4 (type) + 1 bytes, a tensor info at least 8+4+4+8
        left = self._size - self._pos
        if not 0 <= n_kv <= left // 13:
            raise self._fail(f"absurd metadata count {n_kv} for a file of {self._size} bytes")
        if not 0 <= n_tensors <= left // 24:
            raise self._fail(f"absurd tensor count {n_tensors} for a file of {self._size} bytes")

        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = self._string(f"metadata key #{i}")
            if key in self.metadata:
                raise self._fail(f"duplicate metadata key {key!r}")
            vtype = self._scalar(_I32, f"type of metadata {key!r}")
            self.metadata[key] = self._value(vtype, key, 0)

        self.alignment = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if (
            isinstance(self.alignment, bool)
            or not isinstance(self.alignment, int)
            or self.alignment <= 0
            or self.alignment & (self.alignment - 1)
        ):
            raise self._fail(f"general.alignment must be a power of two, got {self.alignment!r}")

        raw_infos = [self._tensor_info(i) for i in range(n_tensors)]
        self.data_offset: int = -(-self._pos // self.alignment) * self.alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, gtype, rel_offset in raw_infos:
            self.tensors[name] = self._make_info(name, shape, gtype, rel_offset)
        self._check_data_layout()

    def _check_data_layout(self) -> None:
        """No two tensors share bytes, and the data section accounts for the end of the file.

        Writers (llama.cpp's gguf_write, gguf-py) pad every tensor to the alignment, so the last
        tensor ends at most `alignment - 1` bytes before the end of the file. More bytes left over
        means the data start we computed is not where the writer put the data (a wrong
        `general.alignment` or a corrupt header): every tensor would read shifted garbage.
        """
        if not self.tensors:
            return
        by_offset = sorted(self.tensors.values(), key=lambda t: (t.offset, t.nbytes))
        for prev, cur in zip(by_offset, by_offset[1:], strict=False):
            if cur.offset < prev.offset + prev.nbytes:
                raise self._fail(
                    f"tensor {cur.name!r} data [{cur.offset}, {cur.offset + cur.nbytes}) overlaps "
                    f"tensor {prev.name!r} [{prev.offset}, {prev.offset + prev.nbytes})"
                )
        data_end = max(t.offset + t.nbytes for t in by_offset)
        if self._size - data_end >= self.alignment:
            raise self._fail(
                f"tensor data ends at byte {data_end} but the file has {self._size} bytes: "
                f"{self._size - data_end} bytes unaccounted for (data section expected to start "
                f"at {self.data_offset}, general.alignment {self.alignment}; a wrong alignment "
                f"or a corrupt tensor offset?)"
            )

    def _value(self, vtype: int, key: str, depth: int) -> Any:
        try:
            t = GGUFValueType(vtype)
        except ValueError:
            raise self._fail(f"unknown value type {vtype} for metadata {key!r}") from None
        if t == GGUFValueType.STRING:
            return self._string(f"metadata {key!r}")
        if t != GGUFValueType.ARRAY:
            v = self._scalar(_SCALARS[t], f"metadata {key!r}")
            return float(v) if t in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64) else v
        if depth >= _MAX_ARRAY_NESTING:
            raise self._fail(f"metadata {key!r}: arrays nested deeper than {_MAX_ARRAY_NESTING}")
        etype = self._scalar(_I32, f"element type of metadata {key!r}")
        count = self._scalar(_U64, f"length of metadata {key!r}")
        try:
            et = GGUFValueType(etype)
        except ValueError:
            raise self._fail(f"unknown array element type {etype} for metadata {key!r}") from None
        left = self._size - self._pos
        min_elem = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}.get(et)
        if min_elem is None:
            min_elem = _SCALARS[et].size
        if count > left // min_elem:
            raise self._fail(
                f"metadata {key!r}: array of {count} {et.name} elements cannot fit in the "
                f"{left} bytes left in the file (truncated or corrupt)"
            )
        if et == GGUFValueType.STRING:
            return self._string_array(count, key)
        if et == GGUFValueType.ARRAY:
            return [self._value(GGUFValueType.ARRAY, key, depth + 1) for _ in range(count)]
        arr = np.frombuffer(self._mm, dtype=SCALAR_DTYPES[et], count=count, offset=self._pos)
        self._pos += count * arr.itemsize
        # own the data so the mapping can be closed while metadata lives on
        if et == GGUFValueType.BOOL:
            return arr.astype(bool)
        return arr.astype(arr.dtype.newbyteorder("="))

    def _string_array(self, count: int, key: str) -> list[str]:
        # hot loop: the Gemma 3 vocabulary is 262,144 strings
        mm, pos, size = self._mm, self._pos, self._size
        unpack = _U64.unpack_from
        out: list[str] = [""] * count
        for i in range(count):
            if pos + 8 > size:
                self._pos = pos
                self._need(8, f"metadata {key!r} string #{i} length")
            (n,) = unpack(mm, pos)
            pos += 8
            if n > size - pos:
                self._pos = pos
                self._need(n, f"metadata {key!r} string #{i}")
            out[i] = mm[pos : pos + n].decode("utf-8", errors="replace")
            pos += n
        self._pos = pos
        return out

    def _tensor_info(self, i: int) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string(f"name of tensor info #{i}")
        n_dims = self._scalar(_U32, f"tensor {name!r} n_dims")
        if n_dims > GGML_MAX_DIMS:
            raise self._fail(f"tensor {name!r} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
        shape = tuple(self._scalar(_I64, f"tensor {name!r} shape") for _ in range(n_dims))
        gtype = self._scalar(_I32, f"tensor {name!r} type")
        offset = self._scalar(_U64, f"tensor {name!r} offset")
        return name, shape, gtype, offset

    def _make_info(
        self, name: str, shape: tuple[int, ...], gtype: int, rel_offset: int
    ) -> GGUFTensorInfo:
        if name in self.tensors:
            raise self._fail(f"duplicate tensor name {name!r}")
        try:
            ggml_type = GGMLType(gtype)
        except ValueError:
            raise self._fail(f"tensor {name!r} has unknown ggml type id {gtype}") from None
        if any(d <= 0 for d in shape):
            what = "negative" if any(d < 0 for d in shape) else "zero"
            raise self._fail(f"tensor {name!r} has a {what} dimension: {shape}")
        block_elems, block_bytes = QUANT_SIZES[ggml_type]
        if shape and shape[0] % block_elems:
            raise self._fail(
                f"tensor {name!r} of type {ggml_type.name}: ne[0]={shape[0]} is not a multiple "
                f"of the block size {block_elems}"
            )
        n_elements = math.prod(shape)
        if n_elements > _INT64_MAX:  # ggml's int64 ne / size_t nbytes would wrap
            raise self._fail(
                f"tensor {name!r}: dimensions {shape} overflow int64 ({n_elements} elements)"
            )
        nbytes = n_elements // block_elems * block_bytes
        offset = self.data_offset + rel_offset
        if rel_offset % self.alignment:
            raise self._fail(
                f"tensor {name!r} offset {rel_offset} is not a multiple of the alignment "
                f"{self.alignment}"
            )
        if offset + nbytes > self._size:
            raise self._fail(
                f"truncated file: tensor {name!r} data [{offset}, {offset + nbytes}) runs past "
                f"the end of the file ({self._size} bytes)"
            )
        return GGUFTensorInfo(name, shape, ggml_type, offset, nbytes, n_elements)
