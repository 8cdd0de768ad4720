"""The engine's host work per step, with the model replaced by a runner that answers at once.

    python benchmarks/engine_host_time.py MODEL [-npl 1,64,128] [--steps 16]

B requests of a 128-token prompt each generate 128 tokens (greedy, ignore_eos) in decode bursts
of --steps, with output processing overlapped as on a GPU. The runner returns made-up tokens
without computing anything, so what is timed is the scheduler, the burst planning, the token
bookkeeping and the detokenizer with the model's real tokenizer. On a GPU everything but
`_process_held` (which runs while a burst computes) sits between two bursts with the GPU idle.
Runs on the CPU with any GGUF (e.g. `python -m llcuda.gguf.synthetic tiny.gguf --preset tiny`).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from llcuda.config import EngineConfig
from llcuda.engine.llm_engine import _Ready
from llcuda.engine.loader import load
from llcuda.sampling_params import SamplingParams


class InstantRunner:
    """The loaded runner's attributes, but launch() samples made-up tokens at once."""

    supports_decode_bursts = True

    def __init__(self, runner):
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def launch(self, step, num_steps: int = 1) -> _Ready:
        sampled = {}
        for item in step.scheduled:
            if item.sample:
                tokens = [300 + (item.start_pos + j) % 500 for j in range(num_steps)]
                sampled[item.request_id] = tokens if num_steps > 1 else tokens[0]
        return _Ready(sampled)


def _timed(owner, name: str, totals: dict[str, float]) -> None:
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def measure(model: str, batch: int, steps: int) -> None:
    config = EngineConfig(ctx_size=512, batch_size=8192, ubatch_size=8192, n_parallel=batch,
                          device="cpu", num_scheduler_steps=steps)  # fmt: skip
    loaded = load(model, config, verbose=False)
    engine = loaded.llm_engine
    engine.model_runner = InstantRunner(engine.model_runner)
    engine._overlap = True  # as on a GPU
    totals: dict[str, float] = defaultdict(float)
    for owner, name in ((engine.scheduler, "schedule"), (engine, "_burst_length"),
                        (engine.scheduler, "update_from_output"), (engine, "_process_held")):
        _timed(owner, name, totals)  # fmt: skip
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)

    def run() -> tuple[float, int]:
        for _ in range(batch):
            engine.add_request(list(range(10, 138)), params)
        calls, start = 0, time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            calls += 1
        return time.perf_counter() - start, calls

    run()  # warm-up
    totals.clear()
    seconds, calls = run()
    split = ", ".join(f"{name} {t / calls * 1e3:.2f}" for name, t in totals.items())
    print(f"B={batch:4d}: {calls} steps, {seconds / calls * 1e3:.2f} ms host per step ({split})",
          flush=True)  # fmt: skip
    loaded.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("-npl", default="1,64,128")
    ap.add_argument("--steps", type=int, default=16, help="decode burst length")
    args = ap.parse_args()
    for batch in (int(b) for b in args.npl.split(",")):
        measure(args.model, batch, args.steps)


if __name__ == "__main__":
    main()
