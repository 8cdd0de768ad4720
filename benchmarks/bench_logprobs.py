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
import time

import torch

from llcuda.bench import sync_device
from llcuda.config import EngineConfig
from llcuda.engine.loader import load
from llcuda.sampling_params import SamplingParams

MODES = {"none": None, "k=0": 0, "k=5": 5, "k=20": 20, "half k=5": "half"}


def _params(mode, b: int, ntg: int) -> list[SamplingParams]:
    def ks(i: int) -> int | None:
        return (5 if i % 2 == 0 else None) if mode == "half" else mode

    return [SamplingParams(max_tokens=ntg, temperature=0.0, ignore_eos=True, logprobs=ks(i))
            for i in range(b)]  # fmt: skip


def run_batch(engine, prompts: list[list[int]], params: list[SamplingParams]) -> float:
    """Decode tokens per second after every request's first token (batched_bench's S_TG)."""
    ntg = params[0].max_tokens
    sync_device()
    requests = [engine.scheduler.requests[engine.add_request(p, sp)]
                for p, sp in zip(prompts, params, strict=True)]  # fmt: skip
    t_first = first_count = None
    while engine.has_unfinished_requests():
        engine.step()
        counts = [r.num_output_tokens for r in requests]
        if t_first is None and min(counts) >= 1:
            t_first, first_count = time.perf_counter(), sum(counts)
        if t_first is not None and sum(counts) == len(requests) * ntg:
            break
    sync_device()
    t_end = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return (len(requests) * ntg - first_count) / (t_end - t_first)


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
        run_batch(engine, prompts(max(batches)), _params(mode, max(batches), 4))
    print(f"{loaded.model_config.name} on {loaded.device}, npp {args.npp}, ntg {args.ntg}")
    print("|    B | logprobs  | S_TG t/s | overhead |")
    print("|------|-----------|----------|----------|")
    rows = []
    for b in batches:
        base = None
        for name, mode in MODES.items():
            s_tg = run_batch(engine, prompts(b), _params(mode, b, args.ntg))
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
