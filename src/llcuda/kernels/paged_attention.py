"""Triton paged attention over the KV cache: one kernel for prefill, chunked prefill and decode.

FlashAttention-2 style: no score matrix is ever materialised. One program owns (a tile of one
sequence's queries, one KV head, one KV segment). The query heads that share a KV head are packed
into the tile's rows (GQA packing: row r is query token r // GROUP, head r % GROUP), so every K/V
tile loaded from the cache serves all of them. The program walks its sequence's keys through the
block table BLOCK_N at a time with an fp32 online softmax, and visits only the tiles that hold a
key some row of the tile can see (causal, and the sliding window on local layers).

Grid without host syncs: sequence s's query tiles get program ids starting at
query_start_loc[s] // BLOCK_Q + s (an upper bound on the tiles before it), so the grid is
num_tokens // BLOCK_Q + num_seqs programs and each finds its sequence by a binary search over
query_start_loc. With BLOCK_Q == 1 the start is query_start_loc[s] itself and the grid is
num_tokens. Programs past their sequence's last tile return at once. A decode step whose caller
promises one query per sequence (`one_query_each`) skips all that: program s is token s. Nothing
reads a tensor on the host, so the wrapper can be captured in a CUDA graph; max_query_len and
max_seq_len only pick the launch configuration, never the answer.

Split-KV (flash-decoding) for decode: when one query per program leaves the GPU idle (few
sequences x KV heads), each program's key range is cut into NUM_SEGMENTS pieces; each piece writes
its normalised partial output and its log-sum-exp and counts itself done on a per-tile counter;
the piece that finishes last merges them all and resets the counter. No second kernel: at one
sequence a launch is a good part of the whole attention time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from llcuda.kernels.dependent_launch import pdl_launch_args, wait_for_previous

LOG2E = tl.constexpr(1.4426950408889634)  # scores go through exp2


class PagedAttentionError(ValueError):
    """Bad arguments to paged_attention (shapes, dtypes, devices)."""


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    """Largest s in [0, num_seqs) whose first query tile id is <= pid (binary search)."""
    lo = tl.zeros((), dtype=tl.int32)
    hi = tl.zeros((), dtype=tl.int32) + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        start = tl.load(query_start_loc_ptr + mid)
        if BLOCK_Q > 1:
            start = start // BLOCK_Q + mid
        found = start <= pid
        lo = tl.where(found, mid, lo)
        hi = tl.where(found, hi, mid - 1)
    return lo


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim], pre-scaled, last dim contiguous
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    out_ptr,  # [num_tokens, num_heads, head_dim] fp32 (NUM_SEGMENTS == 1)
    seg_out_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS, HEAD_DIM_P] fp32 (NUM_SEGMENTS > 1)
    seg_lse_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS] fp32, log2 domain (NUM_SEGMENTS > 1)
    counter_ptr,  # [grid_q * num_kv_heads] int32, zero between calls (NUM_SEGMENTS > 1)
    query_start_loc_ptr,  # [num_seqs + 1]
    seq_lens_ptr,  # [num_seqs]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq]
    num_seqs,
    num_heads,
    sliding_window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_Q: tl.constexpr,  # query tokens per tile
    BLOCK_M: tl.constexpr,  # tile rows >= BLOCK_Q * GROUP, power of two, >= 16 for tl.dot
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_SIZE: tl.constexpr,  # cache block size (tokens per block)
    SLIDING: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    ONE_QUERY_EACH: tl.constexpr,  # a decode batch: sequence s's one query is token s
    PDL: tl.constexpr,  # launched with programmatic dependent launch (dependent_launch.py)
    # Gemma 2's attention logit soft-cap: score = SOFTCAP * tanh(q.k / SOFTCAP); 0.0 = off. A
    # compile-time value (one per model), so the off path has no extra instruction.
    SOFTCAP: tl.constexpr = 0.0,
):
    wait_for_previous(PDL)
    pid_q = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    if ONE_QUERY_EACH:
        # program s is sequence s's query tile, token s: no search and no loads (at 64
        # sequences the binary search is six dependent reads)
        seq = pid_q
        q_start = pid_q
        q_len = tl.full((), 1, tl.int32)
        q_block = pid_q * 0
    else:
        seq = _find_sequence(query_start_loc_ptr, num_seqs, pid_q, BLOCK_Q)
        q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
        q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
        if BLOCK_Q > 1:
            q_block = pid_q - (q_start // BLOCK_Q + seq)
        else:
            q_block = pid_q - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + seq).to(tl.int32)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_mask = offs_d < HEAD_DIM
    q_local = q_block * BLOCK_Q + offs_m // GROUP  # [BLOCK_M] query index within the sequence
    head = kv_head * GROUP + offs_m % GROUP  # [BLOCK_M]
    row_valid = (offs_m // GROUP < BLOCK_Q) & (q_local < q_len)
    q_pos = ctx - q_len + q_local  # [BLOCK_M] position of each row's query
    token = q_start + q_local

    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_M, HEAD_DIM_P]
    q = q.to(k_cache_ptr.dtype.element_ty)

    # Keys any row of this tile can see: [key_lo, key_hi).
    first_q = q_block * BLOCK_Q
    last_q = tl.minimum(first_q + BLOCK_Q, q_len) - 1
    key_hi = ctx - q_len + last_q + 1
    key_lo = 0
    if SLIDING:
        key_lo = tl.maximum(ctx - q_len + first_q - sliding_window + 1, 0)
    tile_lo = key_lo // BLOCK_N
    tile_hi = tl.cdiv(key_hi, BLOCK_N)
    pieces = 1  # pieces of this tile's key range that hold keys: the ones that write
    if NUM_SEGMENTS > 1:
        # >= 1 tile: every query sees itself. A short context fills only the first pieces; the
        # rest leave at once, and a context of one piece writes its output directly.
        per_segment = tl.cdiv(tile_hi - tile_lo, NUM_SEGMENTS)
        pieces = tl.cdiv(tile_hi - tile_lo, per_segment)
        if segment >= pieces:
            return
        tile_lo = tile_lo + segment * per_segment
        tile_hi = tl.minimum(tile_lo + per_segment, tile_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        k_pos = tile * BLOCK_N + offs_n  # [BLOCK_N]
        # Out-of-range keys are never loaded: their blocks may be freed or hold another sequence.
        k_valid = (k_pos >= key_lo) & (k_pos < key_hi)
        block = tl.load(table_row + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        in_block = k_pos % BLOCK_SIZE
        k_off = block * stride_kb + in_block * stride_ks + kv_head * stride_kh  # [BLOCK_N]
        v_off = block * stride_vb + in_block * stride_vs + kv_head * stride_vh
        kv_mask = k_valid[:, None] & d_mask[None, :]
        k_t = tl.load(
            k_cache_ptr + k_off[None, :] + offs_d[:, None],
            mask=d_mask[:, None] & k_valid[None, :],
            other=0.0,
        )  # [HEAD_DIM_P, BLOCK_N]
        # issued before the scores need K: the two cache reads overlap instead of queueing
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, k_t)  # [BLOCK_M, BLOCK_N]
        if SOFTCAP > 0.0:  # tanh(x) = 1 - 2 / (exp(2x) + 1): exact in fp32, safe for large |x|
            scores = SOFTCAP * (1.0 - 2.0 / (tl.exp(scores * (2.0 / SOFTCAP)) + 1.0))
        scores = scores * LOG2E
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        if SLIDING:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        scores = tl.where(visible, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row that has seen no visible key yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # [BLOCK_M, HEAD_DIM_P]
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    if pieces == 1:
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            acc,
            mask=row_valid[:, None] & d_mask[None, :],
        )
    else:
        part = (token.to(tl.int64) * num_heads + head) * NUM_SEGMENTS + segment  # [BLOCK_M]
        tl.store(
            seg_out_ptr + part[:, None] * HEAD_DIM_P + offs_d[None, :],
            acc,
            mask=row_valid[:, None],
        )
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(seg_lse_ptr + part, lse, mask=row_valid)
        # acq_rel: this piece's stores are visible to whoever sees its count, and the last piece
        # sees every other piece's
        counter = counter_ptr + pid_q * tl.num_programs(1) + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel") == pieces - 1:
            tl.store(counter, 0)  # ready for the next call (a graph replays the same buffer)
            _merge_segments(seg_out_ptr, seg_lse_ptr, out_ptr, token, head, row_valid, offs_d,
                            d_mask, num_heads, stride_ot, stride_oh, pieces, HEAD_DIM_P,
                            NUM_SEGMENTS)


@triton.jit
def _merge_segments(seg_out_ptr, seg_lse_ptr, out_ptr, token, head, row_valid, offs_d, d_mask,
                    num_heads, stride_ot, stride_oh, pieces, HEAD_DIM_P: tl.constexpr,
                    NUM_SEGMENTS: tl.constexpr):
    """out[row] = the first `pieces` pieces' outputs weighted by their share of the softmax
    mass: sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m), for the tile's rows [BLOCK_M]. Pieces
    from `pieces` on wrote nothing this call (their slots hold an earlier call's values)."""
    offs_s = tl.arange(0, NUM_SEGMENTS)
    first = (token.to(tl.int64) * num_heads + head) * NUM_SEGMENTS  # [BLOCK_M] piece 0's index
    written = row_valid[:, None] & (offs_s[None, :] < pieces)  # [BLOCK_M, NUM_SEGMENTS]
    # .cg: read from L2, where the other pieces' stores went, never from this SM's L1
    lse = tl.load(seg_lse_ptr + first[:, None] + offs_s[None, :], mask=written,
                  other=float("-inf"), cache_modifier=".cg")  # [BLOCK_M, NUM_SEGMENTS]
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # finite for a valid row: a query sees itself
    w = tl.math.exp2(lse - m[:, None])  # 0 for pieces with no visible key, or none written
    acc = tl.zeros([lse.shape[0], HEAD_DIM_P], dtype=tl.float32)
    for s in tl.static_range(NUM_SEGMENTS):
        o = tl.load(seg_out_ptr + (first + s)[:, None] * HEAD_DIM_P + offs_d[None, :],
                    mask=row_valid[:, None] & (s < pieces), other=0.0, cache_modifier=".cg")
        acc += o * tl.sum(tl.where(offs_s[None, :] == s, w, 0.0), 1)[:, None]
    total = tl.sum(w, 1)
    acc = acc / tl.where(total == 0.0, 1.0, total)[:, None]  # 0 only in rows never stored
    tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             acc, mask=row_valid[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configuration


@dataclass(frozen=True)
class AttentionConfig:
    """One launch configuration of _paged_attention_kernel."""

    block_m: int  # tile rows (query tokens x query heads of one KV head), power of two >= 16
    block_n: int  # keys per step
    num_segments: int  # split-KV pieces per program (1: no split)
    num_warps: int
    num_stages: int


@cache
def _device_limits(device_index: int) -> tuple[int, int]:
    """(multiprocessor count, opt-in shared memory per block in bytes) of a CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return props.multi_processor_count, smem


def _limits(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":  # Triton's interpreter on CPU: pretend to be an H100
        return 132, 227 * 1024
    return _device_limits(device.index if device.index is not None else torch.cuda.current_device())


def _smem_bytes(block_m: int, block_n: int, head_dim_p: int, num_stages: int, elem: int) -> int:
    """Shared memory of one program: the Q tile, which the compiled kernel stages at 4 bytes an
    element whatever the cache dtype, plus num_stages K and V tiles of `elem` bytes. Compiled
    for sm_75 (tests/kernels/test_compile_targets.py): 64 x 256 Q with 16 x 256 fp16 K/V tiles
    and one stage take 81,920 B, exactly this; counting Q at 2 bytes (49,152) let a prefill
    tile past the T4's 64 KiB."""
    return head_dim_p * (4 * block_m + 2 * elem * block_n * max(num_stages, 1))


def pick_config(
    group: int,
    head_dim: int,
    max_query_len: int,
    max_seq_len: int,
    num_seqs: int,
    num_kv_heads: int,
    sliding_window: int,
    device: torch.device,
    elem_size: int = 2,
) -> AttentionConfig:
    """Tile shapes for one call; depends only on Python ints, so a captured graph stays valid."""
    num_sms, smem_limit = _limits(device)
    head_dim_p = triton.next_power_of_2(head_dim)
    decode = max_query_len == 1
    # Measured on H200 (benchmarks/bench_paged_attention.py --sweep, head_dim 256): BLOCK_N 64
    # beat 32 by 5-20% in decode and by 25% in prefill; 8 warps keep the 64x256 prefill
    # accumulator out of local memory.
    block_n = 64
    if decode:
        block_m = max(16, triton.next_power_of_2(group))
        num_warps, num_stages = 4, 2
    else:
        block_m = max(64, triton.next_power_of_2(group))
        num_warps, num_stages = (4, 2) if head_dim_p <= 128 else (8, 2)
    # Small-shared-memory GPUs (T4: 64 KiB): shrink the K/V tiles, then the pipeline, then Q.
    budget = smem_limit - 4096
    while _smem_bytes(block_m, block_n, head_dim_p, num_stages, elem_size) > budget:
        if block_n > 16:
            block_n //= 2
        elif num_stages > 1:
            num_stages -= 1
        elif block_m > max(16, triton.next_power_of_2(group)):
            block_m //= 2
        else:
            break
    num_segments = 1
    if decode:
        programs = num_seqs * num_kv_heads
        kv_len = min(max_seq_len, sliding_window) if sliding_window > 0 else max_seq_len
        tiles = triton.cdiv(kv_len, block_n)
        if programs < num_sms:
            # Enough pieces to fill the GPU about twice. H100, graph replays (BENCHMARKS.md, fifth
            # session): a lone sequence is latency-bound, so its pieces go down to one tile at
            # the longest context (B=1, 640 keys: 24 us unsplit, 10.6 in 8 pieces); with many
            # sequences pieces shorter than 4 tiles cost more in merging than they gain.
            want = triton.cdiv(2 * num_sms, programs)
            min_tiles = 1 if programs <= 8 else 4
            num_segments = max(1, min(triton.next_power_of_2(want), tiles // min_tiles, 64))
            num_segments = 1 << (num_segments.bit_length() - 1)  # power of two for tl.arange
    return AttentionConfig(block_m, block_n, num_segments, num_warps, num_stages)


# ---------------------------------------------------------------------------------------------
# Wrappers


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise PagedAttentionError(f"{name} is on {t.device}, expected {device} like q")


def _check_attention_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    sliding_window: int,
    max_query_len: int,
    max_seq_len: int,
) -> None:
    if q.dim() != 3:
        raise PagedAttentionError(
            f"q must be [num_tokens, num_heads, head_dim], got {tuple(q.shape)}"
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise PagedAttentionError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (
        torch.float16, torch.bfloat16, torch.float32
    ):
        raise PagedAttentionError(
            f"cache dtypes must match and be fp16/bf16/fp32, got {k_cache.dtype}, {v_cache.dtype}"
        )
    if not q.dtype.is_floating_point:
        raise PagedAttentionError(f"q must be a float tensor, got {q.dtype}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise PagedAttentionError(f"head_dim of q ({head_dim}) != cache's ({k_cache.shape[3]})")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise PagedAttentionError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    if seq_lens.dim() != 1 or query_start_loc.shape != (seq_lens.shape[0] + 1,):
        raise PagedAttentionError(
            f"query_start_loc must be [num_seqs + 1] and seq_lens [num_seqs], got "
            f"{tuple(query_start_loc.shape)} and {tuple(seq_lens.shape)}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != seq_lens.shape[0]:
        raise PagedAttentionError(
            f"block_tables must be [num_seqs, max_blocks_per_seq], got {tuple(block_tables.shape)} "
            f"for {seq_lens.shape[0]} sequences"
        )
    for name, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens),
                    ("block_tables", block_tables)):
        if t.dtype not in (torch.int32, torch.int64):
            raise PagedAttentionError(f"{name} must be int32 or int64, got {t.dtype}")
    if block_tables.stride(1) != 1:
        raise PagedAttentionError("block_tables rows must be contiguous")
    if q.device.type != "cuda" and not _interpreting():
        raise PagedAttentionError(f"paged_attention runs on CUDA tensors, q is on {q.device}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache),
                    ("query_start_loc", query_start_loc), ("seq_lens", seq_lens),
                    ("block_tables", block_tables)):
        _check_device(name, t, q.device)
    for name, value in (("sliding_window", sliding_window), ("max_query_len", max_query_len),
                        ("max_seq_len", max_seq_len)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise PagedAttentionError(f"{name} must be a Python int (no host sync), got {value!r}")
    if sliding_window < 0 or max_query_len < 1 or max_seq_len < max_query_len:
        raise PagedAttentionError(
            f"need sliding_window >= 0 and 1 <= max_query_len <= max_seq_len, got "
            f"{sliding_window}, {max_query_len}, {max_seq_len}"
        )


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _segment_counters(device: torch.device, n: int) -> torch.Tensor:
    """The split-KV pieces' done-counters: zeros that every call leaves zero again, one buffer per
    device (calls on one device run one after another on its stream). Made outside any CUDA
    graph capture: the decode graphs' eager warm-up step at their largest batch comes first."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise PagedAttentionError(
                f"split-KV counters for {n} tiles were not made before the CUDA graph capture; "
                "run the same step once eagerly first"
            )
        counters = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    sliding_window: int,
    max_query_len: int,
    max_seq_len: int,
    config: AttentionConfig | None = None,
    one_query_each: bool = False,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of a flat batch of queries over each sequence's paged KV cache.

    Same contract as reference.paged_attention_ref: q [num_tokens, num_heads, head_dim] pre-scaled;
    caches [num_blocks, block_size, num_kv_heads, head_dim]; query_start_loc [num_seqs + 1];
    seq_lens [num_seqs] (context including this step's tokens); block_tables [num_seqs,
    max_blocks_per_seq]; sliding_window 0 = global. Returns [num_tokens, num_heads, head_dim] fp32
    (rows past query_start_loc[-1] are left unwritten). max_query_len / max_seq_len are the
    caller's Python ints and only choose tile shapes; `config` overrides that choice.
    `one_query_each` is the caller's promise that every sequence has exactly one query, token s
    of sequence s (a decode step): programs then skip finding their sequence. It needs as many
    tokens as sequences, else it is an error; a wrong promise beyond that gives wrong output.
    `softcap` > 0: scores = softcap * tanh(scores / softcap) before the mask (Gemma 2).
    """
    if not softcap >= 0.0:
        raise PagedAttentionError(f"softcap must be 0 (off) or positive, got {softcap}")
    _check_attention_args(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                          sliding_window, max_query_len, max_seq_len)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    if one_query_each and num_tokens != num_seqs:
        raise PagedAttentionError(
            f"one_query_each needs one token per sequence, got {num_tokens} for {num_seqs}"
        )
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=torch.float32, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise PagedAttentionError("the caches' head_dim must be contiguous")
    if config is None:
        config = pick_config(group, head_dim, max_query_len, max_seq_len, num_seqs,
                             num_kv_heads, sliding_window, q.device, k_cache.element_size())
    head_dim_p = triton.next_power_of_2(head_dim)
    block_q = max(1, config.block_m // group)
    if one_query_each or block_q == 1:
        grid_q = num_tokens
    else:
        grid_q = num_tokens // block_q + num_seqs
    segments = config.num_segments
    if segments > 1:
        seg_out = torch.empty((num_tokens, num_heads, segments, head_dim_p),
                              dtype=torch.float32, device=q.device)
        seg_lse = torch.empty((num_tokens, num_heads, segments), dtype=torch.float32,
                              device=q.device)
        counters = _segment_counters(q.device, grid_q * num_kv_heads)
    else:
        seg_out = seg_lse = counters = out  # unused
    _paged_attention_kernel[(grid_q, num_kv_heads, segments)](
        q, k_cache, v_cache, out, seg_out, seg_lse, counters,
        query_start_loc, seq_lens, block_tables,
        num_seqs, num_heads, sliding_window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, GROUP=group, BLOCK_Q=block_q,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_SIZE=block_size,
        SLIDING=sliding_window > 0, NUM_SEGMENTS=segments,
        ONE_QUERY_EACH=one_query_each, SOFTCAP=float(softcap), num_warps=config.num_warps,
        num_stages=config.num_stages, **pdl_launch_args(q.device),
    )
    return out

