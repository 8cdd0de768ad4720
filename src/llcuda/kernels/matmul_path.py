"""Which matmul kernel serves a product of a given size (pure Python: no Triton needed to ask).

The kernels live in quant_matmul (GEMV, fused tensor-core GEMM) and quant_tc (swapped, dense).
"""

from __future__ import annotations

# Largest batch served by the matrix-vector kernel. Measured on H100 (benchmarks/
# bench_quant_matmul.py --crossover): the fp32 GEMV wins at M <= 4 (Q4_K 4096x14336: 103 vs 159 us
# at M=4) and loses from M=8 on (261 vs 123 us), where re-decoding nothing but FMA-ing M rows on
# CUDA cores costs more than bf16 tensor cores.
GEMV_MAX_M = 4
GEMV_KERNEL_MAX_M = 16  # what quant_gemv accepts (its M loop is unrolled)
# Past the GEMV, three tensor-core paths (see matmul_path; H100 times in us from
# benchmarks/bench_gemm_paths.py, Gemma 3 1B shapes, fused kernel / swapped / dense; measured
# when the dense path's GEMM was cuBLAS's, before the Triton GEMM that keeps cuBLAS unloaded):
#   Q5_0 1152x1536  M=64: 18.5 / 17.4 / 10.7   M=512:  42.3 /  28.0 / 13.9
#   Q5_0 1152x13824 M=64: 34.7 / 25.2 / 32.8   M=512: 118.0 / 115.1 / 54.4
#   Q4_K 6912x1152  M=64: 28.9 / 23.1 / 23.8   M=512: 149.1 /  73.5 / 42.2
#   Q8_0 1152x262144 (LM head) M=64: 281.5 / 202.1 / 652.7
DENSE_MIN_M = 32  # dense (bf16 workspace + Triton GEMM) from here on, for small enough ones
DENSE_SMALL_BYTES = 8 * 2**20  # workspaces this small go dense from DENSE_MIN_M rows on
# Larger ones from SWAP_MAX_M rows on, expanded DENSE_CHUNK_BYTES of workspace at a time (the
# workspace stays that size whatever the matrix), unless they have 2^16 rows or more: the LM
# heads of large vocabularies have not been measured expanded and keep the fused kernel.
DENSE_CHUNK_BYTES = 64 * 2**20
DENSE_MAX_ROWS = 2**16
SWAP_MIN_M, SWAP_MAX_M = 32, 128  # the swapped kernel's range, for the larger matrices


def matmul_path(m: int, n: int, k: int, bf16: bool = True) -> str:
    """Which kernel serves an [m, k] @ [k, n] product: "gemv", "swap", "dense" or "gemm".

    Expanding a matrix into a bf16 workspace (3 bytes of traffic per weight) and running a Triton
    bf16 GEMM over the expanded workspace wins once enough rows share it (the thresholds were
    measured with cuBLAS as that GEMM); an LM head (a vocabulary of rows) is never expanded. In
    between, the swapped kernel (weights as the MMA's left operand) beats the fused one on large
    matrices. Below sm_80 (no bf16) every batch takes the fused kernel's fp16 path.
    """
    if m <= GEMV_MAX_M:
        return "gemv"
    if not bf16:
        return "gemm"
    workspace = 2 * n * k
    if m >= DENSE_MIN_M and (workspace <= DENSE_SMALL_BYTES
                             or (m > SWAP_MAX_M and n < DENSE_MAX_ROWS)):
        return "dense"
    if SWAP_MIN_M <= m <= SWAP_MAX_M:
        return "swap"
    return "gemm"


def dense_chunk_rows(n: int, k: int, chunk_bytes: int = DENSE_CHUNK_BYTES) -> int:
    """Rows per chunk when the dense path expands an [n, k] matrix: n if its bf16 workspace fits
    chunk_bytes, else the fewest equal chunks of whole 128-row tiles (the GEMM's widest) that
    each fit it (one tile at least), the last chunk taking what remains."""
    max_rows = max(128, chunk_bytes // (2 * k) // 128 * 128)
    if n <= max_rows:
        return n
    n_chunks = _cdiv(n, max_rows)
    return _cdiv(_cdiv(n, n_chunks), 128) * 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
