"""Paged KV block bookkeeping: allocation, all-or-nothing, idempotent free, prefix caching."""

from __future__ import annotations

import pytest

from llcuda.engine.block_manager import BlockManager, hash_block
from llcuda.engine.request import Request
from llcuda.sampling_params import SamplingParams


def _req(tokens, rid="r") -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=8))


def test_allocate_covers_computed_plus_new_tokens():
    bm = BlockManager(num_blocks=10, block_size=4)
    r = _req(range(10))
    assert bm.allocate_slots(r, 5)
    assert len(r.block_table) == 2
    r.num_computed_tokens = 5
    assert bm.allocate_slots(r, 3)  # 8 tokens: still 2 blocks
    assert len(r.block_table) == 2
    r.num_computed_tokens = 8
    assert bm.allocate_slots(r, 1)  # token 9 opens a third block
    assert len(r.block_table) == 3
    assert bm.num_free_blocks == 7
    assert bm.usage == pytest.approx(0.3)
    bm.check_invariants([r])


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = _req(range(8), "a"), _req(range(8), "b")
    assert bm.allocate_slots(a, 8)
    assert not bm.can_allocate(b, 8)
    assert not bm.allocate_slots(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert bm.can_allocate(b, 4) and bm.allocate_slots(b, 4)
    assert sorted(a.block_table + b.block_table) == [0, 1, 2]
    bm.check_invariants([a, b])


def test_free_is_idempotent():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = _req(range(4), "a"), _req(range(3), "b")
    bm.allocate_slots(a, 4)
    bm.allocate_slots(b, 3)
    bm.free(a)
    bm.free(a)  # a finished request released twice: nothing happens
    assert a.block_table == []
    assert bm.num_free_blocks == 2
    bm.check_invariants([b])
    bm.free(b)
    assert bm.num_free_blocks == 4 and bm.usage == 0.0
    bm.check_invariants([])


def test_invariant_check_catches_a_double_free_and_shared_tables():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _req(range(4), "a")
    bm.allocate_slots(a, 4)
    stale = list(a.block_table)
    bm.free(a)
    a.block_table = stale  # a buggy caller restoring a freed table
    with pytest.raises(AssertionError, match="double free"):
        bm.free(a)
    bm2 = BlockManager(num_blocks=4, block_size=2)
    x, y = _req(range(2), "x"), _req(range(2), "y")
    bm2.allocate_slots(x, 2)
    y.block_table = list(x.block_table)  # two owners of one unshared block
    with pytest.raises(AssertionError, match="ref_count"):
        bm2.check_invariants([x, y])


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    bm = BlockManager(4, 4)
    with pytest.raises(ValueError, match="num_new_tokens"):
        bm.allocate_slots(_req([1]), -1)


# --- prefix caching ---------------------------------------------------------------------------


def _compute(bm: BlockManager, r: Request, n: int | None = None) -> None:
    """Allocate and 'compute' the request's first n tokens (all by default), registering blocks."""
    n = r.num_tokens if n is None else n
    assert bm.allocate_slots(r, n - r.num_computed_tokens)
    r.num_computed_tokens = n
    bm.cache_full_blocks(r)


def test_prefix_hit_shares_full_blocks_and_keeps_the_last_token_uncached():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = _req(range(14), "a")  # 3 full blocks + 2 tokens
    _compute(bm, a)
    assert bm.num_cached_blocks == 3
    b = _req(list(range(14)) + [99], "b")
    hits = bm.find_cached_blocks(b)
    assert hits == a.block_table[:3]
    assert bm.allocate_slots(b, b.num_tokens - 12, hits)
    b.num_computed_tokens = 12
    assert b.block_table[:3] == a.block_table[:3]
    assert b.block_table[3] != a.block_table[3]
    assert [bm.blocks[i].ref_count for i in a.block_table[:3]] == [2, 2, 2]
    bm.check_invariants([a, b])
    # a prompt of exactly two full blocks reuses only the first: its last token must be fed
    c = _req(range(8), "c")
    assert bm.find_cached_blocks(c) == a.block_table[:1]


def test_chained_hash_stops_at_the_first_difference():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = _req([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0], "a")
    _compute(bm, a)
    # second block differs, third block is identical: its hash differs because its parent does
    b = _req([1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 0], "b")
    assert bm.find_cached_blocks(b) == a.block_table[:1]
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0]), [1, 2])


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    a = _req([1, 2, 3, 4, 5], "a")  # blocks: [1,2] [3,4] [5]
    _compute(bm, a)
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 3 and bm.num_cached_blocks == 2
    bm.check_invariants([])
    again = _req([1, 2, 3, 4, 6], "again")
    assert bm.find_cached_blocks(again) == table[:2]
    # a new unrelated request takes the uncached block first, then the tail of a's prefix
    x = _req([7, 8], "x")
    assert bm.allocate_slots(x, 2)
    assert x.block_table == [table[2]]
    assert bm.num_cached_blocks == 2
    y = _req([9, 9], "y")
    assert bm.allocate_slots(y, 2)
    assert y.block_table == [table[1]]  # evicts the tail of the cached prefix, not its head
    assert bm.num_cached_blocks == 1
    assert bm.find_cached_blocks(again) == table[:1]
    bm.check_invariants([x, y])


