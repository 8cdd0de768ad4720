"""PrefillGraphs without a GPU: which chunks they cover, the capture loop's bookkeeping, and the
padding contract of a replay on the CPU reference path (the graph replaced by its eager step)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from llcuda.runner.cuda_graphs import PrefillGraphs


def _graphs(max_tokens: int, max_seq_len: int) -> PrefillGraphs:
    model = SimpleNamespace(head_device=torch.device("cpu"),
                            config=SimpleNamespace(hidden_size=8))
    return PrefillGraphs(model, [], max_tokens=max_tokens, max_blocks_per_seq=4,
                         max_seq_len=max_seq_len)


def prefill_chunks(runner):
    """One sequence's prompt in the chunks both prefill-graph tests replay: first chunks of 2, 17
    and 64 tokens, then 17 over 64 cached ones. Yields (x, positions, slots, seq_len, block
    table, the sliding group's (slots, table) or (None, None) where the cache has one group,
    the eager forward's last-token logits [1, vocab]); the eager forward has written the chunk's
    K/V by then. Any blocks will do: the engine is idle."""
    from llcuda.layers.attention import AttentionMetadata

    model, dev, bs = runner.model, runner.device, runner.block_size
    table = torch.arange(runner.max_blocks_per_seq, dtype=torch.int32)
    # the sliding group's pool is smaller: 81 tokens take its first 3 blocks all the same
    swa_table = table % runner.kv_cache_groups[-1].num_blocks
    ids = torch.randint(300, 1000, (81,), generator=torch.Generator().manual_seed(1))
    for start, n in ((0, 2), (0, 17), (0, 64), (64, 17)):
        pos = torch.arange(start, start + n)
        slots = table[pos // bs].long() * bs + pos % bs
        swa = (None, None)
        if runner.num_groups > 1:
            swa = (swa_table[pos // bs].long() * bs + pos % bs, swa_table)
        x = model.embed(ids[start : start + n])
        meta = AttentionMetadata(
            slot_mapping=slots.to(dev),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([start + n], dtype=torch.int32, device=dev),
            block_tables=table[None].to(dev), max_query_len=n, max_seq_len=start + n,
            swa_slot_mapping=None if swa[0] is None else swa[0].to(dev),
            swa_block_tables=None if swa[1] is None else swa[1][None].to(dev),
        )
        with torch.inference_mode():
            hidden = model.forward(x, pos.to(dev), {dev: meta}, runner.kv_caches)
            eager = model.compute_logits(hidden[-1:])
        yield x, pos, slots, start + n, table, swa, eager


def test_buckets_stop_at_the_chunk_size_and_the_context():
    assert _graphs(512, 4096).buckets == [16, 32, 64, 128, 256, 512]
    assert _graphs(100, 4096).buckets == [16, 32, 64]  # ubatch 100: chunks of <= 100 tokens
    # a bucket longer than the context would ask attention for more queries than keys
    assert _graphs(512, 264).buckets == [16, 32, 64, 128, 256]
    assert _graphs(8, 4096).buckets == []


def test_bucket_for_a_chunk():
    graphs = _graphs(512, 4096)
    assert graphs.bucket_for(2) == 16
    assert graphs.bucket_for(17) == 32
    assert graphs.bucket_for(512) == 512
    assert graphs.bucket_for(513) is None
    assert _graphs(8, 4096).bucket_for(5) is None


def test_capture_goes_largest_first_and_shares_one_pool(monkeypatch):
    """The capture loop's bookkeeping, with torch's graph API replaced by a recorder: every bucket
    runs once eagerly, then under capture with the pool of the first graph (or the one passed)."""
    import llcuda.runner.cuda_graphs as cg

    events = []

    class FakeGraph:
        def pool(self):
            return "pool-of-first-graph"

    class FakeCapture:
        def __init__(self, graph, pool=None):
            events.append(("capture", pool))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cg.torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(cg.torch.cuda, "graph", FakeCapture)
    monkeypatch.setattr(cg.torch.cuda, "synchronize", lambda device=None: None)
    graphs = _graphs(64, 4096)
    monkeypatch.setattr(graphs, "_step", lambda b: events.append(("step", b)) or f"logits{b}")
    assert graphs.capture() == "pool-of-first-graph"
    assert events == [("step", 64), ("capture", None), ("step", 64),
                      ("step", 32), ("capture", "pool-of-first-graph"), ("step", 32),
                      ("step", 16), ("capture", "pool-of-first-graph"), ("step", 16)]
    assert graphs.logits == {64: "logits64", 32: "logits32", 16: "logits16"}
    assert set(graphs.graphs) == {16, 32, 64}
    events.clear()
    small = _graphs(16, 4096)
    monkeypatch.setattr(small, "_step", lambda b: f"logits{b}")
    assert small.capture("shared") == "shared"  # a pool passed in is used and kept
    assert events == [("capture", "shared")]


def test_padded_step_equals_the_eager_forward_on_cpu(tmp_path):
    """The captured step over a chunk padded to its bucket, run eagerly on the CPU reference path:
    last-token logits as the unpadded forward's, and no K/V written outside the chunk's slots
    (padding rows carry slot -1). First chunks of 2, 17 and 64 tokens, then 17 over 64 cached."""
    from llcuda.config import EngineConfig
    from llcuda.engine.loader import load
    from llcuda.gguf.synthetic import TINY, write_gemma3_gguf

    path = write_gemma3_gguf(tmp_path / "tiny.gguf", **{**TINY, "sliding_window": 16}, seed=3)
    config = EngineConfig(ctx_size=256, n_parallel=1, batch_size=256, ubatch_size=64,
                          device="cpu")
    loaded = load(str(path), config, verbose=False)
    runner = loaded.llm_engine.model_runner
    model = runner.model
    graphs = PrefillGraphs(model, runner.kv_caches, max_tokens=64,
                           max_blocks_per_seq=runner.max_blocks_per_seq, max_seq_len=256)

    class EagerReplay:  # stands in for a captured graph
        def __init__(self, bucket: int):
            self.bucket = bucket

        def replay(self):
            graphs.logits[self.bucket] = graphs._step(self.bucket)

    graphs.graphs = {b: EagerReplay(b) for b in graphs.buckets}
    assert runner.num_groups == 2  # the sliding layers keep a cache group of their own
    for x, pos, slots, seq_len, table, swa, eager in prefill_chunks(runner):
        with torch.inference_mode():
            before = [(c.k.clone(), c.v.clone()) for c in runner.kv_caches]
            padded = graphs.run(x, pos, slots, seq_len, table, *swa)
        assert padded.shape == eager.shape == (1, model.config.vocab_size)
        torch.testing.assert_close(padded, eager, rtol=1e-4, atol=1e-4)
        for cache, (k0, v0) in zip(runner.kv_caches, before, strict=True):
            for now, was in ((cache.k, k0), (cache.v, v0)):
                now, was = now.flatten(0, 1), was.flatten(0, 1)  # [slots, kv_heads, head_dim]
                others = torch.ones(now.shape[0], dtype=torch.bool)
                others[swa[0] if cache.group else slots] = False
                assert torch.equal(now[others], was[others])
    loaded.close()
