"""KV-cache groups: full-attention layers and sliding-window layers keep separate block pools.

Gemma 3 attends to the whole context on one layer in six and to the last 512 positions on the
others. Holding every layer's cache at ctx_size wastes most of it: the sliding layers (22 of the
1B model's 26) only ever read their last window. As llama.cpp's SWA cache and vLLM's hybrid
allocator do, those layers get a pool of their own, sized for n_parallel windows, and each
request a second block table in which the blocks behind the window go back to the pool.

Both tables are indexed by absolute position (token i in block i // block_size), so attention
and the K/V writes need nothing new: a sliding layer is handed its group's slot mapping and block
table, and never reads an entry before its window (where the dropped blocks' placeholders sit).

`KVCacheManager` presents the groups as one BlockManager to the scheduler: allocation is all or
nothing over the groups, and a prefix-cache hit must be found in both (the sliding group needs the
blocks of the last window before the hit's end, or the first new query would miss keys).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llcuda.config import EngineConfig, ModelConfig
from llcuda.engine.block_manager import BlockManager, PrefixCacheStats, cdiv
from llcuda.engine.request import Request

# Decode steps per burst when num_scheduler_steps is left open on a GPU with CUDA graphs
# (runner/model_runner.py default_decode_steps). Bursts reserve blocks for their steps ahead of
# time: a burst plus one chained behind it (engine/llm_engine.py _burst_length).
DEFAULT_DECODE_STEPS = 16


@dataclass(frozen=True)
class KVCacheGroup:
    """One block pool and the layers that use it."""

    num_blocks: int
    sliding_window: int  # 0: full attention
    layers: tuple[int, ...]


def kv_cache_groups(model: ModelConfig, config: EngineConfig) -> list[KVCacheGroup]:
    """The full-attention group (every layer when the model has no sliding window or
    `config.swa_full`), then the sliding-window group if there is one.

    A sliding request holds at most the blocks of one window plus the tokens it feeds in one
    step (a prompt chunk of ubatch_size, or the positions two chained decode bursts reserve)."""
    layers = range(model.num_layers)
    sliding = tuple(i for i in layers if model.is_sliding(i))
    full = tuple(i for i in layers if not model.is_sliding(i))
    if not sliding or not full or config.swa_full:
        return [KVCacheGroup(config.num_blocks, 0, tuple(layers))]
    window = model.sliding_window
    steps = max(config.num_scheduler_steps or DEFAULT_DECODE_STEPS, DEFAULT_DECODE_STEPS)
    fed = max(min(config.ubatch_size, config.batch_size), 2 * steps)
    per_seq = min(cdiv(window - 1 + fed, config.block_size) + 1, config.max_blocks_per_seq)
    return [
        KVCacheGroup(config.num_blocks, 0, full),
        KVCacheGroup(min(config.n_parallel * per_seq, config.num_blocks), window, sliding),
    ]


@dataclass
class PrefixHit:
    """Cached blocks of a request's prefix in every group (`find_cached_blocks`)."""

    blocks: list[list[int | None]]  # per group, one entry per prefix block (None: out of window)

    def __len__(self) -> int:
        return len(self.blocks[0])


class KVCacheManager:
    """The BlockManager interface over several cache groups (see the module docstring)."""

    def __init__(self, groups: Sequence[KVCacheGroup], block_size: int,
                 enable_prefix_caching: bool = False):  # fmt: skip
        self.groups = [
            BlockManager(g.num_blocks, block_size, enable_prefix_caching, g.sliding_window, i)
            for i, g in enumerate(groups)
        ]
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def main(self) -> BlockManager:
        """The full-attention group: what KV use and capacity are reported for."""
        return self.groups[0]

    @property
    def num_blocks(self) -> int:
        return self.main.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.main.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.main.num_used_blocks

    @property
    def usage(self) -> float:
        """The fuller group's share of held blocks, in [0, 1]."""
        return max(g.usage for g in self.groups)

    @property
    def num_cached_blocks(self) -> int:
        return self.main.num_cached_blocks

    def can_allocate(self, request: Request, num_new_tokens: int,
                     cached_blocks: PrefixHit | Sequence[int] = ()) -> bool:  # fmt: skip
        hits = self._hits(cached_blocks)
        return all(g.can_allocate(request, num_new_tokens, h)
                   for g, h in zip(self.groups, hits, strict=True))  # fmt: skip

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       cached_blocks: PrefixHit | Sequence[int] = ()) -> bool:  # fmt: skip
        """BlockManager.allocate_slots in every group, all or nothing."""
        if not self.can_allocate(request, num_new_tokens, cached_blocks):
            return False
        for group, group_hits in zip(self.groups, self._hits(cached_blocks), strict=True):
            group.commit_slots(request, num_new_tokens, group_hits)
        return True

    def _hits(self, cached_blocks: PrefixHit | Sequence[int]) -> list[Sequence[int | None]]:
        if isinstance(cached_blocks, PrefixHit):
            return cached_blocks.blocks
        if cached_blocks and len(self.groups) > 1:
            raise TypeError("cached blocks of several groups come from find_cached_blocks")
        return [cached_blocks] + [() for _ in self.groups[1:]]

    def free(self, request: Request) -> None:
        for group in self.groups:
            group.free(request)

    def find_cached_blocks(self, request: Request) -> PrefixHit:
        """The longest cached prefix found in every group. The full group must hold all of its
        blocks; the sliding group those a query right after the prefix can see."""
        full = self.main.find_cached_blocks(request)
        num_hit = len(full)
        while num_hit and len(self.groups) > 1:
            swa = self.groups[1]
            first = swa.first_needed_block(num_hit * self.block_size)
            hashes = request.block_hashes[:num_hit]
            window = [swa.cached_block(h) for h in hashes[first:]]
            missing = [first + i for i, b in enumerate(window) if b is None]
            if not missing:
                return PrefixHit([full[:num_hit], [None] * first + window])
            num_hit = missing[-1]  # any longer prefix would need that block too
        return PrefixHit([full[:num_hit]] + [[] for _ in self.groups[1:]])

    def cache_full_blocks(self, request: Request) -> None:
        for group in self.groups:
            group.cache_full_blocks(request)

    def reset_prefix_cache(self) -> None:
        for group in self.groups:
            group.reset_prefix_cache()

    def check_invariants(self, live_requests: Iterable[Request]) -> None:
        live = list(live_requests)
        for group in self.groups:
            group.check_invariants(live)
