"""Token bitmasks in the sampler, and decode bursts beside constrained requests."""

from __future__ import annotations

import math

import pytest
import torch

from llcuda.config import EngineConfig
from llcuda.engine.llm_engine import LLMEngine
from llcuda.runner.sampler import sample
from llcuda.sampling_params import SamplingParams
from llcuda.structured import StructuredOutput
from llcuda.structured.bitmask import TokenBitmask, apply_token_bitmask


def _random_mask(rows: list[int], vocab: int, gen: torch.Generator) -> TokenBitmask:
    words = torch.randint(-(2**31), 2**31 - 1, (len(rows), (vocab + 31) // 32), generator=gen,
                          dtype=torch.int64).to(torch.int32)  # fmt: skip
    return TokenBitmask(torch.tensor(rows), words)


def _allowed(mask: TokenBitmask, k: int, vocab: int) -> list[bool]:
    words = mask.words[k].tolist()
    return [(words[t // 32] >> (t % 32)) & 1 == 1 if t // 32 < len(words) else False
            for t in range(vocab)]  # fmt: skip


def test_apply_token_bitmask_matches_the_bits():
    gen = torch.Generator().manual_seed(0)
    vocab = 100  # 4 words; the head below is wider (110): the extra columns are forbidden
    logits = torch.randn(5, 110, generator=gen)
    mask = _random_mask([1, 3], vocab, gen)
    out = apply_token_bitmask(logits, mask)
    for k, row in enumerate([1, 3]):
        allowed = _allowed(mask, k, 110)
        for t in range(110):
            expect = logits[row, t].item() if allowed[t] and t < 128 else -math.inf
            assert out[row, t].item() == expect
    for row in (0, 2, 4):  # free rows untouched
        assert torch.equal(out[row], logits[row])
    assert not torch.equal(out, logits)
    # a head wider than the mask's words (64 tokens here): the columns past them are forbidden
    everything = TokenBitmask(torch.tensor([0]), torch.full((1, 2), -1, dtype=torch.int32))
    out = apply_token_bitmask(logits, everything)
    assert torch.equal(out[0, :64], logits[0, :64]) and bool(torch.isinf(out[0, 64:]).all())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_picks_only_allowed_tokens_and_leaves_free_rows_alone(temperature):
    gen = torch.Generator().manual_seed(1)
    vocab = 300
    logits = torch.randn(4, vocab, generator=gen) * 5
    params = [SamplingParams(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0)] * 4
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    free = sample(logits, params, gens, [[]] * 4)
    for _ in range(20):
        mask = _random_mask([0, 2], vocab, gen)
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        tokens = sample(logits, params, gens, [[]] * 4, token_bitmask=mask).tolist()
        assert _allowed(mask, 0, vocab)[tokens[0]] and _allowed(mask, 1, vocab)[tokens[2]]
        assert tokens[1] == free[1] and tokens[3] == free[3]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from llcuda.gguf.synthetic import TINY, write_gemma3_gguf

    return write_gemma3_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", **TINY)


def test_free_rows_keep_bursting_beside_a_constrained_one(tiny_path):
    """Chained bursts (what a GPU does) for the free rows; the constrained row single-steps
    while it runs; every free row's tokens equal its tokens in a batch without it."""
    from llcuda.engine.loader import load

    config = EngineConfig(ctx_size=64, n_parallel=4, device="cpu",
                          gpu_layers=0, num_scheduler_steps=4)  # fmt: skip
    loaded = load(str(tiny_path), config, verbose=False)
    try:
        runner = loaded.llm_engine.model_runner
        bursts: list[tuple[int, int]] = []  # (num_steps, constrained rows) per launch
        launch = runner.launch

        def spy(step, num_steps=1, after=None):
            grammars = sum(item.request.grammar is not None for item in step.scheduled)
            bursts.append((num_steps, grammars))
            return launch(step, num_steps, after=after)

        runner.launch = spy
        engine = LLMEngine(runner, loaded.tokenizer, config, overlap=True)
        free = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
        prompts = [[300 + i for i in range(n)] for n in (5, 9)]
        alone = [o.new_token_ids for o in engine.generate(prompts, [free, free])]
        constrained = SamplingParams(temperature=0.0, max_tokens=8,
                                     structured=StructuredOutput.gbnf('root ::= "ok" [0-9]'))
        bursts.clear()
        outs = engine.generate([*prompts, [400, 401]], [free, free, constrained])
        assert [o.new_token_ids for o in outs[:2]] == alone
        text = loaded.tokenizer.decode(outs[2].new_token_ids)
        assert text[:2] == "ok" and text[2:].isdigit() and outs[2].finish_reason == "stop"
        assert all(n == 1 for n, g in bursts if g), bursts  # constrained: single steps
        assert any(n > 1 for n, g in bursts if not g), bursts  # free rows burst once it ended
    finally:
        loaded.close()
