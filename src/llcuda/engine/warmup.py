"""Run a small throw-away workload right after load, so no user request pays for a compile.

Triton compiles a kernel the first time it meets new block shapes (the matmul tiles depend on
the number of rows) or new integer specializations; the first request of each kind would
otherwise wait seconds for that. CUDA graphs already cover pure decode steps; this covers
prefill chunks of several sizes, steps that mix prefill with decode, and decode bursts (one
scheduled, one chained behind it: its first step reads the tokens from the device).
"""

from __future__ import annotations

import torch

from llcuda.engine.block_manager import PrefixCacheStats
from llcuda.engine.llm_engine import LLMEngine
from llcuda.sampling_params import SamplingParams


def warm_up(engine: LLMEngine, vocab_size: int) -> int:
    """Run prompts of assorted lengths to completion (3 tokens each); returns the steps taken.

    Leaves the engine as it found it: no request, no KV block in use, step counter and prefix-cache
    statistics unchanged (random prompt ids: their cached blocks never match a user's prompt and
    are evicted first when blocks run out).
    """
    config = engine.config
    gen = torch.Generator().manual_seed(0)
    longest = min(config.ctx_size - 4, 2 * config.ubatch_size + 3)
    # one lone short prompt, then waves that fill a step with prefill chunks and decodes
    lengths = [1, 7, 17, 40, longest, 100, 3, 65, 33, 129, 2, 9]
    lengths = [max(1, min(n, longest)) for n in lengths]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    steps = engine.num_steps
    waves = [(lengths[:1], params), (lengths[1:6], params), (lengths[6:], params)]
    if engine.decode_steps > 1:  # a burst, then another queued behind it
        burst = SamplingParams(max_tokens=2 * engine.decode_steps + 1, temperature=0.0,
                               ignore_eos=True)  # fmt: skip
        waves.append(([2], burst))
    for wave, wave_params in waves:
        for n in wave[: config.n_parallel]:
            prompt = torch.randint(10, vocab_size, (n,), generator=gen).tolist()
            engine.add_request(prompt, wave_params)
        while engine.has_unfinished_requests():
            engine.step()
    taken = engine.num_steps - steps
    engine.num_steps = steps
    engine.block_manager.prefix_cache_stats = PrefixCacheStats()  # users' lookups only
    return taken
