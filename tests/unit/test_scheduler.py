"""The token-budget scheduler: chunking, admission, preemption, finishing, KV-leak property."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llcuda.config import EngineConfig
from llcuda.engine.block_manager import BlockManager, cdiv
from llcuda.engine.request import Request, RequestStatus
from llcuda.engine.scheduler import Scheduler, SchedulerOutput
from llcuda.sampling_params import SamplingParams

EOG = 99


def _scheduler(num_blocks=64, prefix=False, **kw) -> Scheduler:
    config = EngineConfig(**{"ctx_size": 64, "block_size": 4, **kw})
    bm = BlockManager(num_blocks, config.block_size, enable_prefix_caching=prefix)
    return Scheduler(config, bm, eog_ids=[EOG])


def _req(rid: str, n_prompt: int, max_tokens: int = 16, **kw) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, **kw))


def _shape(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(s.request_id, s.start_pos, s.num_tokens, s.sample) for s in out.scheduled]


def _step(s: Scheduler, token: int = 7) -> tuple[SchedulerOutput, list[Request]]:
    out = s.schedule()
    sampled = {item.request_id: token for item in out.scheduled if item.sample}
    return out, s.update_from_output(out, sampled)


def test_chunked_prefill_respects_ubatch_size_and_budget():
    s = _scheduler(batch_size=10, ubatch_size=4, n_parallel=4)
    s.add_request(_req("a", 10))
    s.add_request(_req("b", 3))
    out, _ = _step(s)
    assert _shape(out) == [("a", 0, 4, False), ("b", 0, 3, True)]
    assert out.total_num_tokens == 7
    out, _ = _step(s)
    assert _shape(out) == [("a", 4, 4, False), ("b", 3, 1, True)]
    out, _ = _step(s)
    assert _shape(out) == [("a", 8, 2, True), ("b", 4, 1, True)]
    out, _ = _step(s)
    assert _shape(out) == [("a", 10, 1, True), ("b", 5, 1, True)]
    a = s.requests["a"]
    assert a.output_token_ids == [7, 7] and a.num_computed_tokens == 11
    assert len(a.block_table) == cdiv(11, 4)


def test_budget_splits_a_chunk_and_later_requests_wait():
    s = _scheduler(batch_size=5, ubatch_size=4, n_parallel=4)
    for rid in "abc":
        s.add_request(_req(rid, 6))
    out, _ = _step(s)
    assert _shape(out) == [("a", 0, 4, False), ("b", 0, 1, False)]
    assert s.num_running == 2 and s.num_waiting == 1
    out, _ = _step(s)
    assert _shape(out) == [("a", 4, 2, True), ("b", 1, 3, False)]
    out, _ = _step(s)
    # a decodes, b finishes its prompt, c is admitted with what is left of the budget
    assert _shape(out) == [("a", 6, 1, True), ("b", 4, 2, True), ("c", 0, 2, False)]


def test_n_parallel_caps_the_running_set():
    s = _scheduler(n_parallel=2)
    for rid in "abcd":
        s.add_request(_req(rid, 2))
    out, _ = _step(s)
    assert [x.request_id for x in out.scheduled] == ["a", "b"]
    assert s.num_running == 2 and s.num_waiting == 2


def test_fcfs_head_of_line_blocks_smaller_requests():
    # 6 blocks of 4; a holds 2 blocks, b needs 4 for its first chunk, c would fit in 1
    s = _scheduler(num_blocks=6, ctx_size=24, ubatch_size=16, batch_size=64, n_parallel=4)
    s.add_request(_req("a", 8))
    _step(s)
    s.add_request(_req("b", 20))
    s.add_request(_req("c", 2))
    out, _ = _step(s)
    assert [x.request_id for x in out.scheduled] == ["a"]
    assert list(r.request_id for r in s.waiting) == ["b", "c"]


def test_preemption_takes_the_newest_other_request_and_requeues_it_first():
    # 4 blocks of 4 tokens, one context = 16 tokens = 4 blocks
    s = _scheduler(num_blocks=4, ctx_size=16, n_parallel=3)
    s.add_request(_req("a", 2))
    s.add_request(_req("b", 4))
    s.add_request(_req("c", 2))
    _step(s)  # a, b, c take one block each; b now has 5 tokens
    out, _ = _step(s)  # b takes the last block for position 4
    assert out.preempted_ids == [] and s.block_manager.num_free_blocks == 0
    out, _ = _step(s)  # positions 3, 5, 3: no new block
    assert out.preempted_ids == []
    out, _ = _step(s)  # a (now at position 4) needs a block: c, the newest, goes
    assert out.preempted_ids == ["c"]
    assert [x.request_id for x in out.scheduled] == ["a", "b"]
    c = s.waiting[0]
    assert c.request_id == "c" and c.status is RequestStatus.PREEMPTED
    assert c.num_computed_tokens == 0 and c.block_table == [] and c.num_tokens == 5
    assert c.num_preemptions == 1
    # no admission in a step that preempted; c comes back once a request finishes
    s.abort_request("b")
    out, _ = _step(s)
    assert _shape(out)[-1] == ("c", 0, 5, True)  # recompute prompt + its 3 outputs
    assert s.requests["c"].status is RequestStatus.RUNNING


def test_a_lone_request_that_cannot_grow_preempts_itself_only_if_nothing_else_runs():
    s = _scheduler(num_blocks=4, ctx_size=16, n_parallel=2, batch_size=64, ubatch_size=16)
    s.add_request(_req("a", 12))  # 3 blocks
    s.add_request(_req("b", 4))  # 1 block
    _step(s)
    out, _ = _step(s)  # a needs a 4th block at position 12: b is preempted, not a
    assert out.preempted_ids == ["b"]
    assert [x.request_id for x in out.scheduled] == ["a"]


def test_abort_frees_blocks_immediately_and_is_reported_once():
    s = _scheduler(n_parallel=1)
    s.add_request(_req("a", 6))
    s.add_request(_req("b", 6))
    _step(s)
    assert s.block_manager.num_free_blocks == 64 - 2
    assert s.abort_request("a") and s.abort_request("b")
    assert not s.abort_request("a") and not s.abort_request("zzz")
    assert s.block_manager.num_free_blocks == 64
    assert not s.has_unfinished_requests()
    out = s.schedule()
    assert out.is_empty and out.finished_ids == ["a", "b"]
    assert s.schedule().finished_ids == []


def test_abort_during_a_step_skips_the_update():
    s = _scheduler()
    s.add_request(_req("a", 3))
    out = s.schedule()
    s.abort_request("a")
    assert s.update_from_output(out, {"a": 5}) == []
    a = out.scheduled[0].request
    assert a.output_token_ids == [] and a.finish_reason == "abort"


def test_finish_reasons():
    s = _scheduler(ctx_size=8, n_parallel=4)
    s.add_request(_req("eog", 2))
    s.add_request(_req("ignore", 2, max_tokens=2, ignore_eos=True))
    s.add_request(_req("ctx", 7, ignore_eos=True))
    _, finished = _step(s, token=EOG)
    assert {r.request_id: r.finish_reason for r in finished} == {"eog": "stop", "ctx": "length"}
    assert s.block_manager.num_free_blocks == 64 - 1
    _, finished = _step(s, token=EOG)
    assert [(r.request_id, r.finish_reason) for r in finished] == [("ignore", "length")]
    assert finished[0].output_token_ids == [EOG, EOG]
    assert finished[0].status is RequestStatus.FINISHED_LENGTH
    assert s.block_manager.num_free_blocks == 64


def test_prompt_must_leave_room_for_one_token():
    s = _scheduler(ctx_size=8)
    with pytest.raises(ValueError, match="prompt has 8 tokens but ctx_size is 8"):
        s.add_request(_req("a", 8))
    with pytest.raises(ValueError, match="prompt has 9 tokens but ctx_size is 8"):
        s.add_request(_req("b", 9))
    s.add_request(_req("c", 7))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(_req("c", 3))
    with pytest.raises(ValueError, match="max_tokens"):
        s.add_request(_req("d", 3, max_tokens=0))


def test_missing_sampled_token_is_a_clear_error():
    s = _scheduler()
    s.add_request(_req("a", 3))
    out = s.schedule()
    with pytest.raises(KeyError, match="no sampled token for request 'a'"):
        s.update_from_output(out, {})


def test_cache_smaller_than_one_context_is_rejected():
    config = EngineConfig(ctx_size=64, block_size=16)
    with pytest.raises(ValueError, match="needs 4"):
        Scheduler(config, BlockManager(3, 16))


def test_prefix_cache_hit_skips_computed_blocks_on_admission():
    s = _scheduler(prefix=True, n_parallel=1, ubatch_size=64, batch_size=64)
    s.add_request(_req("a", 10, max_tokens=1))
    _, finished = _step(s)
    assert [r.request_id for r in finished] == ["a"]
    s.add_request(_req("b", 10, max_tokens=1))
    out, _ = _step(s)
    assert _shape(out) == [("b", 8, 2, True)]  # two 4-token blocks came from the cache
    assert out.scheduled[0].request.num_cached_tokens == 8


def test_prefix_cache_stats_and_a_readmitted_request_keeps_its_first_cached_count():
    # 6 blocks of 4; a runs alone first and leaves 2 cached blocks behind
    s = _scheduler(num_blocks=6, ctx_size=24, prefix=True, n_parallel=2, ubatch_size=16,
                   batch_size=32)  # fmt: skip
    s.add_request(_req("a", 9, max_tokens=1))
    _step(s)
    stats = s.block_manager.prefix_cache_stats
    assert (stats.num_requests, stats.num_queried_tokens, stats.num_hit_tokens) == (1, 9, 0)
    s.add_request(_req("b", 9, max_tokens=12, ignore_eos=True))  # hits a's 2 blocks
    s.add_request(_req("c", 2, max_tokens=20, ignore_eos=True))
    out, _ = _step(s)
    assert _shape(out) == [("b", 8, 1, True), ("c", 0, 2, True)]
    assert (stats.num_requests, stats.num_queried_tokens, stats.num_hit_tokens) == (3, 20, 8)
    assert stats.hit_rate == pytest.approx(8 / 20)
    c = s.requests["c"]
    for _ in range(6):
        out, _ = _step(s)
    # b and c grew to 4 + 2 blocks; b needs a 5th: c (7 tokens: 1 full block, cached) goes
    out, _ = _step(s)
    assert out.preempted_ids == ["c"]
    log = []
    while s.has_unfinished_requests():
        out, _ = _step(s)
        log += _shape(out)
    # readmitted with 9 tokens (2 prompt + 7 output) it found its own first block again ...
    assert ("c", 4, 5, True) in log
    assert (stats.num_requests, stats.num_queried_tokens, stats.num_hit_tokens) == (4, 29, 12)
    # ... but num_cached_tokens keeps the first admission's count: prompt tokens only
    assert c.num_cached_tokens == 0
    assert s.block_manager.usage == 0.0


# --- property: random workloads never leak or double-free KV blocks ---------------------------


def _check_live_state(s: Scheduler, prefix: bool) -> None:
    bm = s.block_manager
    live = list(s.requests.values())
    bm.check_invariants(live)
    assert len(s.running) <= s.config.n_parallel
    held: set[int] = set()
    for r in s.running:
        assert r.status is RequestStatus.RUNNING
        assert len(r.block_table) == cdiv(r.num_computed_tokens, bm.block_size)
        assert r.num_computed_tokens < r.num_tokens <= s.config.ctx_size - 0
        if not prefix:
            assert held.isdisjoint(r.block_table), "two live requests share a block"
        held.update(r.block_table)
    for r in s.waiting:
        assert r.block_table == [] and r.num_computed_tokens == 0
    assert bm.num_free_blocks == bm.num_blocks - len(held)


class PagedKV:
    """What a model runner does with the block tables: write fed tokens, read contexts back.

    A slot holds (position, token id). Reading a context checks every slot it goes through, so a
    block adopted from the prefix cache with other tokens, other positions or overwritten entries
    fails here; a write into a block that another request shares, or that is registered in the
    prefix cache, fails too (those blocks must stay immutable).
    """

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.slots: dict[int, tuple[int, int]] = {}

    def _slot(self, r: Request, pos: int) -> int:
        bs = self.bm.block_size
        return r.block_table[pos // bs] * bs + pos % bs

    def execute(self, out: SchedulerOutput) -> None:
        bs = self.bm.block_size
        for item in out.scheduled:
            r = item.request
            for pos in range(item.start_pos, item.seq_len):
                block = self.bm.blocks[r.block_table[pos // bs]]
                assert block.ref_count == 1, f"{r.request_id} writes into shared {block}"
                assert block.hash is None, f"{r.request_id} writes into cached {block}"
                self.slots[self._slot(r, pos)] = (pos, r.all_token_ids[pos])
        for item in out.scheduled:  # attention reads after every write of the step
            r = item.request
            for pos in range(item.seq_len):
                assert self.slots.get(self._slot(r, pos)) == (pos, r.all_token_ids[pos]), (
                    f"{r.request_id}: KV entry of position {pos} is wrong"
                )


@pytest.mark.parametrize("prefix", [False, True], ids=["no_prefix_cache", "prefix_cache"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_workload_never_leaks_or_double_frees(prefix, data):
    block_size = data.draw(st.integers(1, 4), label="block_size")
    ctx = data.draw(st.integers(8, 20), label="ctx")
    batch = data.draw(st.integers(1, 16), label="batch_size")
    config = EngineConfig(
        ctx_size=ctx,
        batch_size=batch,
        ubatch_size=data.draw(st.integers(1, batch), label="ubatch_size"),
        n_parallel=data.draw(st.integers(1, 4), label="n_parallel"),
        block_size=block_size,
    )
    num_blocks = cdiv(ctx, block_size) + data.draw(st.integers(0, 3), label="extra_blocks")
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    s = Scheduler(config, bm, eog_ids=[EOG])
    kv = PagedKV(bm)
    next_id = 0
    tokens = st.sampled_from([1, 2, 3, EOG])  # a tiny alphabet: prefixes repeat, EOG happens
    # prompts start with a piece of one of two shared prompts, then go their own way
    shared = [data.draw(st.lists(st.sampled_from([1, 2, 3]), min_size=ctx, max_size=ctx),
                        label=f"shared_prompt_{i}") for i in range(2)]  # fmt: skip

    def step(abort_mid_step: bool) -> None:
        hits_before = bm.prefix_cache_stats.num_hit_tokens
        out = s.schedule()
        assert out.total_num_tokens <= config.batch_size
        if out.preempted_ids:
            event("preemption")
        if bm.prefix_cache_stats.num_hit_tokens > hits_before:
            event("prefix cache hit")
        for item in out.scheduled:
            r = item.request
            assert r.num_computed_tokens == item.start_pos
            assert 1 <= item.num_tokens <= config.ubatch_size
            assert len(r.block_table) == cdiv(item.start_pos + item.num_tokens, block_size)
            assert item.sample == (item.start_pos + item.num_tokens == r.num_tokens)
        _check_live_state_mid_step(s, prefix)
        kv.execute(out)
        if abort_mid_step and out.scheduled:
            victim = data.draw(st.sampled_from(out.scheduled)).request_id
            s.abort_request(victim)
        sampled = {x.request_id: data.draw(tokens) for x in out.scheduled if x.sample}
        s.update_from_output(out, sampled)

    for _ in range(data.draw(st.integers(1, 40), label="num_ops")):
        op = data.draw(
            st.sampled_from(["add", "add", "add", "step", "step", "step", "abort", "stop"])
        )
        if op == "add":
            n = data.draw(st.integers(1, ctx - 1))
            head = data.draw(st.sampled_from(shared))[: data.draw(st.integers(0, n))]
            tail = data.draw(st.lists(st.sampled_from([1, 2, 3]), min_size=n - len(head),
                                      max_size=n - len(head)))  # fmt: skip
            params = SamplingParams(
                max_tokens=data.draw(st.integers(1, 8)), ignore_eos=data.draw(st.booleans())
            )
            s.add_request(Request(f"r{next_id}", head + tail, params))
            next_id += 1
        elif op == "step":
            step(abort_mid_step=data.draw(st.booleans()))
        elif s.requests:
            rid = data.draw(st.sampled_from(sorted(s.requests)))
            if op == "abort":
                assert s.abort_request(rid)
            elif s.requests[rid].status is RequestStatus.RUNNING:
                assert s.finish_request(rid, "stop")  # what the engine does for a stop string
        _check_live_state(s, prefix)

    for _ in range(10_000):  # drain: every request ends by EOG, max_tokens or ctx_size
        if not s.has_unfinished_requests():
            break
        step(abort_mid_step=False)
        _check_live_state(s, prefix)
    assert not s.has_unfinished_requests()
    # KV use is back to zero; cached blocks may remain, all of them free (evicted on demand)
    assert bm.num_free_blocks == num_blocks and bm.usage == 0.0 and bm.num_used_blocks == 0
    if not prefix:
        assert bm.num_cached_blocks == 0 and bm.prefix_cache_stats.num_requests == 0
    bm.check_invariants([])


def _check_live_state_mid_step(s: Scheduler, prefix: bool) -> None:
    """Between schedule() and update: tables cover the scheduled tokens; ref counts agree."""
    s.block_manager.check_invariants(list(s.requests.values()))
    if not prefix:
        seen: set[int] = set()
        for r in s.running:
            assert seen.isdisjoint(r.block_table)
            seen.update(r.block_table)


@pytest.mark.parametrize("tokens,max_tokens,ignore_eos,kept,reason", [
    ([5, 6, 7], 16, False, 3, None),  # nothing ends it
    ([5, EOG, 7], 16, False, 2, "stop"),  # the EOG is kept, what follows dropped
    ([5, EOG, 7], 16, True, 3, None),
    ([5, 6, EOG], 3, False, 3, "stop"),  # EOG on the max_tokens-th token: "stop" wins
    ([5, 6, 7, EOG], 3, False, 3, "length"),  # max_tokens first
    ([5, 6, 7], 3, False, 3, "length"),
], ids=["none", "eog", "ignore-eos", "tie", "max-first", "max-last"])  # fmt: skip
def test_a_bursts_tokens_are_cut_where_the_request_ends(tokens, max_tokens, ignore_eos, kept,
                                                         reason):  # fmt: skip
    """update_from_output takes a burst's tokens in order up to the first that ends the request,
    exactly as one token a step would (the prompt step samples one; the burst brings the rest)."""
    s = _scheduler()
    s.add_request(_req("a", 5, max_tokens=max_tokens + 1, ignore_eos=ignore_eos))
    _step(s)  # the prompt, and its first token
    request = s.requests["a"]
    out = s.schedule()
    assert s.block_manager.allocate_slots(request, len(tokens))
    finished = s.update_from_output(out, {"a": tokens})
    assert request.output_token_ids == [7] + tokens[:kept]
    assert request.num_computed_tokens == 5 + kept  # the prompt and the fed tokens
    assert (request.finish_reason, bool(finished)) == (reason, reason is not None)


def test_a_burst_stops_at_the_context_size():
    s = _scheduler(ctx_size=12)
    s.add_request(_req("a", 8, max_tokens=50))
    _step(s)  # 8 prompt tokens + 1: three more fill the context
    request = s.requests["a"]
    out = s.schedule()
    assert s.block_manager.allocate_slots(request, 5)
    assert s.update_from_output(out, {"a": [1, 2, 3, 4, 5]}) == [request]
    assert request.output_token_ids == [7, 1, 2, 3] and request.finish_reason == "length"


def test_an_empty_burst_is_an_error_not_a_silent_rewind():
    s = _scheduler()
    s.add_request(_req("a", 5))
    _step(s)
    out = s.schedule()
    with pytest.raises(ValueError, match="empty burst"):
        s.update_from_output(out, {"a": []})
