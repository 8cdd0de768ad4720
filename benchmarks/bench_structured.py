"""Constrained (one JSON schema for every request) against free decoding, in the engine.

B requests of npp random prompt tokens each generate ntg tokens (greedy): free ones with
ignore_eos, constrained ones under a schema that cannot end before ntg tokens (an array of
`--items` integers). Prints tok/s of both, their ratio (issue 19's target: constrained within 10%
of free), and the host time spent filling masks per step (llguidance, on the host, after the
forward pass is queued: on a GPU it overlaps the step). Appends one JSON line to --out.

    python benchmarks/bench_structured.py MODEL.gguf [-npl 1,16,64] [-ntg 128] [--device cuda]
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
from llcuda.structured import StructuredOutput
from llcuda.structured import bitmask as bitmask_module


def schema(items: int) -> dict:
    return {"type": "object", "properties": {"values": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
        "minItems": items, "maxItems": items}}, "required": ["values"]}  # fmt: skip


def run(engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    """(seconds, tokens generated) for the batch to finish."""
    sync_device()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    sync_device()
    return time.perf_counter() - t0, sum(len(o.new_token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("-npp", type=int, default=64)
    ap.add_argument("-ntg", type=int, default=128)
    ap.add_argument("-npl", default="1,16,64")
    ap.add_argument("--items", type=int, default=100, help="integers the schema's array holds")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="benchmarks/results.jsonl")
    args = ap.parse_args()
    npl = [int(x) for x in args.npl.split(",")]
    config = EngineConfig(ctx_size=args.npp + args.ntg + 8, n_parallel=max(npl),
                          batch_size=2048, device=args.device)  # fmt: skip
    loaded = load(args.model, config, verbose=False)
    engine = loaded.llm_engine
    fill_time = [0.0, 0]  # seconds in fill_bitmask, calls

    fill = bitmask_module.fill_bitmask

    def timed_fill(states, device):
        t = time.perf_counter()
        out = fill(states, device)
        if out is not None:
            fill_time[0] += time.perf_counter() - t
            fill_time[1] += 1
        return out

    import llcuda.runner.model_runner as model_runner

    model_runner.fill_bitmask = timed_fill
    constraint = StructuredOutput.json_schema(schema(args.items))
    free = SamplingParams(max_tokens=args.ntg, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.ntg, temperature=0.0, structured=constraint)
    gen = torch.Generator().manual_seed(0)
    vocab = loaded.model_config.vocab_size
    run(engine, [[1, 2, 3]], constrained)  # warm-up: the vocabulary's build, graphs, kernels
    print(f"{'B':>4} {'free tok/s':>11} {'json tok/s':>11} {'ratio':>6} {'mask ms/step':>13}")
    for b in npl:
        prompts = [torch.randint(10, vocab, (args.npp,), generator=gen).tolist()
                   for _ in range(b)]  # fmt: skip
        t_free, n_free = run(engine, prompts, free)
        fill_time[:] = [0.0, 0]
        t_json, n_json = run(engine, prompts, constrained)
        mask_ms = 1000 * fill_time[0] / max(fill_time[1], 1)
        row = {"bench": "structured", "model": args.model, "device": str(engine.device), "B": b,
               "npp": args.npp, "ntg": args.ntg, "free_tok_s": n_free / t_free,
               "json_tok_s": n_json / t_json, "mask_ms_per_step": mask_ms}  # fmt: skip
        print(f"{b:>4} {row['free_tok_s']:>11.1f} {row['json_tok_s']:>11.1f} "
              f"{row['json_tok_s'] / row['free_tok_s']:>6.2f} {mask_ms:>13.3f}")
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    loaded.close()


if __name__ == "__main__":
    main()
