"""Which prompt chunks the prefill CUDA graphs cover (no GPU needed: nothing is captured)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from llcuda.runner.cuda_graphs import PrefillGraphs


def _graphs(max_tokens: int, max_seq_len: int) -> PrefillGraphs:
    model = SimpleNamespace(head_device=torch.device("cpu"),
                            config=SimpleNamespace(hidden_size=8))
    return PrefillGraphs(model, [], max_tokens=max_tokens, max_blocks_per_seq=4,
                         max_seq_len=max_seq_len)


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
