"""Host time per cuBLAS bf16 matmul call by output dtype (the dense path's fp32-output cost
while its GEMM was cuBLAS's; it is now quant_tc.dense_gemm, a Triton kernel).

    python benchmarks/bench_cublas_host.py      # on the GPU machine

Times 200 back-to-back calls of x [512, 1152] @ W.T, W [13824, 1152] (Gemma 3 1B's gate|up at a
512-token prefill): host microseconds per call (queueing only) and wall per call (to the end).
"""

import time

import torch


def main() -> None:
    a = torch.randn(512, 1152, device="cuda").bfloat16()
    b = torch.randn(13824, 1152, device="cuda").bfloat16()
    variants = [
        ("fp32 out (out_dtype)", lambda: torch.mm(a, b.t(), out_dtype=torch.float32)),
        ("bf16 out", lambda: torch.mm(a, b.t())),
        ("bf16 out + .float()", lambda: torch.mm(a, b.t()).float()),
    ]
    for name, call in variants:
        for _ in range(20):
            call()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            call()
        host = (time.perf_counter() - t) / 200 * 1e6
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 200 * 1e6
        print(f"{name:22s} host {host:6.1f} us/call, wall {wall:6.1f} us/call")


if __name__ == "__main__":
    main()
