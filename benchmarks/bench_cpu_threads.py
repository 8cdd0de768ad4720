"""One forward's quantized matmuls of Gemma 3 270M (random blocks, real shapes and types) with
the caller at 1 and at N torch intra-op threads. Needs no model file, so it runs on any machine:

    python benchmarks/bench_cpu_threads.py [--threads 2] [--tokens 1] [--reps 10]

Prints per-weight-shape best times and the per-forward sum for each thread count. quant_matmul_cpu
runs calls of <= GEMV_TOKENS tokens on one thread whatever the caller's count (see
_one_intra_op_thread), so at --tokens 1 both columns should agree; with more tokens the GEMMs use
the caller's threads. Measured before that policy (Xeon, taskset to 2 quiet cores, 1 token):
302 ms 1 thread, 212 ms 2 threads; on the busy 2-core dev box 2 threads were 2-10x slower.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from llcuda.gguf.constants import QUANT_SIZES, GGMLType
from llcuda.kernels.quant_matmul_cpu import quant_matmul_cpu
from llcuda.layers.quant_tensor import QuantTensor

# (type, rows, cols, count per token) for Gemma 3 270M Q4_K_M; the LM head is token_embd
SHAPES = [
    (GGMLType.Q8_0, 262144, 640, 1),
    (GGMLType.Q5_0, 2048, 640, 36),
    (GGMLType.Q5_0, 1024, 640, 18),
    (GGMLType.Q5_0, 256, 640, 27),
    (GGMLType.Q8_0, 256, 640, 9),
    (GGMLType.Q4_K, 640, 1024, 18),
    (GGMLType.Q4_K, 640, 2048, 9),
    (GGMLType.Q6_K, 640, 2048, 9),
]
F16_OFFSETS = {GGMLType.Q8_0: [0], GGMLType.Q5_0: [0], GGMLType.Q4_K: [0, 2], GGMLType.Q6_K: [208]}


def random_weight(qtype: GGMLType, rows: int, cols: int, seed: int) -> QuantTensor:
    rng = np.random.default_rng(seed)
    block_elems, block_bytes = QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block_elems, block_bytes), dtype=np.uint8)
    for off in F16_OFFSETS[qtype]:
        d = rng.uniform(-0.01, 0.01, len(raw)).astype(np.float16)
        raw[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    data = torch.from_numpy(raw.reshape(rows, -1))
    return QuantTensor(data, qtype, (rows, cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    weights = [random_weight(t, r, c, i) for i, (t, r, c, _) in enumerate(SHAPES)]
    xs = [torch.randn(args.tokens, w.shape[1]) for w in weights]
    strategies = {"1 thread": 1, f"{args.threads} threads": args.threads}
    best: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        for _ in range(args.reps):
            for name, threads in strategies.items():
                torch.set_num_threads(threads)
                for i, (w, x) in enumerate(zip(weights, xs, strict=True)):
                    n = 1 if w.shape[0] > 10000 else 5
                    t0 = time.perf_counter()
                    for _ in range(n):
                        quant_matmul_cpu(x, w)
                    dt = (time.perf_counter() - t0) / n
                    best[name, i] = min(best.get((name, i), float("inf")), dt)
    print("| weight | count |" + "".join(f" {s} ms |" for s in strategies))
    print("|---|---|" + "---|" * len(strategies))
    for i, (t, r, c, count) in enumerate(SHAPES):
        cells = "".join(f" {best[s, i] * 1e3:.2f} |" for s in strategies)
        print(f"| {t.name} {r}x{c} | {count} |{cells}")
    totals = {s: sum(best[s, i] * SHAPES[i][3] for i in range(len(SHAPES))) for s in strategies}
    print("| **per forward** | |" + "".join(f" **{v * 1e3:.0f}** |" for v in totals.values()))


if __name__ == "__main__":
    main()
