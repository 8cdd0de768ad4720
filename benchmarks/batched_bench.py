"""Engine-level batched decode, the llama-batched-bench experiment on llcuda.

For each B: B requests of npp random prompt tokens are submitted together, each generates ntg
tokens (greedy, ignore_eos). PP is the time until every request has sampled its first token; TG
is the time from then until the last token is sampled. S_TG = tokens generated after the prefill /
TG time, summed over all B sequences (llama-batched-bench's S_TG); S = all tokens / total time.

    python benchmarks/batched_bench.py MODEL.gguf [-npp 128] [-ntg 128] [-npl 1,4,8,...]
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


def run_batch(engine, prompts: list[list[int]], ntg: int,
              params: list[SamplingParams] | None = None) -> tuple[float, float, int]:  # fmt: skip
    """Returns (prefill seconds, decode seconds, tokens generated during decode) of one request
    per prompt, greedy, or with `params` (one per prompt, each of max_tokens ntg). Counts come
    from the requests after every step, i.e. when tokens are sampled: a step hands out the
    previous step's tokens (overlapped output processing) and a decode burst samples many at
    once, so counting delivered tokens would credit the first burst to the decode time after it
    (13% too high at ntg 128, the fifth session's numbers; BENCHMARKS.md)."""
    if params is None:
        params = [SamplingParams(max_tokens=ntg, temperature=0.0, ignore_eos=True)] * len(prompts)
    sync_device()
    t0 = time.perf_counter()
    requests = [engine.scheduler.requests[engine.add_request(p, sp)]
                for p, sp in zip(prompts, params, strict=True)]  # fmt: skip
    t_first = first_count = None
    while engine.has_unfinished_requests():
        engine.step()
        counts = [r.num_output_tokens for r in requests]
        if t_first is None and min(counts) >= 1:
            t_first, first_count = time.perf_counter(), sum(counts)
        if t_first is not None and sum(counts) == len(requests) * ntg:
            break  # every token sampled; the remaining steps only hand them out
    sync_device()
    t_end = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return t_first - t0, t_end - t_first, len(requests) * ntg - first_count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("-npp", type=int, default=128)
    ap.add_argument("-ntg", type=int, default=128)
    ap.add_argument("-npl", default="1,4,8,16,32,64,128")
    ap.add_argument("-b", "--batch-size", type=int, default=2048)
    ap.add_argument("-ub", "--ubatch-size", type=int, default=512)
    ap.add_argument("--device", default=None)
    ap.add_argument("--decode-steps", type=int, default=None,
                    help="EngineConfig.num_scheduler_steps (default: the engine's choice)")
    args = ap.parse_args()
    batches = [int(b) for b in args.npl.split(",")]
    config = EngineConfig(
        ctx_size=args.npp + args.ntg + 8,
        batch_size=args.batch_size,
        ubatch_size=args.ubatch_size,
        n_parallel=max(batches),
        device=args.device,
        num_scheduler_steps=args.decode_steps,
    )
    t0 = time.perf_counter()
    loaded = load(args.model, config, verbose=False)
    print(f"loaded in {time.perf_counter() - t0:.1f} s on {loaded.device}", flush=True)
    engine = loaded.llm_engine
    gen = torch.Generator().manual_seed(0)
    vocab = loaded.model_config.vocab_size

    def prompts(n: int) -> list[list[int]]:
        return [torch.randint(10, vocab, (args.npp,), generator=gen).tolist() for _ in range(n)]

    run_batch(engine, prompts(max(batches)), 4)  # warm-up: prefill shapes, every decode bucket
    print(
        "|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s "
        "|   T_TG s | S_TG t/s |      T s |    S t/s |"
    )
    print(
        "|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|"
    )
    rows = []
    for b in batches:
        t_pp, t_tg, n_tg = run_batch(engine, prompts(b), args.ntg)
        s_pp, s_tg = b * args.npp / t_pp, n_tg / t_tg
        total = b * (args.npp + args.ntg) / (t_pp + t_tg)
        print(
            f"| {args.npp:5d} | {args.ntg:6d} | {b:4d} | {b * (args.npp + args.ntg):6d} "
            f"| {t_pp:8.3f} | {s_pp:8.2f} | {t_tg:8.3f} | {s_tg:8.2f} | {t_pp + t_tg:8.3f} "
            f"| {total:8.2f} |",
            flush=True,
        )
        rows.append({"B": b, "t_pp": t_pp, "s_pp": s_pp, "t_tg": t_tg, "s_tg": s_tg, "s": total})
    print(
        json.dumps({"model": loaded.model_config.name, "device": str(loaded.device), "rows": rows})
    )
    loaded.close()


if __name__ == "__main__":
    main()
