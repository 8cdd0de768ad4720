"""llama-bench-style numbers for llcuda: pp (prompt tokens/s) and tg (generated tokens/s).

    python benchmarks/bench_llcuda.py MODEL.gguf [-p 512] [-n 128] [-r 3] [--depth 0]

pp: one request of p random prompt tokens, timed from submission until its first token.
tg: one request generating n tokens (greedy, ignore_eos) after a `depth`-token prompt; the rate
counts the n - 1 steps after the first token. Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llcuda.config import EngineConfig
from llcuda.engine.loader import load
from llcuda.sampling_params import SamplingParams


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _run(engine, prompt: list[int], max_tokens: int) -> list[float]:
    """Run one request to completion; returns the wall time at which each token appeared."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request(prompt, params)
    stamps: list[float] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            stamps.extend(time.perf_counter() for _ in out.new_token_ids)
    _sync()
    return stamps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-d", "--depth", type=int, default=0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    ctx = max(args.n_prompt, args.depth) + args.n_gen + 8
    config = EngineConfig(
        ctx_size=ctx, batch_size=max(args.n_prompt, 512), ubatch_size=max(args.n_prompt, 512),
        n_parallel=1, device=args.device,
    )
    t0 = time.perf_counter()
    loaded = load(args.model, config, verbose=False)
    load_s = time.perf_counter() - t0
    engine = loaded.llm_engine
    gen = torch.Generator().manual_seed(0)
    vocab = loaded.model_config.vocab_size

    def tokens(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=gen).tolist()

    _run(engine, tokens(16), 4)  # warm-up: compile kernels, touch every weight
    pp, tg = [], []
    for _ in range(args.reps):
        t = time.perf_counter()
        _run(engine, tokens(args.n_prompt), 1)
        pp.append(args.n_prompt / (time.perf_counter() - t))
        stamps = _run(engine, tokens(max(args.depth, 1)), args.n_gen)
        tg.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    name = loaded.model_config.name
    weights = loaded.memory.get("weights", 0)
    tg_mean = statistics.mean(tg)
    row = {
        "model": name, "device": loaded.device, "load_s": round(load_s, 2),
        f"pp{args.n_prompt}": round(statistics.mean(pp), 1),
        f"tg{args.n_gen}": round(tg_mean, 1), "depth": args.depth,
        "weight_GBps": round(weights * tg_mean / 1e9, 1),
    }
    print(f"| model | device | pp{args.n_prompt} tok/s | tg{args.n_gen} tok/s | weight GB/s |")
    print("|---|---|---:|---:|---:|")
    print(f"| {name} | {loaded.device} | {row[f'pp{args.n_prompt}']:,} | {row[f'tg{args.n_gen}']:,}"
          f" | {row['weight_GBps']} |")
    print(json.dumps(row))
    loaded.close()


if __name__ == "__main__":
    main()
