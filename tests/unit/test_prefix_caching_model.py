"""Prefix caching on the real model code (tiny synthetic Gemma 3, CPU): on == off.

Requests whose prompts share a prefix adopt its KV blocks instead of computing them; the logits of
their first token and their greedy continuations must not change. The prompts include a request
whose whole prompt is cached (its last block is computed again) and one that starts with another
prompt's second block (a hash that did not chain in the earlier blocks would hand it KV entries
computed at other positions, which changes its logits).
"""

from __future__ import annotations

import pytest
import torch

from llcuda.config import EngineConfig
from llcuda.engine.loader import load
from llcuda.gguf.synthetic import TINY, write_gemma3_gguf
from llcuda.sampling_params import SamplingParams

BLOCK_SIZE = 8
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("exact_cpu_decode")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_gemma3_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", **TINY)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(300, 1000, (53,), generator=gen).tolist()  # 6 full blocks + 5 tokens
    tails = [torch.randint(300, 1000, (n,), generator=gen).tolist() for n in (4, 9, 1)]
    return [
        prefix + tails[0],
        prefix + tails[1],  # shares 6 blocks with the first
        prefix + tails[0],  # the whole prompt is cached: its last block is fed again
        prefix[:40],  # exactly 5 blocks: 4 hit, the 5th holds the last token and is recomputed
        prefix[BLOCK_SIZE:] + tails[2],  # the first's blocks 1.. at other positions: no hit
        prefix + tails[2],
    ]


def _run(path, prefix_caching: bool, prompts, batched: bool):
    """Greedy continuations, first-token logits (one request at a time) and cached tokens."""
    config = EngineConfig(ctx_size=128, n_parallel=4, batch_size=128, ubatch_size=32,
                          block_size=BLOCK_SIZE, device="cpu", gpu_layers=0,
                          enable_prefix_caching=prefix_caching)  # fmt: skip
    loaded = load(str(path), config, verbose=False)
    try:
        engine = loaded.llm_engine
        if batched:
            outs = engine.generate(prompts, GREEDY)
            first_logits = None
        else:
            model = engine.model_runner.model
            compute_logits = model.compute_logits
            recorded: list[torch.Tensor] = []

            def recording(hidden):  # [num_sampled, hidden_size] -> [num_sampled, vocab]
                logits = compute_logits(hidden)
                recorded.append(logits.detach().float().cpu().clone())
                return logits

            model.compute_logits = recording
            outs, first_logits = [], []
            for prompt in prompts:  # one by one: each may find the earlier ones' blocks
                n = len(recorded)
                outs.append(engine.generate([prompt], GREEDY)[0])
                assert len(recorded) > n, "the runner computed no logits through the model"
                first_logits.append(recorded[n][-1])
        bm = engine.block_manager
        assert bm.num_used_blocks == 0 and bm.usage == 0.0  # nothing live holds a block
        return [o.new_token_ids for o in outs], first_logits, [o.num_cached_tokens for o in outs]
    finally:
        loaded.close()


def test_prefix_caching_changes_no_logits_and_no_greedy_token(tiny_path):
    prompts = _prompts()
    ref_tokens, ref_logits, ref_cached = _run(tiny_path, False, prompts, batched=False)
    tokens, logits, cached = _run(tiny_path, True, prompts, batched=False)
    for i, (a, b) in enumerate(zip(ref_logits, logits, strict=True)):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=0, msg=f"prompt {i}")
    assert tokens == ref_tokens
    assert ref_cached == [0] * len(prompts)
    assert cached == [0, 48, 56, 32, 0, 48]


def test_batched_prefix_caching_gives_the_same_greedy_tokens(tiny_path):
    prompts = _prompts() * 2  # the second copy finds the first's blocks
    ref_tokens, _, _ = _run(tiny_path, False, prompts, batched=True)
    tokens, _, cached = _run(tiny_path, True, prompts, batched=True)
    assert tokens == ref_tokens
    assert sum(cached) > 0
