"""Prefix caching through LLMEngine with the paged fake model of test_llm_engine: on == off.

`CheckedKVRunner` is that file's FakeKVRunner (which reads every context back through the block
tables, so an adopted block holding other tokens or other positions changes the output or trips an
assertion) plus one rule: a step never writes into a block that is shared or registered in the
prefix cache.
"""

from __future__ import annotations

import pytest

from llcuda.config import EngineConfig
from llcuda.engine.llm_engine import LLMEngine
from llcuda.engine.scheduler import SchedulerOutput
from llcuda.sampling_params import SamplingParams
from tests.unit.test_llm_engine import FakeDetokenizer, FakeKVRunner, FakeTokenizer, _config, _key


class CheckedKVRunner(FakeKVRunner):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.block_manager = None  # set once the engine exists

    def execute_model(self, step: SchedulerOutput) -> dict[str, int]:
        for item in step.scheduled:
            table = item.request.block_table
            for pos in range(item.start_pos, item.seq_len):
                block = self.block_manager.blocks[table[pos // self.block_size]]
                assert block.ref_count == 1 and block.hash is None, f"write into {block}"
        return super().execute_model(step)


def _engine(config: EngineConfig, prefix: bool | None, overlap: bool = False) -> LLMEngine:
    runner = CheckedKVRunner(config)
    engine = LLMEngine(runner, FakeTokenizer(), config, detokenizer_factory=FakeDetokenizer,
                       enable_prefix_caching=prefix, overlap=overlap)  # fmt: skip
    runner.block_manager = engine.block_manager.main  # the one (full-attention) group
    return engine


def _computed_tokens(engine: LLMEngine) -> int:
    return sum(step.total_num_tokens for step in engine.model_runner.log)


def test_prefix_caching_is_on_by_default_and_the_old_extra_key_still_works():
    assert EngineConfig().enable_prefix_caching is True
    assert _engine(_config(), None).block_manager.enable_prefix_caching
    off = _config(enable_prefix_caching=False)
    assert not _engine(off, None).block_manager.enable_prefix_caching
    old_spelling = _config(extra={"enable_prefix_caching": False, "cuda_graphs": False})
    assert old_spelling.enable_prefix_caching is False
    assert old_spelling.extra == {"cuda_graphs": False}
    assert not _engine(old_spelling, None).block_manager.enable_prefix_caching
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        _config(enable_prefix_caching="yes")


SHARED = [(7 * i) % 26 + 1 for i in range(41)]  # a 41-token system prompt: 10 full blocks of 4
PROMPTS = (
    [SHARED + tail for tail in ([1], [2, 3], [], [5, 6, 7, 8], [1], [9] * 6)]
    + [
        SHARED[:20] + [4],  # part of the prefix
        SHARED[:16],  # the whole prompt is 4 cached blocks: the last one is computed again
        SHARED[4:] + [3],  # the prefix's blocks 1.. at other positions: nothing to reuse
    ]
)
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=8),
    SamplingParams(temperature=0.9, seed=1, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=1.0, top_k=6, seed=2, max_tokens=9),
    SamplingParams(temperature=0.0, max_tokens=8, stop=["hr"]),  # prompt 0 again, stopped
    SamplingParams(temperature=0.7, seed=3, max_tokens=11, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
]


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_parallel=1),
        dict(n_parallel=4),
        dict(n_parallel=8, batch_size=12, ubatch_size=5),  # chunked prefill
        dict(n_parallel=8, cache_size=64),  # 16 blocks for 8 requests: preemption and eviction
    ],
    ids=["serial", "batched", "chunked", "tiny_pool"],
)
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_shared_prefix_outputs_equal_with_caching_on_and_off(kw, overlap):
    config = _config(**kw)
    off, on = _engine(config, False, overlap), _engine(config, True, overlap)
    ref = off.generate(PROMPTS, PARAMS)
    outs = on.generate(PROMPTS, PARAMS)
    assert [_key(o) for o in outs] == [_key(o) for o in ref]
    assert len({tuple(o.new_token_ids) for o in ref}) == len(PROMPTS)  # all differ
    assert [o.finish_reason for o in ref].count("stop") == 1  # the stop string
    assert all(o.num_cached_tokens == 0 for o in ref)
    assert all(o.num_cached_tokens <= o.num_prompt_tokens - 1 for o in outs)
    assert on.block_manager.prefix_cache_stats.num_hit_tokens > 0
    assert _computed_tokens(on) < _computed_tokens(off)
    if kw.get("cache_size"):
        assert sum(len(s.preempted_ids) for s in on.model_runner.log) > 0
    # KV use is back to zero; the cached blocks left behind are all free (evicted on demand)
    for engine in (on, off):
        bm = engine.block_manager
        bm.check_invariants([])
        assert bm.num_used_blocks == 0 and bm.num_free_blocks == config.num_blocks
    assert on.block_manager.num_cached_blocks > 0 and off.block_manager.num_cached_blocks == 0


def test_one_at_a_time_every_later_request_reuses_the_first_ones_blocks():
    engine = _engine(_config(n_parallel=1), None)
    off = _engine(_config(n_parallel=1), False)
    outs = engine.generate(PROMPTS, PARAMS)
    assert [_key(o) for o in outs] == [_key(o) for o in off.generate(PROMPTS, PARAMS)]
    assert [o.num_cached_tokens for o in outs] == [0, 40, 40, 40, 40, 40, 20, 12, 0]
    assert _computed_tokens(off) - _computed_tokens(engine) == 40 * 5 + 20 + 12
    # the fully cached 16-token prompt still fed its last block (4 tokens), then sampled
    last = [x for s in engine.model_runner.log for x in s.scheduled
            if x.request.prompt_token_ids == PROMPTS[7]]  # fmt: skip
    assert (last[0].start_pos, last[0].num_tokens, last[0].sample) == (12, 4, True)
    stats = engine.block_manager.prefix_cache_stats
    assert (stats.num_requests, stats.num_hit_tokens) == (9, 232)
    assert stats.num_queried_tokens == sum(len(p) for p in PROMPTS)
