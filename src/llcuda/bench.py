"""llama-bench-style throughput: pp (prompt tokens/s) and tg (generated tokens/s).

pp: one request of n_prompt random prompt tokens, timed from submission until its first token is
sampled (one prefill step when n_prompt <= batch_size). tg: one request generating n_gen tokens
(greedy, ignore_eos). At depth 0 its prompt is one token, whose step is a decode like the rest, so
tg is n_gen over the whole request: llama-bench's tg (n_gen one-token decodes from an empty
context). At depth d > 0 the d-token prompt is prefilled first and tg counts the tokens sampled
after the prefill's over the time after it. Both run through the whole engine (scheduler, runner,
sampler), as a user's request would.

Times are taken when the engine has *sampled* a token (the request's count after each step), not
when it hands the token out: with overlapped output processing a step delivers the previous step's
tokens, and a decode burst samples many at once, so delivery times credit a burst's tokens to the
time after it (the fifth session's tg numbers were 13% high this way; BENCHMARKS.md).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from llcuda.config import EngineConfig
from llcuda.engine.loader import load
from llcuda.sampling_params import SamplingParams


@dataclass
class BenchResult:
    model: str
    device: str
    load_s: float
    n_prompt: int
    n_gen: int
    depth: int
    pp_tok_s: float
    tg_tok_s: float
    weight_bytes: int
    vram_bytes: int = 0  # peak GPU memory reserved by torch (weights, KV cache, graphs, scratch)

    @property
    def weight_gb_s(self) -> float:
        """Weight bytes streamed per second at the tg rate (each decode step reads every weight)."""
        return self.weight_bytes * self.tg_tok_s / 1e9

    def markdown(self) -> str:
        return "\n".join([
            f"| model | device | pp{self.n_prompt} tok/s | tg{self.n_gen} tok/s | depth "
            f"| weight GB/s | load s | VRAM MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            f"| {self.model} | {self.device} | {self.pp_tok_s:,.1f} | {self.tg_tok_s:,.1f} "
            f"| {self.depth} | {self.weight_gb_s:,.1f} | {self.load_s:.2f} "
            f"| {self.vram_bytes / 2**20:,.0f} |",
        ])  # fmt: skip


def sync_device() -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _run(engine, prompt: list[int], max_tokens: int) -> list[tuple[float, int]]:
    """Run one request to completion. Returns (wall time, tokens sampled so far) before it is
    submitted and after every engine step."""
    marks = [(time.perf_counter(), 0)]
    request_id = engine.add_request(
        prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    )
    request = engine.scheduler.requests[request_id]
    while engine.has_unfinished_requests():
        engine.step()
        marks.append((time.perf_counter(), request.num_output_tokens))
    sync_device()
    return marks


def _first(marks: list[tuple[float, int]], count: int) -> tuple[float, int]:
    """The first mark with at least `count` tokens sampled."""
    return next(mark for mark in marks if mark[1] >= count)


def _decode_rate(marks: list[tuple[float, int]], depth: int) -> float:
    """tg from one request's marks (see the module docstring)."""
    t0, k0 = marks[0] if depth <= 1 else _first(marks, 1)  # depth 1: the same one-token prompt
    t1, k1 = _first(marks, marks[-1][1])
    return (k1 - k0) / (t1 - t0)


def run_bench(
    model_path: str,
    n_prompt: int = 512,
    n_gen: int = 128,
    reps: int = 3,
    depth: int = 0,
    device: str | None = None,
    gpu_layers: int = 99,
    tensor_parallel_size: int = 1,
    n_threads: int | None = None,
) -> BenchResult:
    if n_prompt < 1 or n_gen < 2 or reps < 1 or depth < 0:
        raise ValueError("bench needs n_prompt >= 1, n_gen >= 2, reps >= 1 and depth >= 0")
    budget = max(n_prompt, depth, 512)
    config = EngineConfig(
        ctx_size=max(n_prompt, depth) + n_gen + 8, batch_size=budget, ubatch_size=budget,
        n_parallel=1, device=device, gpu_layers=gpu_layers,
        tensor_parallel_size=tensor_parallel_size, n_threads=n_threads,
    )  # fmt: skip
    t0 = time.perf_counter()
    loaded = load(model_path, config, verbose=False)
    load_s = time.perf_counter() - t0
    try:
        engine = loaded.llm_engine
        gen = torch.Generator().manual_seed(0)
        vocab = loaded.model_config.vocab_size

        def tokens(n: int) -> list[int]:
            return torch.randint(10, vocab, (n,), generator=gen).tolist()

        # warm-up: compile the kernels for the prefill and decode shapes, touch every weight
        _run(engine, tokens(n_prompt), 2)
        _run(engine, tokens(max(depth, 1)), 4)
        pp, tg = [], []
        for _ in range(reps):
            marks = _run(engine, tokens(n_prompt), 1)
            pp.append(n_prompt / (_first(marks, 1)[0] - marks[0][0]))
            tg.append(_decode_rate(_run(engine, tokens(max(depth, 1)), n_gen), depth))
        return BenchResult(
            model=loaded.model_config.name, device=loaded.device, load_s=load_s,
            n_prompt=n_prompt, n_gen=n_gen, depth=depth, pp_tok_s=statistics.mean(pp),
            tg_tok_s=statistics.mean(tg), weight_bytes=loaded.memory.get("weights", 0),
            vram_bytes=torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0,
        )  # fmt: skip
    finally:
        loaded.close()
