"""Attention over the paged KV cache: per-step metadata and the per-layer cache.

The ops that use them: kernels/ops.qk_norm_rope_store_kv (writes a step's k, v) and
kernels/ops.paged_attention."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class AttentionMetadata:
    """Per-step tensors that tell attention where each sequence's tokens and cache blocks are.

    The flat batch holds the new tokens of num_seqs sequences back to back (num_tokens in all).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block_id * block_size + offset)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: offsets of each sequence in the batch
    seq_lens: torch.Tensor  # [num_seqs] int32 (int64 in the decode graphs): context length
    # after this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32: cache blocks per sequence
    # Longest run of new tokens of one sequence (1 in a pure decode step). Exact: the attention
    # kernel takes 1 with as many tokens as sequences for a decode step (one query each).
    max_query_len: int
    max_seq_len: int  # longest context in the step
    # Where the sliding-window layers keep a cache group of their own (engine/kv_cache_manager.py):
    # that group's slot_mapping [num_tokens] and block_tables [num_seqs, max_blocks_per_seq]
    swa_slot_mapping: torch.Tensor | None = None
    swa_block_tables: torch.Tensor | None = None

    def for_group(self, group: int) -> AttentionMetadata:
        """The metadata a layer of cache group `group` reads: 0 full attention, 1 sliding."""
        if group == 0:
            return self
        if self.swa_slot_mapping is None or self.swa_block_tables is None:
            raise ValueError("a sliding-window cache group needs swa_slot_mapping/swa_block_tables")
        return replace(self, slot_mapping=self.swa_slot_mapping,
                       block_tables=self.swa_block_tables)  # fmt: skip

    def to(self, device: torch.device | str) -> AttentionMetadata:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if torch.is_tensor(value) else value
        return AttentionMetadata(**moved)


@dataclass
class KVCache:
    """One layer's paged cache. K is stored after RoPE, as llama.cpp does."""

    k: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    group: int = 0  # cache group (0 full attention, 1 sliding window): which metadata it reads

    @staticmethod
    def allocate(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        group: int = 0,
    ) -> KVCache:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return KVCache(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
            group,
        )

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

