"""What log-probs cost: batched greedy decode with and without SamplingParams.logprobs.

For each B and each mode, B requests of npp random prompt tokens decode ntg tokens together
(ignore_eos); S_TG is the tokens sampled after every request's first one over that time, as in
batched_bench.py. Modes: none; every row with logprobs 0 (the chosen token's), 5 and 20; half the
rows with 5 (a mixed batch). The overhead column is against `none` at the same B, in one run.

    python benchmarks/bench_logprobs.py MODEL.gguf [-npp 128] [-ntg 128] [-npl 1,16,64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batched_bench import run_batch  # noqa: E402

from llcuda.config import EngineConfig
from llcuda.engine.loader import load
from llcuda.sampling_params import SamplingParams

MODES = {"none": None, "k=0": 0, "k=5": 5, "k=20": 20, "half k=5": "half"}


def _params(mode, b: int, ntg: int) -> list[SamplingParams]:
    def ks(i: int) -> int | None:
        return (5 if i % 2 == 0 else None) if mode == "half" else mode

    return [SamplingParams(max_tokens=ntg, temperature=0.0, ignore_eos=True, logprobs=ks(i))
            for i in range(b)]  # fmt: skip


def decode_rate(engine, prompts: list[list[int]], params: list[SamplingParams]) -> float:
    """S_TG: tokens sampled after every request's first one over that time (batched_bench)."""
    _, t_tg, n_tg = run_batch(engine, prompts, params[0].max_tokens, params)
    return n_tg / t_tg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("-npp", type=int, default=128)
    ap.add_argument("-ntg", type=int, default=128)
    ap.add_argument("-npl", default="1,16,64")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.npl.split(",")]
    config = EngineConfig(ctx_size=args.npp + args.ntg + 8, batch_size=2048, ubatch_size=512,
                          n_parallel=max(batches), device=args.device)  # fmt: skip
    loaded = load(args.model, config, verbose=False)
    engine = loaded.llm_engine
    gen = torch.Generator().manual_seed(0)
    vocab = loaded.model_config.vocab_size

    def prompts(n: int) -> list[list[int]]:
        return [torch.randint(10, vocab, (args.npp,), generator=gen).tolist() for _ in range(n)]

    for mode in MODES.values():  # warm-up: every decode bucket, every topk width
        decode_rate(engine, prompts(max(batches)), _params(mode, max(batches), 4))
    print(f"{loaded.model_config.name} on {loaded.device}, npp {args.npp}, ntg {args.ntg}")
    print("|    B | logprobs  | S_TG t/s | overhead |")
    print("|------|-----------|----------|----------|")
    rows = []
    for b in batches:
        base = None
        for name, mode in MODES.items():
            s_tg = decode_rate(engine, prompts(b), _params(mode, b, args.ntg))
            base = s_tg if base is None else base
            overhead = 100.0 * (base / s_tg - 1.0)
            print(f"| {b:4d} | {name:9s} | {s_tg:8.1f} | {overhead:7.1f}% |", flush=True)
            rows.append({"B": b, "mode": name, "s_tg": s_tg, "overhead_pct": overhead})
    print(json.dumps({"bench": "logprobs", "model": loaded.model_config.name,
                      "device": str(loaded.device), "npp": args.npp, "ntg": args.ntg,
                      "rows": rows}))  # fmt: skip
    loaded.close()


if __name__ == "__main__":
    main()
