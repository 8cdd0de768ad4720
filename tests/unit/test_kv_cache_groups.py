"""Sliding-window layers in a KV-cache group of their own (engine/kv_cache_manager.py).

The group's pool holds n_parallel windows, a request's blocks behind its window go back to it,
prefix hits need the window's blocks too, and none of it changes what the model computes: greedy
output equals the full-size cache's (swa_full=True) on the tiny synthetic Gemma 3.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llcuda.config import EngineConfig, ModelConfig
from llcuda.engine.block_manager import BlockManager
from llcuda.engine.kv_cache_manager import KVCacheGroup, KVCacheManager, kv_cache_groups
from llcuda.engine.loader import load
from llcuda.engine.request import Request
from llcuda.gguf.synthetic import TINY, write_gemma3_gguf
from llcuda.sampling_params import SamplingParams

WINDOW, BS = 16, 8
# layers 1 and 3 global, 0 and 2 sliding, as Gemma 3's pattern with a period of 2
MODEL = ModelConfig(
    architecture="gemma3", name="t", vocab_size=1024, hidden_size=64, intermediate_size=128,
    num_layers=4, num_heads=2, num_kv_heads=1, head_dim=32, rms_norm_eps=1e-6,
    max_position_embeddings=4096, rope_theta=1e6, rope_theta_local=1e4, sliding_window=WINDOW,
    sliding_window_layers=(True, False, True, False),
)  # fmt: skip


def _request(n: int, rid: str = "r") -> Request:
    tokens = torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    return Request(rid, tokens, SamplingParams(max_tokens=8))


def test_groups_split_full_and_sliding_layers():
    config = EngineConfig(ctx_size=4096, n_parallel=3, ubatch_size=128, block_size=32)
    full, swa = kv_cache_groups(MODEL, config)
    assert (full.num_blocks, full.sliding_window, full.layers) == (384, 0, (1, 3))
    # a window of 16 plus a 128-token chunk: cdiv(15 + 128, 32) + 1 = 6 blocks per sequence
    assert (swa.num_blocks, swa.sliding_window, swa.layers) == (18, WINDOW, (0, 2))
    (one,) = kv_cache_groups(MODEL, dataclasses.replace(config, swa_full=True))
    assert one == KVCacheGroup(384, 0, (0, 1, 2, 3))
    no_swa = dataclasses.replace(MODEL, sliding_window=0, sliding_window_layers=())
    assert len(kv_cache_groups(no_swa, config)) == 1
    # never more blocks than the full group: a short context needs no window pool
    small = EngineConfig(ctx_size=64, n_parallel=1, ubatch_size=64, block_size=32)
    assert kv_cache_groups(MODEL, small)[1].num_blocks == 2


def test_blocks_behind_the_window_go_back_to_the_pool():
    bm = BlockManager(num_blocks=8, block_size=BS, sliding_window=WINDOW, group=1)
    req = _request(60)
    table = req.kv_tables[1]
    assert bm.allocate_slots(req, 24)  # positions 0..23: blocks 0..2
    req.num_computed_tokens = 24  # the next query (24) sees keys 9..24: block 0 is dead
    assert bm.allocate_slots(req, 24)  # up to 47: 6 blocks, block 0 released first
    assert table.num_dropped == 1 and table.blocks[0] == 0 and len(table.blocks) == 6
    assert bm.num_used_blocks == 5
    bm.check_invariants([req])
    req.num_computed_tokens = 48  # sees 33..48: blocks 0..3 dead
    assert bm.can_allocate(req, 12)  # 2 new blocks; 3 more come back first
    assert bm.allocate_slots(req, 12)
    assert table.num_dropped == 4 and bm.num_used_blocks == 4
    assert req.kv_tables[0].blocks == []  # another group's table is left alone
    bm.check_invariants([req])
    bm.free(req)
    assert bm.num_free_blocks == 8 and table.blocks == [] and table.num_dropped == 0
    bm.check_invariants([])


def test_a_full_pool_refuses_without_releasing_live_blocks():
    bm = BlockManager(num_blocks=4, block_size=BS, sliding_window=WINDOW, group=1)
    a, b = _request(40, "a"), _request(40, "b")
    assert bm.allocate_slots(a, 16) and bm.allocate_slots(b, 16)
    a.num_computed_tokens = 16  # sees 1..16: nothing is dead yet
    assert not bm.can_allocate(a, 8) and not bm.allocate_slots(a, 8)
    assert a.kv_tables[1].num_dropped == 0 and len(a.kv_tables[1].blocks) == 2
    bm.check_invariants([a, b])


def _manager(num_full: int = 32, num_swa: int = 8) -> KVCacheManager:
    groups = [KVCacheGroup(num_full, 0, (1, 3)), KVCacheGroup(num_swa, WINDOW, (0, 2))]
    return KVCacheManager(groups, BS, enable_prefix_caching=True)


def _compute(kv: KVCacheManager, req: Request, chunk: int = 8) -> None:
    """Feed the whole prompt in chunks as the scheduler would, registering full blocks."""
    while req.num_computed_tokens < req.num_tokens:
        n = min(chunk, req.num_tokens - req.num_computed_tokens)
        assert kv.allocate_slots(req, n)
        req.num_computed_tokens += n
        kv.cache_full_blocks(req)


def test_prefix_hit_needs_the_window_in_the_sliding_group():
    kv = _manager()
    first = _request(81, "first")
    _compute(kv, first)
    # 10 full blocks computed; the sliding group kept blocks 8..10 only (the window from 65)
    assert first.kv_tables[1].num_dropped == 8
    full_blocks = list(first.kv_tables[0].blocks)
    kv.free(first)
    again = Request("again", first.all_token_ids, SamplingParams(max_tokens=4))
    hit = kv.find_cached_blocks(again)
    # 10 blocks: the last token (80) is fed again; a query at 80 sees 65..80: blocks 8, 9 cached
    assert len(hit) == 10
    assert hit.blocks[1][:8] == [None] * 8 and None not in hit.blocks[1][8:]
    assert hit.blocks[0] == full_blocks[:10]
    assert kv.allocate_slots(again, 1, hit)
    assert again.kv_tables[1].num_dropped == 8 and len(again.kv_tables[1].blocks) == 11
    kv.check_invariants([again])


def test_prefix_hit_shrinks_to_where_the_sliding_group_still_has_the_window():
    kv = _manager(num_swa=4)
    first = _request(81, "first")
    _compute(kv, first)
    kv.free(first)
    # another request takes 3 of the 4 sliding blocks; the free list hands out the unhashed
    # tail block first, then the oldest cached ones: only block 8 (freed last) survives
    other = _request(24, "other")
    assert kv.allocate_slots(other, 24)
    again = Request("again", first.all_token_ids, SamplingParams(max_tokens=4))
    hit = kv.find_cached_blocks(again)
    swa = kv.groups[1]
    alive = [i for i, h in enumerate(again.block_hashes[:10]) if swa.cached_block(h) is not None]
    assert alive == [8]
    # a hit of 10 blocks needs block 9 too; any shorter one needs earlier blocks: none is cached
    assert len(hit) == 0
    assert kv.allocate_slots(again, 8, hit)
    kv.check_invariants([again, other])


def test_all_or_nothing_over_the_groups():
    kv = _manager(num_full=32, num_swa=2)
    req = _request(40)
    assert not kv.allocate_slots(req, 24)  # 3 blocks: the full group has them, the sliding not
    assert req.kv_tables[0].blocks == [] and kv.main.num_free_blocks == 32


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_gemma3_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", **TINY)


def _generate(path, swa_full: bool, prompts, **kw):
    config = EngineConfig(ctx_size=256, n_parallel=3, batch_size=64, ubatch_size=16,
                          block_size=BS, device="cpu", gpu_layers=0, swa_full=swa_full, **kw)
    loaded = load(str(path), config, verbose=False)
    try:
        engine = loaded.llm_engine
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        first = [o.new_token_ids for o in engine.generate(prompts, params)]
        again = [o.new_token_ids for o in engine.generate(prompts[:2], params)]  # prefix hits
        return first, again, engine.model_runner.kv_cache_bytes, engine.model_runner.num_groups
    finally:
        loaded.close()


def test_greedy_output_equals_the_full_size_cache(tiny_path):
    """Prompts of 100-150 tokens (window 16, blocks of 8, chunks of 16), three at a time, so
    the sliding pool (3 x 7 blocks) must hand dead blocks to other sequences mid-run."""
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(300, 1000, (n,), generator=gen).tolist() for n in (100, 150, 121, 7)]
    full = _generate(tiny_path, True, prompts)
    swa = _generate(tiny_path, False, prompts)
    assert (full[3], swa[3]) == (1, 2)
    assert swa[0] == full[0] and swa[1] == full[1]
    assert swa[1] == swa[0][:2]  # the cached prefixes give the same continuations
    # 2 of 4 layers keep 3 x 7 blocks instead of 96 (no scratch block on the CPU)
    assert swa[2] == full[2] * (96 + 21) // (2 * 96)
