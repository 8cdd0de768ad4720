"""The tensor-core matmul paths side by side at prefill and decode-batch sizes.

    python benchmarks/bench_gemm_paths.py [--sweep] [--json out.jsonl]

Per (type, K, N, M), microseconds (median of CUDA-graph replays over enough weight copies that
L2 does not hold them): `gemm` (quant_matmul.quant_gemm: x as the left operand), `swap`
(quant_tc.quant_gemm_swap: the dequantized weight as the left operand), `dense` (quant_tc:
dequantize into a bf16 workspace, then a Triton bf16 GEMM over the expanded workspace), its two
halves (`dequant`, `bf16 gemm`: quant_tc.dense_gemm with the split-K count S that dense_config
picks, its partial sums added up; `parts`: dense_gemm(partials=True), the partial sums left for
the consumer as the engine takes them, with the S picked for that), cuBLAS on the same bf16
operands for comparison (`cublas`; the dense path no longer calls it), and the GB/s of packed
weight bytes each achieves. --sweep also times other swap configurations.
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_quant_matmul import TARGET_BYTES, T, random_rows, time_calls

from llcuda.kernels import quant_pack as qp
from llcuda.kernels.quant_dequant import dequantize_bf16
from llcuda.kernels.quant_matmul import quant_gemm
from llcuda.kernels.quant_tc import (
    dense_config,
    dense_gemm,
    quant_gemm_dense,
    quant_gemm_swap,
    swap_config,
)

# (type, K, N) as the engine meets them (q|k|v and gate|up fused): Gemma 3 1B, then 270M, then
# Llama-3.1-8B (q|k, o, gate|up, ffn_down in both of its Q4_K_M types)
SHAPES = [
    ("Q5_0", 1152, 1536), ("Q5_0", 1152, 13824), ("Q4_K", 1024, 1152), ("Q4_K", 6912, 1152),
    ("Q6_K", 6912, 1152), ("Q8_0", 1152, 262144),
    ("Q5_0", 640, 1536), ("Q5_0", 640, 4096), ("Q4_K", 1024, 640), ("Q4_K", 2048, 640),
    ("Q6_K", 2048, 640),
    ("Q4_K", 4096, 5120), ("Q4_K", 4096, 4096), ("Q4_K", 4096, 28672), ("Q4_K", 14336, 4096),
    ("Q6_K", 14336, 4096),
]
BATCHES = [16, 32, 64, 128, 256, 512]


def weights(tname: str, k: int, n: int, gen) -> list[qp.PackedWeight]:
    qid = T[tname]
    w0 = qp.pack_weight(random_rows(qid, n, k, gen), qid, k)
    copies = max(1, min(64, -(-TARGET_BYTES // w0.nbytes)))
    return [w0] + [qp.pack_weight(random_rows(qid, n, k, gen), qid, k) for _ in range(copies - 1)]


def bench(tname, k, n, gen, batches, sweep: bool, out) -> None:
    ws = weights(tname, k, n, gen)
    nbytes = ws[0].nbytes
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dense = [dequantize_bf16(w) for w in ws[: max(1, min(len(ws), TARGET_BYTES // (2 * n * k)))]]
    for m in batches:
        x = torch.randn((m, k), generator=gen, device="cuda")
        xb = x.to(torch.bfloat16)
        row = {"type": tname, "K": k, "N": n, "M": m, "weight_bytes": nbytes}
        row["gemm_us"] = time_calls([lambda w=w, x=x: quant_gemm(x, w) for w in ws])
        row["swap_us"] = time_calls([lambda w=w, x=x: quant_gemm_swap(x, w) for w in ws])
        row["dense_us"] = time_calls([lambda w=w, x=x: quant_gemm_dense(x, w) for w in ws])
        row["dequant_us"] = time_calls([lambda w=w: dequantize_bf16(w) for w in ws])
        row["bf16_gemm_us"] = time_calls([lambda d=d, xb=xb: dense_gemm(xb, d) for d in dense])
        row["split_k"] = dense_config(m, n, k, sms)["SPLIT_K"]
        row["split_k_parts"] = dense_config(m, n, k, sms, partials=True)["SPLIT_K"]
        row["bf16_parts_us"] = (time_calls([lambda d=d, xb=xb: dense_gemm(xb, d, partials=True)
                                            for d in dense])
                                if max(row["split_k"], row["split_k_parts"]) > 1
                                else row["bf16_gemm_us"])
        row["cublas_us"] = time_calls([lambda d=d, xb=xb: torch.mm(xb, d.t(),
                                                                   out_dtype=torch.float32)
                                       for d in dense])
        if sweep and (n < 2**16 or m <= 128):
            base = swap_config(T[tname], m, n, k // 32, sms)
            best = (row["swap_us"], base)
            for bn in (64, 128):
                for warps in (4, 8):
                    for block_g in sorted({base["BLOCK_G"], max(1, base["BLOCK_G"] // 2)}):
                        for split in sorted({1, base["SPLIT_K"], 2 * base["SPLIT_K"]}):
                            cfg = dict(base, BLOCK_N=bn, num_warps=warps, BLOCK_G=block_g,
                                       SPLIT_K=split)
                            try:
                                us = time_calls([lambda w=w, c=cfg, x=x: quant_gemm_swap(x, w, c)
                                                 for w in ws])
                            except Exception as e:  # out of registers / shared memory
                                print(f"  swap {cfg}: {type(e).__name__}")
                                continue
                            best = min(best, (us, cfg), key=lambda b: b[0])
            row["swap_best_us"], row["swap_best"] = best
        for key in ("gemm", "swap", "dense"):
            row[f"{key}_GBps"] = round(nbytes / row[f"{key}_us"] / 1e3)
        print(f"{tname} K={k:5d} N={n:6d} M={m:4d}  gemm {row['gemm_us']:7.1f}  swap "
              f"{row['swap_us']:7.1f}  dense {row['dense_us']:7.1f} (dequant "
              f"{row['dequant_us']:6.1f} + bf16 gemm {row['bf16_gemm_us']:6.1f} S={row['split_k']}"
              f", parts {row['bf16_parts_us']:6.1f} S={row['split_k_parts']}; cublas "
              f"{row['cublas_us']:6.1f})"
              + (f"  swap best {row['swap_best_us']:7.1f} {row['swap_best']}" if sweep else ""),
              flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
    del ws, dense
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--only", default=None, help="only shapes with this K or N, e.g. 1152")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = open(args.json, "a") if args.json else None
    print(torch.cuda.get_device_name(0))
    for tname, k, n in SHAPES:
        if args.only and int(args.only) not in (k, n):
            continue
        bench(tname, k, n, gen, batches, args.sweep and k != 640 and n != 640, out)


if __name__ == "__main__":
    main()
