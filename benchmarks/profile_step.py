"""Where a decode step's time goes, per batch size: the GPU (graph replay alone), the host
(scheduler, input preparation, sampling, detokenization) and, for one batch size, the kernels.

    python benchmarks/profile_step.py MODEL.gguf [-npl 1,16,64,128] [--kernels 64] [--prefill 512]

--prefill N instead times one N-token prompt through the engine (llama-bench's pp) and prints
where it goes: the CUDA kernels and the host-side operators, from torch.profiler.
"""

from __future__ import annotations

import argparse
import time

import torch

from llcuda.config import EngineConfig
from llcuda.engine.loader import load
from llcuda.sampling_params import SamplingParams


def graph_replay_ms(graphs, bucket: int, reps: int = 30) -> float:
    graph = graphs.graphs[bucket]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def profile_prefill(model: str, n: int) -> None:
    config = EngineConfig(ctx_size=n + 8, batch_size=max(n, 512), ubatch_size=max(n, 512),
                          n_parallel=1, device="cuda")
    loaded = load(model, config, verbose=False)
    engine = loaded.llm_engine
    gen = torch.Generator().manual_seed(0)
    vocab = loaded.model_config.vocab_size

    def one_prompt() -> float:
        t0 = time.perf_counter()
        engine.add_request(torch.randint(10, vocab, (n,), generator=gen).tolist(),
                           SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    one_prompt(), one_prompt()  # compile
    wall = sorted(one_prompt() for _ in range(5))[2]
    print(f"pp{n}: {wall:.2f} ms per prompt ({n / wall * 1e3:,.0f} tok/s), median of 5", flush=True)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        one_prompt()
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
    print(table.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    # the host side in Python terms: which functions hold the step up
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(one_prompt)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    loaded.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("-npl", default="1,16,64,128")
    ap.add_argument("--kernels", type=int, default=64, help="batch size for the kernel table")
    ap.add_argument("--prefill", type=int, default=0, help="profile one prompt of this length")
    ap.add_argument("--no-dense", action="store_true",
                    help="keep large batches on the fused kernel (no bf16 workspace + GEMM)")
    args = ap.parse_args()
    if args.no_dense:
        from llcuda.kernels import matmul_path

        matmul_path.DENSE_MIN_M = matmul_path.SWAP_MIN_M = 1 << 30
    if args.prefill:
        profile_prefill(args.model, args.prefill)
        return
    batches = [int(b) for b in args.npl.split(",")]
    config = EngineConfig(
        ctx_size=300, batch_size=4096, ubatch_size=512, n_parallel=max(batches), device="cuda"
    )
    loaded = load(args.model, config, verbose=False)
    engine = loaded.llm_engine
    runner = engine.model_runner
    vocab = loaded.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    for b in batches:
        params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        requests = [
            engine.scheduler.requests[engine.add_request(
                torch.randint(10, vocab, (128,), generator=gen).tolist(), params)]
            for _ in range(b)
        ]  # fmt: skip
        while min(r.num_output_tokens for r in requests) == 0:
            engine.step()
        torch.cuda.synchronize()
        # decode iterations, not engine.step() calls: a step may run a burst of several. Tokens
        # are counted when sampled (the requests' counts), not when a later step hands them out.
        start, t0 = sum(r.num_output_tokens for r in requests), time.perf_counter()
        while sum(r.num_output_tokens for r in requests) < b * params.max_tokens:
            engine.step()
        tokens = b * params.max_tokens - start
        step_ms = (time.perf_counter() - t0) * 1e3 / (tokens / b)
        while engine.has_unfinished_requests():
            engine.step()
        bucket = runner.graphs.bucket_for(b)
        gpu_ms = graph_replay_ms(runner.graphs, bucket)
        print(
            f"B={b:4d}: engine step {step_ms:6.2f} ms ({b / step_ms * 1e3:8.0f} tok/s), "
            f"graph replay (bucket {bucket}) {gpu_ms:6.2f} ms, "
            f"host+sync {step_ms - gpu_ms:6.2f} ms",
            flush=True,
        )

    # kernel table of one eager decode step at --kernels rows
    b = args.kernels
    graphs = runner.graphs
    with torch.inference_mode():
        graphs._step(b)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            graphs._step(b)
            torch.cuda.synchronize()
    print(f"kernels of one eager decode step at B={b} (padding rows in the scratch block):")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    )
    loaded.close()


if __name__ == "__main__":
    main()
