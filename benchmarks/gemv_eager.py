"""Eager decode GEMVs (M = 1) at Llama-3.1-8B shapes, for comparing two trees on one GPU.

    PYTHONPATH=TREE/src python benchmarks/gemv_eager.py

50 back-to-back `quant_matmul` calls after one warm-up, timed with CUDA events: the per-call host
work is included, so the numbers compare only with the same script's on another tree (graph
replays in bench_quant_matmul.py measure the kernels themselves). Self-contained on purpose: it
uses nothing newer than `quant_pack.pack_weight` and `quant_matmul.quant_matmul`, so it runs on
old trees too. Blocks are random bytes with their fp16 scales set to 0.01.
"""

from __future__ import annotations

import torch

from llcuda.kernels import quant_pack as qp
from llcuda.kernels.quant_matmul import quant_matmul

# GGML type id -> (block bytes, offsets of its fp16 scale fields)
BLOCKS = {12: (144, [0, 2]), 14: (210, [208])}  # Q4_K, Q6_K
SHAPES = [(12, 14336, 4096), (14, 14336, 4096), (14, 4096, 128256), (12, 4096, 28672)]


def random_rows(qtype: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    block_bytes, scale_offsets = BLOCKS[qtype]
    nb = k // 256
    raw = torch.randint(0, 256, (n, nb, block_bytes), generator=gen, device="cuda",
                        dtype=torch.uint8)  # fmt: skip
    scale = torch.full((n, nb), 0.01, device="cuda").half().view(torch.uint8).view(n, nb, 2)
    for off in scale_offsets:
        raw[..., off : off + 2] = scale
    return raw.view(n, -1)


def time_us(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1000


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    for qtype, k, n in SHAPES:
        w = qp.pack_weight(random_rows(qtype, n, k, gen), qtype, k)
        x = torch.randn(1, k, device="cuda")
        us = time_us(lambda x=x, w=w: quant_matmul(x, w))
        print(f"type {qtype} K={k} N={n}: {us:.1f} us ({w.nbytes / us / 1e3:.0f} GB/s)")


if __name__ == "__main__":
    main()
