"""`llcuda serve` with the forward pass replaced by a fixed sleep: what the server itself costs.

    python benchmarks/server_overhead.py MODEL [--step-ms 4] [--port 8932] [-np 64]
    python ../shared/peer/http_load.py http://127.0.0.1:8932 --clients 64 --requests 2 \\
        --prompt-words 100 --max-tokens 128

Each engine step sleeps --step-ms (4 ms: the 1B twin's B=64 decode step on an H100) and samples
random tokens, so the throughput the load client sees is bounded by the engine loop, the event
loop and HTTP/SSE alone. Runs on the CPU (any small GGUF, e.g. `python -m
llcuda.gguf.synthetic tiny.gguf --preset tiny`).
"""

from __future__ import annotations

import argparse
import time

import torch

from llcuda import InferenceEngine
from llcuda.runner.model_runner import SampledTokens
from llcuda.server.app import make_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--step-ms", type=float, default=4.0)
    ap.add_argument("--port", type=int, default=8932)
    ap.add_argument("-np", "--n-parallel", type=int, default=64)
    args = ap.parse_args()
    engine = InferenceEngine()
    engine.load_model(args.model, n_parallel=args.n_parallel, ctx_size=4096, batch_size=8192,
                      device="cpu")
    runner = engine._loaded.llm_engine.model_runner
    vocab = engine.model_info()["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def launch(step) -> SampledTokens:
        sampled = [item for item in step.scheduled if item.sample]
        time.sleep(args.step_ms / 1000.0)
        ids = torch.randint(10, vocab, (len(sampled),), generator=gen)
        return SampledTokens([item.request.request_id for item in sampled], ids)

    runner.launch = launch
    runner.execute_model = lambda step: launch(step).result()
    make_server(engine, "127.0.0.1", args.port, log_level="warning").run()


if __name__ == "__main__":
    main()
