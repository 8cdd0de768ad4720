"""Greedy sampling's argmax over the vocabulary in one Triton kernel: [B, V] fp32 -> [B] int64.

torch's argmax of one 262k-entry row takes ~14 us on an H100 (a decode step of Gemma 3 270M is
~590 us). Here each row is cut into pieces of BLOCK entries, one program each; every piece stores
its best (value, index) and counts itself done on the row's counter, and the piece that finishes
last picks the row's winner and resets the counter (as paged_attention's split-KV pieces do).

Ties go to the lowest index and NaN counts as larger than every number, as in
reference.argmax_ref (torch.argmax), so a NaN row is never silently read as a valid token.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK = 4096  # entries per piece: 64 pieces for a 262,144-entry vocabulary


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, piece_val_ptr, piece_idx_ptr, counter_ptr, n, stride_row,
                   PIECES: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    piece = tl.program_id(1)
    offs = piece * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_row + offs, mask=offs < n,
                other=float("-inf"))  # fmt: skip
    best, idx = _first_max(x, offs, n)  # n for a piece past the row's end: never chosen
    slot = row * PIECES + piece
    tl.store(piece_val_ptr + slot, best)
    tl.store(piece_idx_ptr + slot, idx)
    # acq_rel: this piece's stores are visible to whoever counts after it
    if tl.atomic_add(counter_ptr + row, 1, sem="acq_rel") == PIECES - 1:
        tl.store(counter_ptr + row, 0)  # ready for the next call
        p = tl.arange(0, PIECES)
        vals = tl.load(piece_val_ptr + row * PIECES + p, cache_modifier=".cg")
        idxs = tl.load(piece_idx_ptr + row * PIECES + p, cache_modifier=".cg")
        # a piece's index is the lowest of its own: the lowest among the best pieces wins
        _, winner = _first_max(vals, idxs, n)
        tl.store(out_ptr + row, winner.to(tl.int64))


@triton.jit
def _first_max(x, index, n):
    """(maximum, its lowest `index`) of x, NaN above everything (torch.argmax's order); entries
    whose index is n or more are ignored (index n when nothing is left)."""
    valid = index < n
    nan = (x != x) & valid
    nan_index = tl.min(tl.where(nan, index, n), axis=0)
    x = tl.where(nan | ~valid, float("-inf"), x)
    best = tl.max(x, axis=0)
    best_index = tl.min(tl.where((x == best) & valid, index, n), axis=0)
    has_nan = nan_index < n
    return tl.where(has_nan, float("nan"), best), tl.where(has_nan, nan_index, best_index)


# its own zero-left counters, apart from paged_attention's: those are baked into captured decode
# graphs, so a larger buffer made here must never replace them
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] float32 on CUDA (unit stride along V) -> [B] int64: each row's first maximum."""
    if x.dim() != 2 or x.dtype != torch.float32 or x.stride(1) != 1:
        raise ValueError(
            f"argmax_rows needs float32 [rows, vocab] with unit column stride, got {x.dtype} "
            f"{tuple(x.shape)} with strides {x.stride()}"
        )
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"argmax_rows runs on CUDA tensors, got one on {x.device}")
    rows, n = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    if n == 0:
        raise ValueError("argmax of an empty row")
    pieces = triton.next_power_of_2(triton.cdiv(n, BLOCK))
    counters = _COUNTERS.get(x.device)
    if counters is None or counters.numel() < rows:
        counters = torch.zeros(max(rows, 1024), dtype=torch.int32, device=x.device)
        _COUNTERS[x.device] = counters
    piece_val = torch.empty(rows * pieces, dtype=torch.float32, device=x.device)
    piece_idx = torch.empty(rows * pieces, dtype=torch.int32, device=x.device)
    _argmax_kernel[(rows, pieces)](x, out, piece_val, piece_idx, counters, n, x.stride(0),
                                   PIECES=pieces, BLOCK=BLOCK)  # fmt: skip
    return out
