"""kernels/argmax.argmax_rows against reference.argmax_ref (torch.argmax): ties to the lowest
index, NaN largest, rows that end inside a piece, counters left at zero for the next call.

Set TRITON_INTERPRET=1 and call the tests directly to run them on the CPU."""

from __future__ import annotations

import pytest
import torch

from llcuda.kernels.reference import argmax_ref

argmax = pytest.importorskip("llcuda.kernels.argmax", reason="needs triton (GPU builds of torch)")
BLOCK, argmax_rows = argmax.BLOCK, argmax.argmax_rows

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("rows,vocab", [(1, 262144), (5, 151936), (3, 100), (2, BLOCK + 1)])
def test_argmax_rows_equals_torch(rows, vocab):
    gen = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=gen).to(DEVICE)
    for _ in range(2):  # the second call finds the counters back at zero
        assert torch.equal(argmax_rows(x), argmax_ref(x))


def test_ties_go_to_the_lowest_index_and_nan_wins():
    x = torch.zeros(4, 3 * BLOCK, device=DEVICE)
    x[0, [7, BLOCK + 2, 2 * BLOCK]] = 5.0  # a tie across pieces: the first
    x[1, [2 * BLOCK + 9, 2 * BLOCK + 4]] = 1.0  # a tie inside a piece
    x[2, BLOCK + 5] = float("nan")
    x[2, 3] = float("inf")
    x[3] = float("-inf")  # all equal: index 0
    got = argmax_rows(x)
    assert got.tolist() == [7, 2 * BLOCK + 4, BLOCK + 5, 0]
    assert torch.equal(got, argmax_ref(x))


def test_a_row_view_with_a_stride_and_bad_input():
    x = torch.randn(3, 2 * BLOCK, device=DEVICE)
    assert torch.equal(argmax_rows(x[:, :BLOCK + 7]), argmax_ref(x[:, :BLOCK + 7]))
    assert argmax_rows(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="float32"):
        argmax_rows(x.half())
    with pytest.raises(ValueError, match="unit column stride"):
        argmax_rows(x.t())
