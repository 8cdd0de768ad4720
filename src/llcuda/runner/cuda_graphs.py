"""CUDA graphs of the decode step: one new token for each of B sequences, B padded to a bucket.

A decode step of a small model is a few hundred short kernels; launched one by one from Python
they cost more than they compute. Capturing the step once per batch-size bucket and replaying it
costs one launch. What changes between steps lives in static buffers that are refilled before
each replay: the embeddings, positions, cache slots, context lengths and block tables.

Padding rows (B < bucket) write their K/V into a scratch block that no sequence owns and attend
to it alone, so they can never disturb a real sequence; their logits are dropped.
"""

from __future__ import annotations

import torch

from llcuda.layers.attention import AttentionMetadata, KVCache

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(
        self,
        model,
        kv_caches: list[KVCache],
        max_batch: int,
        max_blocks_per_seq: int,
        max_seq_len: int,
        scratch_block: int,
        block_size: int,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.device = model.head_device
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_seq_len = max_seq_len
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        n, dev = self.buckets[-1], self.device
        hidden = model.config.hidden_size
        self.x = torch.zeros(n, hidden, dtype=torch.float32, device=dev)  # [max_batch, hidden]
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.full(
            (n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=dev
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> [bucket, vocab] output buffer
        self.pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
        )

    def _step(self, b: int) -> torch.Tensor:
        metas = {self.device: self._meta(b)}
        hidden = self.model.forward(self.x[:b], self.positions[:b], metas, self.kv_caches)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool."""
        for b in reversed(self.buckets):
            self._step(b)  # warm-up: compiles the Triton kernels for these shapes
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[b] = self._step(b)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def run(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> torch.Tensor:
        """Replay the decode step for B sequences; returns logits [B, vocab] (a view, valid until
        the next replay). Inputs may be on the CPU; block_tables: [B, <= max_blocks_per_seq]."""
        batch = x.shape[0]
        b = self.bucket_for(batch)
        assert b is not None, f"decode batch {batch} exceeds the largest graph ({self.buckets[-1]})"
        self.x[:batch].copy_(x, non_blocking=True)
        self.positions[:batch].copy_(positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(slot_mapping, non_blocking=True)
        self.seq_lens[:batch].copy_(seq_lens, non_blocking=True)
        self.block_tables[:batch, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        # rows past `batch` keep pointing at the scratch block (reset after a larger batch)
        self.slot_mapping[batch:b].fill_(self.scratch_slot)
        self.seq_lens[batch:b].fill_(1)
        self.positions[batch:b].zero_()
        self.block_tables[batch:b].fill_(self.scratch_block)
        self.graphs[b].replay()
        return self.logits[b][:batch]
