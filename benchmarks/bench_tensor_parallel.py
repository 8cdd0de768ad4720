"""Tensor parallelism against one GPU and against llama.cpp's multi-GPU splits, one model.

    python benchmarks/bench_tensor_parallel.py --shape gemma3-12b [--tp 1 2] [-p 512] [-n 128]
        [--llama-bench /tmp/peer/llama-bench]   # adds llama.cpp's -sm layer and -sm row

--shape writes a random-weight Gemma 3 twin in the Q4_K_M mix (gemma3-12b ~7 GB, gemma3-27b
~16 GB; its output is noise, its speed the real file's) unless --model gives a file. Each
tensor-parallel size loads the model afresh (llcuda.bench.run_bench); prints one markdown table
and one JSON line per run, and the TP speed-ups over the first size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import tempfile
from pathlib import Path

from llcuda.bench import run_bench
from llcuda.gguf.synthetic import TINY, write_gemma3_gguf

# Gemma 3 12B / 27B (their config.json): both split at TP 2 on 256-element K-quant blocks
# (attn_output's 4096 inputs, ffn_down's 15360 / 21504)
SHAPES = {
    "gemma3-12b": dict(n_embd=3840, n_layers=48, n_ff=15360, n_head=16, n_kv_head=8,
                       head_dim=256, vocab_size=262144, sliding_window_pattern=6),
    "gemma3-27b": dict(n_embd=5376, n_layers=62, n_ff=21504, n_head=32, n_kv_head=16,
                       head_dim=128, vocab_size=262144, sliding_window_pattern=6),
    "tiny": {**TINY, "mix": "Q8_0"},  # a CPU check of this script (Q8_0: splits at TP 2)
}  # fmt: skip


def llama_bench(binary: str, model: str, n_prompt: int, n_gen: int, split: str) -> dict:
    """llama-bench -sm SPLIT over every visible GPU: {"pp": tok/s, "tg": tok/s}."""
    cmd = [binary, "-m", model, "-ngl", "99", "-fa", "1", "-p", str(n_prompt), "-n", str(n_gen),
           "-r", "3", "-sm", split, "-o", "json"]  # fmt: skip
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    rates = {}
    for row in rows:
        kind = "pp" if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0 else "tg"
        rates[kind] = row["avg_ts"]
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a .gguf file (else --shape writes one)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gemma3-12b")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--llama-bench", default=None, help="llama-bench binary for -sm layer/row")
    args = ap.parse_args()
    model = args.model
    if model is None:
        out = Path(tempfile.mkdtemp()) / f"{args.shape}.gguf"
        model = str(write_gemma3_gguf(out, **SHAPES[args.shape]))
    results = {}
    for tp in args.tp:
        r = run_bench(model, args.n_prompt, args.n_gen, args.reps, 0, args.device, 99, tp)
        results[tp] = r
        print(f"tensor_parallel_size {tp}")
        print(r.markdown())
        print(json.dumps({**dataclasses.asdict(r), "tensor_parallel_size": tp}))
    base = results[args.tp[0]]
    for tp, r in results.items():
        print(f"TP {tp} / TP {args.tp[0]}: pp {r.pp_tok_s / base.pp_tok_s:.2f}x, "
              f"tg {r.tg_tok_s / base.tg_tok_s:.2f}x")  # fmt: skip
    if args.llama_bench:
        for split in ("layer", "row"):
            rates = llama_bench(args.llama_bench, model, args.n_prompt, args.n_gen, split)
            print(json.dumps({"peer": "llama.cpp", "split_mode": split, **rates}))
            for tp, r in results.items():
                print(
                    f"llcuda TP {tp} / llama.cpp -sm {split}: pp "
                    f"{r.pp_tok_s / rates['pp']:.2f}x, tg {r.tg_tok_s / rates['tg']:.2f}x"
                )


if __name__ == "__main__":
    main()
