"""Triton paged attention against reference.paged_attention_ref.

Every case builds a random paged cache (fp16, random block order), poisons with NaN the spare
blocks and the blocks a sliding window has left behind (the kernel must never read them), pads
each block table with poisoned block ids, and compares the kernel with the fp32 reference.
Set TRITON_INTERPRET=1 to run the same checks on CPU through Triton's interpreter (slow; the
conftest skips `gpu` tests without CUDA, so call the helpers directly).
"""

from __future__ import annotations

import pytest
import torch

from llcuda.kernels.reference import paged_attention_ref

pytestmark = pytest.mark.gpu

ATOL = RTOL = 2e-3


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    sliding_window: int,
    seed: int,
    dev: torch.device | None = None,
) -> dict:
    """A flat batch: seqs is [(context_len, num_new_tokens)] per sequence.

    Returns q, caches and metadata as the model runner would build them, plus max lens.
    """
    dev = dev or device()
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for ctx, _ in seqs]
    num_spare = 3
    num_blocks = sum(blocks_per_seq) + num_spare
    perm = torch.randperm(num_blocks, generator=gen)
    used, spare = perm[: sum(blocks_per_seq)], perm[sum(blocks_per_seq) :]
    max_blocks = max(blocks_per_seq) + 2
    # padding entries point at poisoned blocks: reading past a sequence's blocks shows as NaN
    block_tables = spare[torch.randint(0, num_spare, (len(seqs), max_blocks), generator=gen)]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).half()
    v_cache = torch.randn(shape, generator=gen).half()
    k_cache[spare] = float("nan")
    v_cache[spare] = float("nan")
    start = 0
    for s, ((ctx, num_q), nb) in enumerate(zip(seqs, blocks_per_seq, strict=True)):
        block_tables[s, :nb] = used[start : start + nb]
        start += nb
        if sliding_window > 0:
            # blocks wholly before the first query's window: the engine may have reused them
            first_key = max(0, ctx - num_q - sliding_window + 1)
            for b in range(first_key // block_size):
                k_cache[block_tables[s, b]] = float("nan")
                v_cache[block_tables[s, b]] = float("nan")
    num_qs = [n for _, n in seqs]
    query_start_loc = torch.tensor([0] + num_qs).cumsum(0).to(torch.int32)
    num_tokens = int(query_start_loc[-1])
    q = torch.randn((num_tokens, num_heads, head_dim), generator=gen) * head_dim**-0.5
    return {
        "q": q.to(dev),
        "k_cache": k_cache.to(dev),
        "v_cache": v_cache.to(dev),
        "query_start_loc": query_start_loc.to(dev),
        "seq_lens": torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=dev),
        "block_tables": block_tables.to(torch.int32).to(dev),
        "sliding_window": sliding_window,
        "max_query_len": max(num_qs),
        "max_seq_len": max(c for c, _ in seqs),
    }


def run_ref(b: dict) -> torch.Tensor:
    return paged_attention_ref(b["q"], b["k_cache"], b["v_cache"], b["query_start_loc"],
                               b["seq_lens"], b["block_tables"], b["sliding_window"],
                               softcap=b.get("softcap", 0.0))  # fmt: skip


def run_kernel(b: dict, config=None) -> torch.Tensor:
    from llcuda.kernels.paged_attention import paged_attention

    return paged_attention(b["q"], b["k_cache"], b["v_cache"], b["query_start_loc"],
                           b["seq_lens"], b["block_tables"], b["sliding_window"],
                           b["max_query_len"], b["max_seq_len"], config=config,
                           softcap=b.get("softcap", 0.0))  # fmt: skip


def check_case(seqs, num_heads, num_kv_heads, head_dim, block_size, window, seed=0, config=None):
    b = make_batch(seqs, num_heads, num_kv_heads, head_dim, block_size, window, seed)
    ref = run_ref(b)
    out = run_kernel(b, config)
    assert not out.isnan().any(), "kernel output has NaN (read a poisoned block?)"
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


# (context_len, new_tokens): a 700-token prefill crossing the 512 window, a decode at 1000, a
# 300-token chunk continuing a 600-token prefix, a short prompt, a decode inside the first block
MIXED = [(700, 700), (1000, 1), (900, 300), (5, 5), (33, 1)]


@pytest.mark.parametrize("window", [0, 512])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 1), (4, 4)], ids=["gqa4", "mha"])
@pytest.mark.parametrize("head_dim", [256, 128])
def test_mixed_batch(head_dim, num_heads, num_kv_heads, window):
    check_case(MIXED, num_heads, num_kv_heads, head_dim, 32, window, seed=head_dim + window)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("window", [0, 512])
def test_block_sizes(block_size, window):
    check_case(MIXED, 4, 1, 256, block_size, window, seed=block_size)


@pytest.mark.parametrize("window", [1, 5, 17])
def test_small_windows(window):
    seqs = [(40, 40), (37, 1), (64, 9), (3, 3), (100, 1)]
    check_case(seqs, 4, 1, 256, 16, window, seed=window)


