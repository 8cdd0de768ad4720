"""CUDA graphs of the model step, one per size bucket, replayed with one launch.

A step of a small model is a few hundred short kernels; launched one by one from Python they cost
more than they compute (a 512-token prefill of Gemma 3 1B: ~5 ms of GPU work, ~20 ms of host
time). Capturing the step once per bucket and replaying it costs one launch. What changes between
steps lives in static buffers that are refilled before each replay: the embeddings, positions,
cache slots, context lengths and block tables (of each KV-cache group: the sliding-window layers
may keep their own, engine/kv_cache_manager.py). Two kinds:

* `DecodeGraphs`: one new token for each of B sequences, B padded to a batch bucket. Padding rows
  write their K/V into a scratch block (one per cache group) that no sequence owns and attend to
  it alone, so they can never disturb a real sequence; their logits are dropped.
* `PrefillGraphs`: one sequence's chunk of T prompt tokens, T padded to a token bucket. Padding
  rows come after the sequence's last query (query_start_loc[-1] = T): attention leaves them
  unwritten, write_kv skips their negative slots, and every other op is row-wise, so whatever
  they hold stays in their rows. Only row T - 1's logits are computed.

All graphs share one memory pool (they never run at the same time), captured largest first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from llcuda.layers.attention import AttentionMetadata, KVCache

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Prompt-chunk token buckets: powers of two up to the engine's ubatch_size (its largest chunk),
# capped so the graphs' activations stay a small share of memory.
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


class _BucketGraphs(ABC):
    """One graph per size bucket, all in one memory pool. Subclasses set `buckets` and `device`
    and define `_step(bucket)`, the eager step whose output the graph keeps."""

    buckets: list[int]
    device: torch.device

    def __init__(self):
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> its output buffer
        self.pool = None

    @abstractmethod
    def _step(self, bucket: int) -> torch.Tensor:
        """One eager step at `bucket` rows, reading the static buffers; returns its logits."""

    @torch.inference_mode()
    def capture(self, pool=None):
        """Capture every bucket, largest first so smaller graphs reuse its memory; returns the
        memory pool (pass it to the next graphs' capture to share it)."""
        self.pool = pool
        for b in reversed(self.buckets):
            self._step(b)  # warm-up: compiles the Triton kernels for these shapes
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[b] = self._step(b)
            torch.cuda.synchronize(self.device)
            self.pool = self.pool if self.pool is not None else graph.pool()
            self.graphs[b] = graph
        return self.pool

    def bucket_for(self, size: int) -> int | None:
        """The smallest bucket that holds `size` (sequences or tokens), None past the largest."""
        return next((b for b in self.buckets if b >= size), None)


class DecodeGraphs(_BucketGraphs):
    def __init__(
        self,
        model,
        kv_caches: list[KVCache],
        max_batch: int,
        max_blocks_per_seq: int,
        max_seq_len: int,
        scratch_blocks: list[int],
        block_size: int,
    ):
        super().__init__()
        self.model = model
        self.kv_caches = kv_caches
        self.device = model.head_device
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_seq_len = max_seq_len
        self.scratch_blocks = scratch_blocks  # per cache group
        self.scratch_slots = [b * block_size for b in scratch_blocks]
        n, dev = self.buckets[-1], self.device
        hidden = model.config.hidden_size
        self.x = torch.zeros(n, hidden, dtype=torch.float32, device=dev)  # [max_batch, hidden]
        # positions, cache slots, context lengths (and the sliding group's slots): one buffer
        # [3 or 4, max_batch], one copy a step (pack_step_inputs)
        self.step_inputs = torch.zeros(2 + len(scratch_blocks), n, dtype=torch.int64, device=dev)
        self.positions, self.slot_mapping, self.seq_lens, *swa = self.step_inputs.unbind(0)
        self.swa_slot_mapping = swa[0] if swa else None
        self.slot_mappings = [self.slot_mapping, *swa]  # per cache group
        self.seq_lens.fill_(1)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables = [
            torch.full((n, max_blocks_per_seq), block, dtype=torch.int32, device=dev)
            for block in scratch_blocks
        ]  # per cache group
        for slots, scratch in zip(self.slot_mappings, self.scratch_slots, strict=True):
            slots.fill_(scratch)
        self._bucket = self._batch = 0  # of the last prepare()

    def _meta(self, b: int) -> AttentionMetadata:
        swa = self.swa_slot_mapping is not None
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[0][:b],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            swa_slot_mapping=self.swa_slot_mapping[:b] if swa else None,
            swa_block_tables=self.block_tables[1][:b] if swa else None,
        )

    def _step(self, b: int) -> torch.Tensor:
        metas = {self.device: self._meta(b)}
        hidden = self.model.forward(self.x[:b], self.positions[:b], metas, self.kv_caches)
        return self.model.compute_logits(hidden)

    def run(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        swa_slot_mapping: torch.Tensor | None = None,
        swa_block_tables: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Replay the decode step for B sequences; returns logits [B, vocab] (a view, valid until
        the next replay). Inputs may be on the CPU; block_tables: [B, <= max_blocks_per_seq];
        the swa_ pair: the sliding-window group's, where the cache has one."""
        self.prepare(x.shape[0], block_tables, swa_block_tables)
        self.x[: x.shape[0]].copy_(x, non_blocking=True)
        return self.replay(pack_step_inputs(positions, slot_mapping, seq_lens, swa_slot_mapping))

    def prepare(self, batch: int, block_tables: torch.Tensor,
                swa_block_tables: torch.Tensor | None = None) -> None:  # fmt: skip
        """Set up replays for `batch` sequences with these block tables [batch, <= max_blocks_per_
        seq] (and the sliding group's): the tables copied in, the bucket's padding rows pointed at
        the scratch blocks. A decode burst calls this once and then, per step, writes
        `x[:batch]` and replay()s."""
        b = self.bucket_for(batch)
        assert b is not None, f"decode batch {batch} exceeds the largest graph ({self.buckets[-1]})"
        tables = [block_tables, swa_block_tables][: len(self.block_tables)]
        assert all(t is not None for t in tables), "the sliding group's block tables are missing"
        for static, table, scratch in zip(self.block_tables, tables, self.scratch_blocks,
                                          strict=True):  # fmt: skip
            static[:batch, : table.shape[1]].copy_(table, non_blocking=True)
            # rows past `batch` keep pointing at the scratch block (reset after a larger batch)
            static[batch:b].fill_(scratch)
        for slots, scratch in zip(self.slot_mappings, self.scratch_slots, strict=True):
            slots[batch:b].fill_(scratch)
        self.seq_lens[batch:b].fill_(1)
        self.positions[batch:b].zero_()
        self._bucket, self._batch = b, batch

    def replay(self, step_inputs: torch.Tensor) -> torch.Tensor:
        """One decode step for the prepared batch: step_inputs [3 or 4, batch] int64 (positions,
        cache slots, context lengths, the sliding group's slots; pack_step_inputs) on any device;
        x[:batch] holds the embeddings. Returns logits [batch, vocab] (a view, valid until the
        next replay)."""
        self.step_inputs[:, : self._batch].copy_(step_inputs, non_blocking=True)
        self.graphs[self._bucket].replay()
        return self.logits[self._bucket][: self._batch]


def pack_step_inputs(positions: torch.Tensor, slot_mapping: torch.Tensor, seq_lens: torch.Tensor,
                     swa_slot_mapping: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """[..., 3 or 4, B] int64 of a decode step's positions, cache slots, context lengths and the
    sliding group's cache slots if any (each [..., B], on one device): what DecodeGraphs.replay
    copies in one go."""
    rows = [positions, slot_mapping, seq_lens]
    if swa_slot_mapping is not None:
        rows.append(swa_slot_mapping)
    return torch.stack([t.to(torch.int64) for t in rows], dim=-2)


class PrefillGraphs(_BucketGraphs):
    """Graphs of a step that feeds one sequence T > 1 prompt tokens (its first chunk or a later
    one), T padded to the next token bucket; returns the logits of its last token."""

    def __init__(self, model, kv_caches: list[KVCache], max_tokens: int, max_blocks_per_seq: int,
                 max_seq_len: int):
        super().__init__()
        self.model = model
        self.kv_caches = kv_caches
        self.device = model.head_device
        # a chunk is at most ubatch_size tokens and never longer than the context
        self.buckets = [b for b in PREFILL_BUCKETS if b <= min(max_tokens, max_seq_len)]
        self.max_seq_len = max_seq_len
        n, dev = self.buckets[-1] if self.buckets else 0, self.device
        self.x = torch.zeros(n, model.config.hidden_size, dtype=torch.float32, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)  # -1: no write
        self.query_start_loc = torch.tensor([0, 1], dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((1, max_blocks_per_seq), dtype=torch.int32, device=dev)
        # the sliding-window group's, where its layers keep one (engine/kv_cache_manager.py)
        self.swa_slot_mapping = self.swa_block_tables = None
        if any(cache.group for cache in kv_caches):
            self.swa_slot_mapping = self.slot_mapping.clone()
            self.swa_block_tables = self.block_tables.clone()
        self.last_row = torch.zeros(1, dtype=torch.int64, device=dev)  # T - 1

    def _step(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            max_query_len=b,
            max_seq_len=self.max_seq_len,
            swa_slot_mapping=None if self.swa_slot_mapping is None else self.swa_slot_mapping[:b],
            swa_block_tables=self.swa_block_tables,
        )
        hidden = self.model.forward(self.x[:b], self.positions[:b], {self.device: meta},
                                    self.kv_caches)
        return self.model.compute_logits(hidden.index_select(0, self.last_row))

    def run(self, x: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            seq_len: int, block_table: torch.Tensor, swa_slot_mapping: torch.Tensor | None = None,
            swa_block_table: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Replay for one sequence's T new tokens: x [T, hidden] (on the device), positions and
        slot_mapping [T], seq_len its context including them, block_table [<= max_blocks_per_seq]
        int32 (and the sliding group's slots and table, where the cache has one). Returns logits
        [1, vocab] of token T - 1 (a view, valid until the next replay)."""
        t = x.shape[0]
        b = self.bucket_for(t)
        assert b is not None and t > 1, f"no prefill graph for {t} tokens"
        self.x[:t].copy_(x, non_blocking=True)
        self.positions[:t].copy_(positions, non_blocking=True)
        self.slot_mapping[:t].copy_(slot_mapping, non_blocking=True)
        self.slot_mapping[t:b].fill_(-1)
        self.positions[t:b].zero_()
        lens = torch.tensor([0, t, seq_len, t - 1], dtype=torch.int64)
        meta = lens.to(self.device, non_blocking=True)
        self.query_start_loc.copy_(meta[:2])
        self.seq_lens.copy_(meta[2:3])
        self.last_row.copy_(meta[3:4])
        self.block_tables[0, : block_table.shape[0]].copy_(block_table, non_blocking=True)
        if self.swa_slot_mapping is not None:
            assert swa_slot_mapping is not None and swa_block_table is not None, (
                "the sliding group's slots and block table are missing")
            self.swa_slot_mapping[:t].copy_(swa_slot_mapping, non_blocking=True)
            self.swa_slot_mapping[t:b].fill_(-1)
            self.swa_block_tables[0, : swa_block_table.shape[0]].copy_(swa_block_table,
                                                                       non_blocking=True)
        self.graphs[b].replay()
        return self.logits[b]
