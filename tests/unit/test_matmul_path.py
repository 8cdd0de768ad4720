"""matmul_path's pure-Python rules (no Triton needed): how the dense path chunks a matrix."""

from __future__ import annotations

import pytest

from llcuda.kernels.matmul_path import DENSE_CHUNK_BYTES, dense_chunk_rows


@pytest.mark.parametrize("n,k", [(28672, 4096), (4096, 14336), (3584, 18944), (4097, 14336),
                                 (37888, 3584), (6144, 4096), (13824, 1152), (1000, 256)])
def test_dense_chunks_are_equal_whole_tiles_within_the_workspace(n, k):
    rows = dense_chunk_rows(n, k)
    if 2 * n * k <= DENSE_CHUNK_BYTES:
        assert rows == n  # one expansion of the whole matrix
        return
    n_chunks = -(-n // rows)
    assert rows % 128 == 0 and 2 * rows * k <= DENSE_CHUNK_BYTES, (rows, n_chunks)
    # the fewest chunks that fit, so all but the last are equal and the last is not tiny
    assert n_chunks == -(-n // (DENSE_CHUNK_BYTES // (2 * k) // 128 * 128))
    assert n - (n_chunks - 1) * rows > rows - 128 * n_chunks


def test_dense_chunks_of_llama_8b():
    assert dense_chunk_rows(28672, 4096) == 7168  # gate|up: 4 chunks of 58.7 MB
    assert dense_chunk_rows(4096, 14336) == 2048  # ffn_down: 2 chunks
    assert dense_chunk_rows(6144, 4096) == 6144  # q|k|v: 50 MB, whole
    # a chunk budget smaller than one tile still takes one 128-row tile at a time
    assert dense_chunk_rows(1000, 2048, chunk_bytes=1000) == 128