@pytest.mark.parametrize("window", [0, 512])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 1), (8, 2)], ids=["gqa4x1", "gqa4x2"])
def test_decode_split_kv(num_heads, num_kv_heads, window):
    """A pure decode batch: few programs, so the key range is split into merged segments."""
    from llcuda.kernels.paged_attention import pick_config

    seqs = [(3000, 1), (1, 1), (513, 1), (64, 1)]
    b = make_batch(seqs, num_heads, num_kv_heads, 256, 32, window, seed=7)
    cfg = pick_config(num_heads // num_kv_heads, 256, 1, 3000, len(seqs), num_kv_heads, window,
                      b["q"].device)
    assert cfg.num_segments > 1, cfg
    ref = run_ref(b)
    for _ in range(2):  # the pieces' counters come back to zero, so a second call merges too
        out = run_kernel(b)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    from llcuda.kernels.paged_attention import _COUNTERS

    assert not _COUNTERS[b["q"].device].any()


@pytest.mark.parametrize("window", [0, 512])
@pytest.mark.parametrize("num_seqs", [1, 5, 64])
def test_decode_with_one_query_each(num_seqs, window):
    """A decode step's promise (token s is sequence s's only query) skips the sequence search:
    same output as without it and as the reference, split into pieces or not."""
    from llcuda.kernels.paged_attention import AttentionConfig

    gen = torch.Generator().manual_seed(num_seqs)
    seqs = [(int(n), 1) for n in torch.randint(1, 1500, (num_seqs,), generator=gen)]
    b = make_batch(seqs, 4, 1, 256, 16, window, seed=num_seqs + window)
    ref = run_ref(b)
    for config in (None, AttentionConfig(16, 64, 1, 4, 2), AttentionConfig(16, 64, 8, 4, 2)):
        out = run_kernel_decode(b, config)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("window", [0, 512])
