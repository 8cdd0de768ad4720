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
