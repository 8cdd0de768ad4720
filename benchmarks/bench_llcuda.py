"""llama-bench-style numbers for llcuda (see llcuda.bench): prints a table and one JSON line.

    python benchmarks/bench_llcuda.py MODEL.gguf [-p 512] [-n 128] [-r 3] [-d 0] [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from llcuda.bench import run_bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-d", "--depth", type=int, default=0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    result = run_bench(args.model, args.n_prompt, args.n_gen, args.reps, args.depth, args.device)
    print(result.markdown())
    print(json.dumps({**dataclasses.asdict(result), "weight_gb_s": result.weight_gb_s}))


if __name__ == "__main__":
    main()