def test_decode_pieces_follow_the_context_length(window):
    """Split-KV pieces beyond the context's last tile write nothing: one piece stores its output
    directly, a few are merged without the slots the others left from a longer call."""
    from llcuda.kernels.paged_attention import _COUNTERS, AttentionConfig

    config = AttentionConfig(16, 64, 16, 4, 2)
    for ctx in (3000, 100, 40, 130, 64, 65):  # 47, 2, 1, 3, 1 and 2 tiles of 64 keys
        b = make_batch([(ctx, 1), (ctx // 2 + 1, 1)], 4, 1, 256, 16, window, seed=ctx)
        torch.testing.assert_close(run_kernel_decode(b, config), run_ref(b), atol=ATOL,
                                   rtol=RTOL)  # fmt: skip
        assert not _COUNTERS[b["q"].device].any()


def run_kernel_decode(b: dict, config=None) -> torch.Tensor:
    from llcuda.kernels.paged_attention import paged_attention

    return paged_attention(b["q"], b["k_cache"], b["v_cache"], b["query_start_loc"],
                           b["seq_lens"], b["block_tables"], b["sliding_window"], 1,
                           b["max_seq_len"], config=config, one_query_each=True,
                           softcap=b.get("softcap", 0.0))  # fmt: skip


def test_one_query_each_needs_a_token_per_sequence():
    from llcuda.kernels.paged_attention import PagedAttentionError

    b = make_batch([(40, 2), (9, 1)], 4, 1, 256, 16, 0, seed=1)
    with pytest.raises(PagedAttentionError, match="one token per sequence"):
        run_kernel_decode(b)


@pytest.mark.parametrize("segments", [1, 4, 16])
def test_any_config_is_correct(segments):
    """Tile shapes only change speed: forced segments on a mixed batch, decode tiles on prefill."""
    from llcuda.kernels.paged_attention import AttentionConfig

    for block_m in (16, 64):
        cfg = AttentionConfig(block_m=block_m, block_n=32, num_segments=segments, num_warps=4,
                              num_stages=2)
        check_case(MIXED, 4, 1, 256, 32, 512, seed=segments + block_m, config=cfg)


def test_head_dim_not_power_of_two():
    check_case([(50, 50), (70, 1)], 6, 2, 80, 16, 0, seed=3)


def test_max_lens_only_pick_tiles():
    """Wrong (stale) max_query_len / max_seq_len, as a replayed CUDA graph has, stay correct."""
    b = make_batch(MIXED, 4, 1, 256, 32, 512, seed=11)
    ref = run_ref(b)
    for mq, ms in ((1, 1), (1, 100000), (700, 700)):
        out = run_kernel({**b, "max_query_len": mq, "max_seq_len": ms})
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_cuda_graph_decode():
    """Capture one decode step, then replay it with longer contexts and new queries."""
    from llcuda.kernels.paged_attention import paged_attention

    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need CUDA")
    seqs = [(2000, 1), (100, 1), (700, 1)]
    b = make_batch([(c + 64, 1) for c, _ in seqs], 4, 1, 256, 32, 0, seed=5)
    b["seq_lens"].copy_(torch.tensor([c for c, _ in seqs], dtype=torch.int32))
    args = [b[k] for k in ("q", "k_cache", "v_cache", "query_start_loc", "seq_lens",
                           "block_tables")]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged_attention(*args, 0, 1, 2000)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(*args, 0, 1, 2000)
    for step in (0, 17, 64):
        b["seq_lens"].copy_(torch.tensor([c + step for c, _ in seqs], dtype=torch.int32))
        b["q"].copy_(torch.randn_like(b["q"]) * 256**-0.5)
        graph.replay()
        torch.testing.assert_close(out, run_ref(b), atol=ATOL, rtol=RTOL)


def test_bad_input_is_rejected():
    from llcuda.kernels.paged_attention import PagedAttentionError, paged_attention

    b = make_batch([(10, 3)], 4, 2, 64, 16, 0, seed=0)
    args = [b[k] for k in ("q", "k_cache", "v_cache", "query_start_loc", "seq_lens",
                           "block_tables")]
    with pytest.raises(PagedAttentionError, match="multiple of num_kv_heads"):
        paged_attention(args[0][:, :3], *args[1:], 0, 3, 10)
    with pytest.raises(PagedAttentionError, match="head_dim"):
        paged_attention(args[0][..., :32], *args[1:], 0, 3, 10)
    with pytest.raises(PagedAttentionError, match="Python int"):
        paged_attention(*args, 0, b["seq_lens"].max(), 10)
    with pytest.raises(PagedAttentionError, match="query_start_loc"):
        paged_attention(args[0], args[1], args[2], args[3][:1], *args[4:], 0, 3, 10)
    with pytest.raises(PagedAttentionError, match="int32 or int64"):
        paged_attention(*args[:5], args[5].float(), 0, 3, 10)


@pytest.mark.parametrize("window", [0, 512])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [
    (8, 4, 256), (16, 8, 256), (32, 8, 128), (28, 4, 128), (8, 8, 64), (16, 2, 64),
], ids=lambda v: str(v))  # fmt: skip
def test_softcap(num_heads, num_kv_heads, head_dim, window):
    """Gemma 2's attention logit soft-cap (SOFTCAP * tanh(q.k / SOFTCAP) before the mask), on a
    mixed batch and on a decode batch split into pieces, GQA 1 to 8: scores scaled up so that
    the cap bends them, and the capped output differs from the uncapped one."""
    from llcuda.kernels.paged_attention import AttentionConfig

    b = make_batch(MIXED, num_heads, num_kv_heads, head_dim, 32, window, seed=head_dim + window)
    # scores of a few tens: tanh(score / 5) saturates. The kernel rounds q to the fp16 cache
    # type, which at 8x the scores moves them by ~1e-2 (the H100 run failed 2x the usual
    # tolerance): q is handed to both sides already rounded, so the tolerance stays the usual one
    b["q"] = (b["q"] * 8).half().float()
    tol = {"atol": ATOL, "rtol": RTOL}
    capped = {**b, "softcap": 5.0}
    want = run_ref(capped)
    out = run_kernel(capped)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, **tol)
    assert (run_kernel(b) - want).abs().max() > 10 * ATOL  # the cap changed the answer
    decode = make_batch([(3000, 1), (1, 1), (513, 1), (64, 1)], num_heads, num_kv_heads,
                        head_dim, 32, window, seed=3)  # fmt: skip
    decode["q"] = (decode["q"] * 8).half().float()
    decode["softcap"] = 5.0
    want = run_ref(decode)
    for config in (None, AttentionConfig(16, 64, 8, 4, 2)):
        torch.testing.assert_close(run_kernel_decode(decode, config), want, **tol)


def test_softcap_through_ops_and_bad_softcap():
    """ops.paged_attention passes the soft-cap to the kernel on CUDA and to the reference on the
    CPU; a negative cap is an error."""
    from llcuda.kernels import ops
    from llcuda.kernels.paged_attention import PagedAttentionError, paged_attention
    from llcuda.layers.attention import AttentionMetadata

    b = make_batch([(40, 40), (70, 1)], 8, 4, 256, 16, 0, seed=2)
    b["q"] = (b["q"] * 8).half().float()  # as the kernel rounds it (test_softcap)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(41, dtype=torch.int64, device=b["q"].device),  # unread here
        query_start_loc=b["query_start_loc"], seq_lens=b["seq_lens"],
        block_tables=b["block_tables"], max_query_len=b["max_query_len"],
        max_seq_len=b["max_seq_len"],
    )  # fmt: skip
    got = ops.paged_attention(b["q"], b["k_cache"], b["v_cache"], meta, 0, softcap=50.0)
    torch.testing.assert_close(got, run_ref({**b, "softcap": 50.0}), atol=ATOL, rtol=RTOL)
    args = [b[k] for k in ("q", "k_cache", "v_cache", "query_start_loc", "seq_lens",
                           "block_tables")]
    with pytest.raises(PagedAttentionError, match="softcap"):
        paged_attention(*args, 0, 40, 70, softcap=-1.0)
