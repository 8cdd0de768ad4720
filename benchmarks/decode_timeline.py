"""Single-stream decode on a GPU: tg with chained bursts off and on (one process, alternating
runs), and where a decode step's GPU time goes, kernel by kernel.

    python benchmarks/decode_timeline.py MODEL.gguf [-n 128] [-r 4] [--kernels 24]

A kernel's "inc" is how far it moves the end of the GPU's work: its cost on the critical path.
With programmatic dependent launch a kernel starts before the previous one ends and waits on the
GPU, so its duration overstates that. Gaps longer than 10 us are the GPU waiting for the host.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time

import torch

from llcuda.config import EngineConfig
from llcuda.engine.loader import load
from llcuda.sampling_params import SamplingParams

STEP_START = "_dequant_rows_kernel"  # the embedding gather: the first kernel of a decode step


def decode_rate(engine, n: int) -> float:
    """tok/s of one request of a one-token prompt generating n greedy tokens, from submission."""
    t0 = time.perf_counter()
    engine.add_request([1234], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def kernel_records(engine, n: int) -> list[tuple[float, float, str]]:
    """(start us, duration us, name) of every kernel of one decode_rate(engine, n) run."""
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        decode_rate(engine, n)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    return sorted((e["ts"], e["dur"], e["name"]) for e in events if e.get("cat") == "kernel")


def idle_gaps(kernels: list[tuple[float, float, str]], min_us: float = 10.0) -> list[float]:
    gaps, end = [], kernels[0][0]
    for ts, dur, _ in kernels:
        if ts - end > min_us:
            gaps.append(ts - end)
        end = max(end, ts + dur)
    return gaps


def step_profile(kernels: list[tuple[float, float, str]]) -> list[tuple[str, float]]:
    """(name, mean inc in us) per kernel position of a decode step, over the steps of the most
    common length, the first and last two left out."""
    steps, current = [], []
    for k in kernels:
        if STEP_START in k[2] and current:
            steps.append(current)
            current = []
        current.append(k)
    length = collections.Counter(len(s) for s in steps).most_common(1)[0][0]
    steps = [s for s in steps[2:-2] if len(s) == length]
    incs = collections.defaultdict(list)
    for step in steps:
        end = step[0][0] + step[0][1]
        for i, (ts, dur, _) in enumerate(step[1:]):
            incs[i].append(max(0.0, ts + dur - end))
            end = max(end, ts + dur)
    names = [name for _, _, name in steps[0][1:]]
    return [(names[i], statistics.mean(incs[i])) for i in range(len(names))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("-n", type=int, default=128, help="tokens per request")
    ap.add_argument("-r", type=int, default=4, help="runs per setting")
    ap.add_argument("--kernels", type=int, default=24, help="kernels of the step to list")
    args = ap.parse_args()
    config = EngineConfig(ctx_size=1024, batch_size=512, ubatch_size=512, n_parallel=1,
                          device="cuda")  # fmt: skip
    loaded = load(args.model, config, verbose=False)
    engine = loaded.llm_engine
    try:
        chained = engine._chain  # the engine's own choice: chained bursts on a GPU
        rates = {False: [], True: []}
        for setting in (False, True):  # warm both paths
            engine._chain = setting and chained
            decode_rate(engine, 40)
        for i in range(2 * args.r):
            setting = bool(i % 2)
            engine._chain = setting and chained
            rates[setting].append(decode_rate(engine, args.n))
        for setting, label in ((False, "one burst at a time"), (True, "chained bursts")):
            print(f"tg{args.n} {label}: " + " / ".join(f"{r:,.0f}" for r in rates[setting])
                  + " tok/s")
        for setting in (False, True):
            engine._chain = setting and chained
            kernels = kernel_records(engine, args.n)
            gaps = idle_gaps(kernels)
            span = (max(ts + dur for ts, dur, _ in kernels) - kernels[0][0]) / 1e3
            print(f"chained={setting}: {len(kernels)} kernels over {span:.1f} ms, GPU idle "
                  f"{sum(gaps) / 1e3:.2f} ms in {len(gaps)} gaps")
        profile = step_profile(kernels)
        print(f"one decode step (chained): {len(profile) + 1} kernels, "
              f"{sum(inc for _, inc in profile):.0f} us after the embedding gather")
        shown = profile[: args.kernels] + [("...", float("nan"))] + profile[-3:]
        for name, inc in shown:
            print(f"  {name.replace('void ', '')[:70]:70s} {inc:7.1f} us")
    finally:
        loaded.close()


if __name__ == "__main__":
    main()
