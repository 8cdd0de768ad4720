"""Fast CPU quantized matmul in pure torch: `x @ W.T` with W kept in its GGUF blocks.

The weight is decoded a tile of rows at a time (about TILE_ELEMS elements) into a reused float32
scratch tile, and each tile is multiplied at once, so no float copy of a whole matrix ever
exists. The decoded values are bit-equal to `dequantize_ref` (the specification); only the
matmul's summation order differs from `x @ dequantize_ref(W).T`. Fast decoders: Q8_0, Q4_0,
Q5_0, Q4_K, Q6_K (the Q4_K_M mix); other types are decoded by `dequantize_ref`, tile by tile.

torch's CPU kernels are fast only on long runs: an op over [n, 16] byte slices of 22-byte blocks
runs n tiny scalar loops, a per-element variable shift is scalar code, a cast from a strided
source is scalar code. So each decoder writes its tile in whatever column order its bit work
produces with flat ops (its "layout"), and x's columns are permuted once per call to match:

- a tile is `[planes, rows, cols / planes]`; plane p of row r holds some of row r's columns,
  e.g. Q5_0's plane 0 holds every block's low-nibble elements, plane 1 the high-nibble ones,
  and y = sum_p x_p @ tile_p.T (one MKL matmul per plane);
- a layout may hold padding columns (Q8_0 converts each 34-byte block whole, scale bytes
  included): they meet x = 0, so they add nothing;
- bit fields come from masks, constant shifts and a 256-entry lookup table; f16 scales are read
  through int16 views of the blocks.

Measured on the shared 2-core dev box (Gemma 3 270M, best of several runs): a one-token decode
step (forward + LM head) 0.2-0.35 s against 1.0-1.8 s with dequantize_ref + matmul; at one token
Q8_0 1.3-1.9 Gelem/s, Q5_0 0.5-1.0, Q4_K and Q6_K 0.45-0.8 (benchmarks/bench_cpu_quant.py).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llcuda.gguf.constants import QUANT_SIZES, GGMLType
from llcuda.kernels.dequant_ref import dequantize_ref
from llcuda.layers.quant_tensor import QuantTensor

# Weight elements decoded per tile: big enough that the ~20 torch ops per tile cost little
# next to their work, small enough that the float32 tile (4 MiB) stays in the L3 cache.
TILE_ELEMS = 1 << 20

# Up to this many tokens the whole matmul runs on the calling thread alone (see
# _one_intra_op_thread); beyond, the per-plane GEMMs use all of the caller's threads.
GEMV_TOKENS = 4

_scratch = threading.local()


def scratch_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread reusable scratch tensor (fresh multi-MB buffers page-fault on every call)."""
    bufs: dict[str, torch.Tensor] = _scratch.__dict__.setdefault("bufs", {})
    numel = math.prod(shape)
    buf = bufs.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        # A normal tensor even when first made under torch.inference_mode(): an inference tensor
        # could not be written to by a later call outside inference mode.
        with torch.inference_mode(False):
            buf = bufs[name] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the enclosed torch ops on n intra-op threads, then restore the caller's count. The
    count is per thread in torch (OpenMP's nthreads ICV) and costs ~0.3 us to set; only threads
    making their first torch call meanwhile inherit it."""
    prev = torch.get_num_threads()
    if prev == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _one_intra_op_thread() -> contextlib.AbstractContextManager[None]:
    """Run the enclosed torch ops on the calling thread alone, then restore its thread count.

    A decoder issues ~20 ops of a few MB per tile. Split over OpenMP threads they gain little
    (about 1.4x on 2 quiet cores), but every op ends in a join, and on a shared machine the
    join waits whenever the other thread is descheduled: measured 10-100x slower on the busy
    2-core dev box.
    """
    return torch_threads(1)


def _f16_at(h: torch.Tensor, col: int) -> torch.Tensor:
    """Column `col` of the blocks' int16 view [n, block_bytes / 2] read as f16 -> fp32 [n, 1].

    A one-column strided gather is a single 1-D loop; a [n, 2] byte slice would be n tiny loops.
    """
    column = h[:, col].contiguous()  # a strided f16 -> fp32 cast is scalar code; this copy is not
    return column.view(torch.float16).to(torch.float32).view(-1, 1)


# ------------------------------------------------------------------------------------ decoders
# Each takes the tile's blocks, uint8 [rows, row_bytes] (contiguous, 4-byte aligned), and writes
# float32 `tile` [planes, rows, plane_cols] in its own column order; its `_Decoder.standard`
# views such a tile in the standard element order.


def _q8_0(raw: torch.Tensor, tile: torch.Tensor) -> None:
    n = raw.numel() // 34
    # one plane, 34 columns a block: the 2 bytes of d (padding) then the 32 int8 quants
    o = tile.view(n, 34)
    o.copy_(raw.view(n, 34).view(torch.int8))
    o.mul_(_f16_at(raw.view(torch.int16).view(n, 17), 0))


def _bit_table(set_byte: int, clear_byte: int) -> torch.Tensor:
    """int64 [256]: byte v -> 8 bytes, byte k `set_byte` if bit k of v is set, else `clear_byte`."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # [256, 8]
    table = torch.where(bits == 1, set_byte, clear_byte).to(torch.uint8)
    return table.contiguous().view(torch.int64).view(256)


# Q5_0: q - 16 in int8 is the low nibble alone where the 5th bit is set, and nibble | 0xF0
# (= nibble - 16) where it is clear.
_Q5_0_BITS = _bit_table(0x00, 0xF0)


def _q5_0(raw: torch.Tensor, tile: torch.Tensor) -> None:
    n = raw.numel() // 22
    b = raw.view(n, 22)  # f16 d, u32 qh (the 5th bits), 16 bytes of nibbles
    qs = scratch_buffer("qs", (n, 16), torch.uint8)
    qs.copy_(b[:, 6:])
    # plane 0: low nibbles (elements 0-15 of each block), plane 1: high nibbles (16-31)
    q = scratch_buffer("q", (2, n, 16), torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=q[0])
    torch.bitwise_right_shift(qs, 4, out=q[1])
    # qh byte 2p + j holds the 5th bits of plane p's elements 8j..8j+7: look each byte up
    idx = scratch_buffer("idx", (2, n, 2), torch.int32)
    for p in range(2):
        for j in range(2):
            idx[p, :, j] = b[:, 2 + 2 * p + j]
    bits = torch.index_select(
        _Q5_0_BITS, 0, idx.view(-1), out=scratch_buffer("bits", (4 * n,), torch.int64)
    )
    q |= bits.view(torch.uint8).view(2, n, 16)
    o = tile.view(2, n, 16)
    o.copy_(q.view(torch.int8))
    o.mul_(_f16_at(raw.view(torch.int16).view(n, 11), 0).view(1, n, 1))


def _q4_0(raw: torch.Tensor, tile: torch.Tensor) -> None:
    n = raw.numel() // 18
    qs = scratch_buffer("qs", (n, 16), torch.uint8)
    qs.copy_(raw.view(n, 18)[:, 2:])  # after the f16 d
    # plane 0: low nibbles (elements 0-15 of each block), plane 1: high nibbles (16-31)
    q = scratch_buffer("q", (2, n, 16), torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=q[0])
    torch.bitwise_right_shift(qs, 4, out=q[1])
    q = q.view(torch.int8)
    q -= 8  # 0..15 -> -8..7, exact in int8
    o = tile.view(2, n, 16)
    o.copy_(q)
    o.mul_(_f16_at(raw.view(torch.int16).view(n, 9), 0).view(1, n, 1))


def _k_scale_min(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes as int32 words [n, 3] -> 8 six-bit scales, 8 six-bit mins.

    Works on four bytes at once per int32 op (the masks keep every byte's bits in that byte;
    sign extension of `>>` only reaches bits the masks drop). Returns uint8 [n, 8] each.
    """
    n = w.shape[0]
    d, m, md = w[:, 0], w[:, 1], w[:, 2]
    sc = scratch_buffer("sc", (n, 2), torch.int32)
    mn = scratch_buffer("mn", (n, 2), torch.int32)
    torch.bitwise_and(d, 0x3F3F3F3F, out=sc[:, 0])
    torch.bitwise_and(m, 0x3F3F3F3F, out=mn[:, 0])
    torch.bitwise_or(md & 0x0F0F0F0F, (d >> 2) & 0x30303030, out=sc[:, 1])
    torch.bitwise_or((md >> 4) & 0x0F0F0F0F, (m >> 2) & 0x30303030, out=mn[:, 1])
    return sc.view(torch.uint8).view(n, 8), mn.view(torch.uint8).view(n, 8)


def _q4_k(raw: torch.Tensor, tile: torch.Tensor) -> None:
    n = raw.numel() // 144
    h = raw.view(torch.int16).view(n, 72)  # f16 d, f16 dmin, 12 scale bytes, 128 nibble bytes
    qs = scratch_buffer("qs", (n, 128), torch.uint8)
    qs.copy_(raw.view(n, 144)[:, 16:])
    # plane 0: the low nibbles (sub-blocks 0, 2, 4, 6), plane 1: the high ones (1, 3, 5, 7)
    q = scratch_buffer("q", (2, n, 128), torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=q[0])
    torch.bitwise_right_shift(qs, 4, out=q[1])
    o = tile.view(2, n, 4, 32)
    o.copy_(q.view(2, n, 4, 32))
    sc, mn = _k_scale_min(raw.view(torch.int32).view(n, 36)[:, 1:4])
    # sub-block 2c + p is plane p, chunk c
    ds = _f16_at(h, 0) * sc.to(torch.float32)  # [n, 8]
    dm = _f16_at(h, 1) * mn.to(torch.float32)
    o.mul_(ds.view(n, 4, 2).permute(2, 0, 1).contiguous().unsqueeze(-1))
    o.sub_(dm.view(n, 4, 2).permute(2, 0, 1).contiguous().unsqueeze(-1))


@functools.lru_cache(maxsize=8)
def _q6_k_scale_order(n: int) -> torch.Tensor:
    """int64 [2 * n * 2 * 2 * 2]: index into the blocks' [n, 16] scales of each (plane, block,
    half, group, element // 16) of the tile: element 128h + 32g + l has scale 8h + 2g + l // 16,
    with g = gg + 2 * plane."""
    return torch.arange(n * 16).view(n, 2, 2, 4).permute(2, 0, 1, 3).reshape(-1)


def _q6_k(raw: torch.Tensor, tile: torch.Tensor) -> None:
    n = raw.numel() // 210
    b = raw.view(n, 210)  # 128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales, f16 d
    # Element 128h + 32g + l (half h, group g = gg + 2 * nib, l < 32) is nibble `nib` of
    # ql[64h + 32gg + l]: plane nib, column 64h + 32gg + l, so the planes are flat ops on ql.
    ql = scratch_buffer("ql", (n, 128), torch.uint8)
    ql.copy_(b[:, :128])
    q = scratch_buffer("q", (2, n, 2, 2, 32), torch.uint8)  # [nib, block, h, gg, l]
    torch.bitwise_and(ql, 0x0F, out=q[0].view(n, 128))
    torch.bitwise_right_shift(ql, 4, out=q[1].view(n, 128))
    # group g's 2 high bits are bits 2g, 2g + 1 of qh[32h + l]: moved to bits 4, 5
    qh = scratch_buffer("qh", (n, 64), torch.uint8)
    qh.copy_(b[:, 128:192])
    t = scratch_buffer("t", (n, 64), torch.uint8)
    for g in range(4):
        if g < 2:
            torch.bitwise_left_shift(qh, 4 - 2 * g, out=t)
        else:
            torch.bitwise_right_shift(qh, 2 * g - 4, out=t)
        t &= 0x30
        q[g // 2, :, :, g % 2] |= t.view(n, 2, 32)
    q = q.view(torch.int8)
    q -= 32  # 0..63 -> -32..31, exact in int8
    o = tile.view(2, n, 8, 16)
    o.copy_(q.view(2, n, 8, 16))
    sc = scratch_buffer("sc6", (n, 16), torch.uint8)
    sc.copy_(b[:, 192:208])
    dsc = _f16_at(raw.view(torch.int16).view(n, 105), 104) * sc.view(torch.int8).to(torch.float32)
    dsc = torch.index_select(dsc.view(-1), 0, _q6_k_scale_order(n))
    o.mul_(dsc.view(2, n, 8, 1))


@dataclass(frozen=True)
class _Decoder:
    decode: Callable[[torch.Tensor, torch.Tensor], None]
    planes: int
    block_cols: int  # tile columns per block in each plane (padding included)
    # tile [planes, rows, n_blocks * block_cols] -> a view [rows, n_blocks, ...] whose trailing
    # dims read the block's elements in the standard order (the tile layout, in one place)
    standard: Callable[[torch.Tensor, int], torch.Tensor]


def _two_halves(tile: torch.Tensor, nb: int) -> torch.Tensor:
    return tile.view(2, tile.shape[1], nb, 16).permute(1, 2, 0, 3)


_DECODERS: dict[GGMLType, _Decoder] = {
    # one plane; per block the 2 bytes of d (padding), then the 32 quants
    GGMLType.Q8_0: _Decoder(_q8_0, 1, 34, lambda t, nb: t[0].view(t.shape[1], nb, 34)[:, :, 2:]),
    # plane p: elements 16p..16p+15 of every block
    GGMLType.Q4_0: _Decoder(_q4_0, 2, 16, _two_halves),
    GGMLType.Q5_0: _Decoder(_q5_0, 2, 16, _two_halves),
    # plane p, chunk c: sub-block 2c + p
    GGMLType.Q4_K: _Decoder(
        _q4_k, 2, 128, lambda t, nb: t.view(2, t.shape[1], nb, 4, 32).permute(1, 2, 3, 0, 4)
    ),
    # plane nib, half h, gg: group 2 * nib + gg of half h
    GGMLType.Q6_K: _Decoder(
        _q6_k,
        2,
        128,
        lambda t, nb: t.view(2, t.shape[1], nb, 2, 2, 32).permute(1, 2, 3, 0, 4, 5),
    ),
}
FAST_TYPES: frozenset[GGMLType] = frozenset(_DECODERS)


@functools.lru_cache(maxsize=64)
def _column_index(qtype: GGMLType, n_cols: int) -> torch.Tensor:
    """int64 [tile_cols]: the weight column of each tile column; n_cols for padding, which
    picks a zero appended to x."""
    dec = _DECODERS[qtype]
    nb = n_cols // QUANT_SIZES[qtype][0]
    tile_cols = dec.planes * nb * dec.block_cols
    # run the layout on a "tile" holding its own column numbers
    inverse = dec.standard(torch.arange(tile_cols).view(dec.planes, 1, -1), nb).reshape(-1)
    gather = torch.full((tile_cols,), n_cols, dtype=torch.int64)
    gather[inverse] = torch.arange(n_cols)
    return gather


def _check_blocks(raw: torch.Tensor, qtype: GGMLType) -> tuple[int, int]:
    if raw.dtype != torch.uint8 or raw.dim() != 2:
        raise ValueError(
            f"expected uint8 blocks [rows, row_bytes], got {raw.dtype} {tuple(raw.shape)}"
        )
    block_elems, block_bytes = QUANT_SIZES[qtype]
    if raw.shape[1] % block_bytes:
        raise ValueError(
            f"{qtype.name}: row of {raw.shape[1]} bytes is not a multiple of the block size "
            f"({block_bytes} bytes)"
        )
    return raw.shape[0], raw.shape[1] // block_bytes * block_elems


def _aligned(raw: torch.Tensor) -> torch.Tensor:
    """Contiguous and 4-byte aligned: the decoders read scales through int16 / int32 views."""
    raw = raw.contiguous()
    return raw.clone() if raw.storage_offset() % 4 else raw


def dequantize_cpu(raw: torch.Tensor, qtype: GGMLType) -> torch.Tensor:
    """uint8 `[rows, row_bytes]` -> float32 `[rows, n_cols]`, bit-equal to `dequantize_ref`."""
    qtype = GGMLType(qtype)
    rows, n_cols = _check_blocks(raw, qtype)
    dec = _DECODERS.get(qtype)
    if dec is None or raw.device.type != "cpu":
        return dequantize_ref(raw, qtype)
    nb = n_cols // QUANT_SIZES[qtype][0]
    out = torch.empty(rows, n_cols, dtype=torch.float32)
    with _one_intra_op_thread():
        tile = scratch_buffer("tile", (dec.planes, rows, nb * dec.block_cols), torch.float32)
        dec.decode(_aligned(raw), tile)
        standard = dec.standard(tile, nb)
        out.view(standard.shape).copy_(standard)
    return out


def quant_matmul_cpu(
    x: torch.Tensor, weight: QuantTensor, tile_elems: int = TILE_ELEMS
) -> torch.Tensor:
    """x @ dequantize(weight).T, decoding about `tile_elems` weight elements at a time.

    x: [num_tokens, in_features] -> [num_tokens, out_features] float32.
    """
    n_rows, n_cols = weight.shape
    if x.dim() != 2 or x.shape[1] != n_cols:
        raise ValueError(
            f"x must be [num_tokens, {n_cols}] for weight {weight.shape}, got {tuple(x.shape)}"
        )
    x32 = x.float()
    num_tokens = x32.shape[0]
    out = torch.empty(num_tokens, n_rows, dtype=torch.float32)
    # equal tiles of about tile_elems elements
    n_tiles = min(n_rows, max(1, -(-n_rows * n_cols // max(1, tile_elems))))
    rows_per_tile = -(-n_rows // n_tiles)
    starts = range(0, n_rows, rows_per_tile)
    dec = _DECODERS.get(weight.qtype)
    if dec is None:  # reference decoder, standard column order
        for start in starts:
            stop = min(start + rows_per_tile, n_rows)
            with _one_intra_op_thread():
                w = dequantize_ref(weight.data[start:stop], weight.qtype)  # [rows, n_cols]
            torch.mm(x32, w.T, out=out[:, start:stop])
        return out
    gather = _column_index(weight.qtype, n_cols)
    planes, plane_cols = dec.planes, len(gather) // dec.planes
    # x in the tile's column order, zeros at padding: [planes, num_tokens, plane_cols]
    xp = torch.cat([x32, x32.new_zeros(num_tokens, 1)], dim=1)[:, gather]
    xp = xp.view(num_tokens, planes, plane_cols).transpose(0, 1).contiguous()
    # A few tokens make memory-bound GEMVs that gain nothing from more threads either; the
    # GEMMs of a prefill do, so they keep the caller's threads.
    gemv = num_tokens <= GEMV_TOKENS
    with _one_intra_op_thread() if gemv else contextlib.nullcontext():
        for start in starts:
            stop = min(start + rows_per_tile, n_rows)
            tile = scratch_buffer("tile", (planes, stop - start, plane_cols), torch.float32)
            with _one_intra_op_thread():
                dec.decode(_aligned(weight.data[start:stop]), tile)
            # one matmul per plane (torch.bmm would be several times slower than MKL here)
            y = out[:, start:stop]
            torch.mm(xp[0], tile[0].T, out=y) if num_tokens == 1 else y.copy_(xp[0] @ tile[0].T)
            for p in range(1, planes):
                y.addmm_(xp[p], tile[p].T)
    return out