def test_adopting_free_cached_blocks_counts_against_the_free_list():
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    a = _req([1, 2, 3, 4, 5], "a")
    _compute(bm, a)
    bm.free(a)
    b = _req([1, 2, 3, 4, 5, 6, 7, 8, 9], "b")
    hits = bm.find_cached_blocks(b)
    assert len(hits) == 2
    # 2 hits + 3 new blocks > 3 blocks: refused, and nothing was taken
    assert not bm.allocate_slots(b, 5, hits)
    assert b.block_table == [] and bm.num_free_blocks == 3
    assert bm.allocate_slots(b, 1, hits)  # 2 hits + 1 new block
    assert bm.num_free_blocks == 0
    bm.check_invariants([b])


def test_prefix_caching_off_finds_nothing():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = _req([1, 2, 3, 4, 5], "a")
    _compute(bm, a)
    assert bm.num_cached_blocks == 0
    assert bm.find_cached_blocks(_req([1, 2, 3, 4, 5], "b")) == []


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    a = _req([1, 2, 3, 4, 5], "a")
    _compute(bm, a)
    bm.reset_prefix_cache()
    assert bm.find_cached_blocks(_req([1, 2, 3, 4, 5], "b")) == []
    bm.check_invariants([a])


def test_growing_a_table_keeps_its_registered_blocks_registered():
    # allocate_slots used to reset num_hashed_blocks on every call, so that every step rescanned
    # the request's whole table for blocks to register (quadratic in the sequence length)
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    r = _req(range(14), "r")
    _compute(bm, r)
    assert r.num_hashed_blocks == 3
    r.extend_output_tokens([99])
    assert bm.allocate_slots(r, 1)  # position 14: no new block
    assert r.num_hashed_blocks == 3
    r.num_computed_tokens += 1
    r.extend_output_tokens([98])
    bm.cache_full_blocks(r)
    assert r.num_hashed_blocks == 3  # 15 tokens computed: block 3 is not full yet
    assert bm.allocate_slots(r, 1)
    r.num_computed_tokens += 1
    bm.cache_full_blocks(r)
    assert r.num_hashed_blocks == 4 and bm.num_cached_blocks == 4
    bm.check_invariants([r])


def test_a_twin_computed_alongside_stays_private_and_is_evicted_first():
    # a and b compute the same prompt in the same steps: a's blocks are registered first
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    a, b = _req(range(10), "a"), _req(range(10), "b")
    assert bm.allocate_slots(a, 10) and bm.allocate_slots(b, 10)
    for r in (a, b):
        r.num_computed_tokens = 10
        bm.cache_full_blocks(r)
    a_full = a.block_table[:2]
    assert bm.num_cached_blocks == 2
    assert [bm.blocks[i].hash is None for i in b.block_table] == [True, True, True]
    bm.free(a)
    # b's twins are unreachable: freed after a's blocks, they must still be handed out before
    # a's cached ones (they used to keep a hash and queue behind them)
    bm.free(b)
    c = _req(range(100, 116), "c")
    assert bm.allocate_slots(c, 16)  # 4 blocks: b's 3 and a's partial last block
    assert set(c.block_table).isdisjoint(a_full)
    assert bm.find_cached_blocks(_req(range(10), "d")) == a_full
    bm.check_invariants([c])


def test_reset_prefix_cache_with_shared_blocks_keeps_them_working():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    a = _req([1, 2, 3, 4, 5], "a")
    _compute(bm, a)
    b = _req([1, 2, 3, 4, 6], "b")
    hits = bm.find_cached_blocks(b)
    assert bm.allocate_slots(b, 1, hits)
    bm.reset_prefix_cache()
    bm.check_invariants([a, b])  # shared blocks keep their hash: they are still full, immutable
    assert bm.find_cached_blocks(_req([1, 2, 3, 4, 7], "c")) == []
    bm.free(a)
    bm.free(b)
    bm.check_invariants([])
    assert bm.num_cached_blocks == 0
    assert all(block.hash is None for block in bm.blocks)  # nothing unreachable is kept


def test_kv_use_counts_blocks_held_by_live_requests_not_evictable_cached_ones():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    a = _req([1, 2, 3, 4, 5], "a")
    _compute(bm, a)
    b = _req([1, 2, 3, 4, 6, 7], "b")
    assert bm.allocate_slots(b, 2, bm.find_cached_blocks(b))
    assert bm.num_used_blocks == 4  # a's 3 blocks, 2 of them shared with b, and b's own one
    assert bm.usage == pytest.approx(4 / 8)
    bm.free(a)
    assert bm.num_used_blocks == 3
    bm.free(b)
    assert bm.num_used_blocks == 0 and bm.usage == 0.0 and bm.num_free_blocks == 8
    assert bm.num_cached_blocks == 2  # still findable, evicted on demand
