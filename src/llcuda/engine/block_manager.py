"""Paged KV-cache bookkeeping: which fixed-size blocks of the cache each request owns.

The KV cache is `num_blocks` blocks of `block_size` token slots. Token i of a request lives in
slot `block_table[i // block_size] * block_size + i % block_size`. Blocks are reference counted so
that, with prefix caching on, requests whose prompts share a prefix share the blocks holding it.

Prefix caching (flag `enable_prefix_caching`, on by default in EngineConfig): every *full* block is
named by a chained hash of (parent block's hash, its token ids), so a hash names the whole prefix up
to that block's end. Once a block's tokens are computed, its hash is registered; a new request looks
its own hashes up and adopts the matching blocks instead of recomputing them. Freed blocks keep
their hash and stay findable until they are handed out again (lazy eviction, least recently freed
first). Rules that keep sharing safe:
- only full, computed blocks are registered, and a registered block is never written again: a
  request writes only positions >= its num_computed_tokens, which lie in blocks after the shared
  ones (a shared block's positions are all < num_computed_tokens of every holder);
- the last known token is never served from the cache, so the step that feeds it still produces
  the logits to sample from (a fully cached prompt recomputes its last block);
- "KV use" (`usage`, `num_free_blocks`) counts blocks referenced by live requests: cached blocks
  that no request holds are free, since they are evicted on demand.

A manager serves one cache group (`group`: which of a request's `kv_tables` it keeps). With a
`sliding_window` W its layers attend to the last W positions only: once a request has computed
n tokens, no later query sees a key before n - W + 1, so the blocks wholly before it go back to
the pool (with their prefix hash, findable until evicted) and the table keeps a placeholder.
engine/kv_cache_manager.py puts a full-attention group and a sliding one side by side.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llcuda.engine.request import BlockTable, Request


class KVBlock:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None  # set once the block is full, computed and registered

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_count}, cached={self.hash is not None})"


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained content hash of one full block: names the whole prefix ending with it.

    128-bit BLAKE2b, so two different prefixes never share a name in practice (a collision would
    silently hand one request another prompt's KV entries).
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefixCacheStats:
    """Prefix-cache lookups since start, counted in tokens as vLLM's prefix_cache_queries/_hits.

    One lookup per admission (a preempted request readmitted looks its tokens up again).
    """

    num_requests: int = 0  # admissions that looked the cache up
    num_queried_tokens: int = 0  # tokens those requests held when admitted
    num_hit_tokens: int = 0  # of which the cache already held (not computed again)

    def record(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_requests += 1
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


class BlockManager:
    """Free list + reference counts over `num_blocks` KV blocks, with optional prefix caching."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 sliding_window: int = 0, group: int = 0):  # fmt: skip
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if sliding_window < 0:
            raise ValueError(f"sliding_window must be >= 0, got {sliding_window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window  # 0: full attention, every block stays live
        self.group = group
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # blocks with ref_count 0, in eviction order: the front is handed out first. An OrderedDict
        # because a prefix-cache hit takes a block out of the middle.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> id of the block holding that prefix
        self.prefix_cache_stats = PrefixCacheStats()  # recorded by the scheduler on admission

    # --- queries --------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached-but-free blocks count: they are evicted on demand)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one live request (what KV use reports)."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by prefix hash, held or free."""
        return len(self._cached)

    def num_blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def can_allocate(self, request: Request, num_new_tokens: int,
                     cached_blocks: Sequence[int | None] = ()) -> bool:  # fmt: skip
        """Whether `allocate_slots(request, num_new_tokens, cached_blocks)` would succeed now.
        Raises ValueError for arguments it never takes."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        table = self._table(request)
        if cached_blocks and (table.blocks or request.num_computed_tokens):
            raise ValueError(
                f"request {request.request_id!r}: cached blocks can only start an empty table"
            )
        # blocks behind a sliding window that allocate_slots releases first
        freed = sum(1 for i in range(table.num_dropped, self._first_live_block(request, table))
                    if self.blocks[table.blocks[i]].ref_count == 1)  # fmt: skip
        # adopting a free cached block takes it off the free list too
        taken = sum(1 for b in cached_blocks if b is not None and self.blocks[b].ref_count == 0)
        num_new = self._num_new_blocks(request, table, num_new_tokens, len(cached_blocks))
        return num_new <= len(self._free) + freed - taken

    def first_needed_block(self, num_computed_tokens: int) -> int:
        """The first block a query at position >= num_computed_tokens can see."""
        if not self.sliding_window:
            return 0
        return max(0, num_computed_tokens - self.sliding_window + 1) // self.block_size

    # --- allocation -----------------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_blocks: Sequence[int | None] = ()
    ) -> bool:
        """Grow the request's table to cover `num_computed_tokens + num_new_tokens` tokens.

        All or nothing: returns False and allocates nothing when the free list is too short
        (blocks that fell out of a sliding window are released either way). `cached_blocks`
        (from `find_cached_blocks`, for a request holding no blocks yet) are adopted first and
        count as computed: the caller then sets `num_computed_tokens` to `len(cached_blocks) *
        block_size`, and `num_new_tokens` counts tokens after them. In a sliding-window group
        leading entries may be None: blocks out of the window, kept as placeholders.
        """
        table = self._table(request)
        self._drop_out_of_window(request, table)
        if not self.can_allocate(request, num_new_tokens, cached_blocks):
            return False
        self.commit_slots(request, num_new_tokens, cached_blocks)
        return True

    def commit_slots(self, request: Request, num_new_tokens: int,
                     cached_blocks: Sequence[int | None] = ()) -> None:  # fmt: skip
        """allocate_slots once `can_allocate` said yes (KVCacheManager asks every group first)."""
        table = self._table(request)
        self._drop_out_of_window(request, table)
        num_new = self._num_new_blocks(request, table, num_new_tokens, len(cached_blocks))
        assert num_new <= len(self._free), f"commit_slots without room: {num_new} blocks"
        for block_id in cached_blocks:
            if block_id is None:
                assert self.sliding_window and table.num_dropped == len(table.blocks), (
                    f"placeholder after a live block in {table}")
                table.blocks.append(0)
                table.num_dropped += 1
                continue
            block = self.blocks[block_id]
            assert block.hash is not None, f"block {block_id} offered as cached but has no hash"
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            table.blocks.append(block_id)
        if cached_blocks:
            # (only here: resetting it on every call made cache_full_blocks rescan whole tables)
            table.num_hashed = len(cached_blocks)
        for _ in range(num_new):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            assert block.ref_count == 0, f"free block {block_id} has ref_count {block.ref_count}"
            self._evict(block)
            block.ref_count = 1
            table.blocks.append(block_id)

    def free(self, request: Request) -> None:
        """Release every block the request holds. Idempotent: a second call frees nothing."""
        table = self._table(request)
        # tail blocks first, so that under prefix caching a prompt's tail is evicted before its head
        for i in range(len(table.blocks) - 1, table.num_dropped - 1, -1):
            self._release(table.blocks[i], request)
        table.clear()

    def _release(self, block_id: int, request: Request) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"double free of block {block_id} by {request.request_id!r}"
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.hash is not None and self._cached.get(block.hash) != block_id:
                block.hash = None  # no lookup can reach it (reset_prefix_cache ran)
            if block.hash is None:
                # nothing worth keeping in it: hand it out before the cached ones
                self._free.move_to_end(block_id, last=False)

    def _table(self, request: Request) -> BlockTable:
        return request.kv_tables[self.group]

    def _first_live_block(self, request: Request, table: BlockTable) -> int:
        return min(self.first_needed_block(request.num_computed_tokens), len(table.blocks))

    def _drop_out_of_window(self, request: Request, table: BlockTable) -> None:
        """Release the blocks no query from num_computed_tokens on can see (sliding window).

        Safe while a step of this request still runs: its queries sit at positions >= the
        num_computed_tokens the host knows, so they never reach back past the window start."""
        first_live = self._first_live_block(request, table)
        for i in range(table.num_dropped, first_live):
            self._release(table.blocks[i], request)
            table.blocks[i] = 0
        table.num_dropped = max(table.num_dropped, first_live)

    def _num_new_blocks(self, request: Request, table: BlockTable, num_new_tokens: int,
                        num_cached: int) -> int:  # fmt: skip
        num_tokens = request.num_computed_tokens + num_cached * self.block_size + num_new_tokens
        return max(0, cdiv(num_tokens, self.block_size) - len(table.blocks) - num_cached)

    def _evict(self, block: KVBlock) -> None:
        """Forget a free block's cached prefix before it is overwritten."""
        if block.hash is not None:
            if self._cached.get(block.hash) == block.block_id:
                del self._cached[block.hash]
            block.hash = None

    # --- prefix caching -------------------------------------------------------------------------

    def block_hashes(self, request: Request, num_full_blocks: int) -> list[bytes]:
        """The chained hashes of the request's first `num_full_blocks` full blocks (memoised)."""
        hashes = request.block_hashes
        bs = self.block_size
        tokens = request.all_token_ids
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tokens[i * bs : (i + 1) * bs]))
        return hashes[:num_full_blocks]

    def cached_block(self, block_hash: bytes) -> int | None:
        """The block holding the prefix named `block_hash`, if the cache still has it."""
        return self._cached.get(block_hash)

    def find_cached_blocks(self, request: Request) -> list[int]:
        """Blocks holding the longest cached prefix of the request's tokens (nothing is taken).

        The last token is never served from the cache: the step that computes it must also
        produce the logits to sample from, so at most `(num_tokens - 1) // block_size` blocks hit.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in self.block_hashes(request, max_blocks):
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's full, computed blocks so that other requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        table = self._table(request)
        num_full = min(request.num_computed_tokens // self.block_size, len(table.blocks))
        if num_full <= table.num_hashed:
            return
        hashes = self.block_hashes(request, num_full)
        # (a dropped block went back to the pool before it could be registered: nothing to do)
        for i in range(max(table.num_hashed, table.num_dropped), num_full):
            block = self.blocks[table.blocks[i]]
            if block.hash is None and hashes[i] not in self._cached:
                block.hash = hashes[i]
                self._cached[block.hash] = block.block_id
            # else: adopted from the cache, or a twin of a block another request computed in the
            # same steps; the twin stays private (and unhashed): the registered one serves lookups
        table.num_hashed = num_full

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after the weights change). Held blocks keep working.

        Held blocks keep their hash (they stay full and immutable) but no lookup finds them; the
        ones that nobody holds are moved to the front of the free list.
        """
        self._cached.clear()
        for block in self.blocks:
            if block.ref_count == 0 and block.hash is not None:
                block.hash = None
                self._free.move_to_end(block.block_id, last=False)

    # --- checks ---------------------------------------------------------------------------------

    def check_invariants(self, live_requests: Iterable[Request]) -> None:
        """Assert that ref counts, free list and hash map agree with the live block tables."""
        counts = [0] * self.num_blocks
        for req in live_requests:
            table = self._table(req)
            live = table.blocks[table.num_dropped :]
            assert len(set(live)) == len(live), f"repeated block in {req}"
            for block_id in live:
                counts[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} but held by "
                f"{counts[block.block_id]} live requests"
            )
            assert (block.ref_count == 0) == (block.block_id in self._free), block
            if block.ref_count > 1:
                assert block.hash is not None, f"shared block {block.block_id} is not a cached one"
        for h, block_id in self._cached.items():
            assert self.blocks[block_id].hash == h, f"hash map points at stale block {block_id}"
