"""The low-bit kernels (llcuda.kernels.quant_lowbit: Q2_K, Q3_K, IQ4_NL, IQ4_XS and the IQ grid
types) on Llama 3.1 8B shapes, next to the tuned Q4_K kernels on the same shape.

    python benchmarks/bench_lowbit.py [--types Q3_K,IQ4_XS] [--json out.jsonl]

Per (type, K, N, M): quant_matmul's time in us (median of CUDA-graph replays over several weight
copies, as bench_quant_matmul.py measures), GB/s of packed weight bytes (the decode roofline:
~3.35 TB/s on H100 SXM) and TFLOP/s; the Q4_K row of each shape is the reference point.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant_matmul import L2_BYTES, TARGET_BYTES, time_calls  # noqa: E402

from llcuda.gguf.constants import QUANT_SIZES, GGMLType  # noqa: E402
from llcuda.kernels import quant_pack as qp  # noqa: E402
from llcuda.kernels.quant_matmul import quant_matmul  # noqa: E402

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (4096, 128256)]
BATCHES = [1, 4, 16, 512]
TYPES = ["Q4_K", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
         "IQ3_S", "IQ1_S", "IQ1_M", "TQ2_0", "MXFP4"]  # fmt: skip
_F16 = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "TQ2_0": [64], "TQ1_0": [52],
        "IQ1_M": [], "MXFP4": []}  # fmt: skip


def random_rows(t: GGMLType, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    elems, bb = QUANT_SIZES[t]
    raw = torch.randint(0, 256, (n, k // elems, bb), generator=gen, device="cuda",
                        dtype=torch.uint8)  # fmt: skip
    for off in _F16.get(t.name, [0]):
        s = torch.rand((n, k // elems, 1), generator=gen, device="cuda") * 0.02 + 0.002
        raw[..., off : off + 2] = s.half().view(torch.uint8)
    if t == GGMLType.MXFP4:
        raw[..., 0] = 120
    return raw.reshape(n, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--json", default=None, help="append one JSON line per row to this file")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{'type':<8} {'K':>6} {'N':>7} {'M':>4} {'us':>9} {'GB/s':>7} {'TFLOP/s':>8}")
    for k, n in SHAPES:
        for name in args.types.split(","):
            t = GGMLType[name]
            w0 = qp.pack_weight(random_rows(t, n, k, gen), int(t), k)
            copies = max(1, min(64, -(-TARGET_BYTES // w0.nbytes)))
            ws = [w0] + [qp.pack_weight(random_rows(t, n, k, gen), int(t), k)
                         for _ in range(copies - 1)]  # fmt: skip
            for m in BATCHES if n < 100_000 else BATCHES[:3]:
                x = torch.randn((m, k), generator=gen, device="cuda")
                us = time_calls([lambda w=w, x=x: quant_matmul(x, w) for w in ws])
                row = {"type": name, "K": k, "N": n, "M": m, "us": round(us, 2),
                       "GBps": round(w0.nbytes / us / 1e3, 1),
                       "TFLOPs": round(2 * m * n * k / us / 1e6, 2),
                       "l2_resident": copies * w0.nbytes < 2 * L2_BYTES,
                       "device": torch.cuda.get_device_name()}  # fmt: skip
                print(f"{name:<8} {k:>6} {n:>7} {m:>4} {us:>9.1f} {row['GBps']:>7.0f} "
                      f"{row['TFLOPs']:>8.2f}")  # fmt: skip
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
            del ws


if __name__ == "__main__":
    main()
