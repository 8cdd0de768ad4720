"""The reference kernels against direct, dense formulations of the same math."""

from __future__ import annotations

import math

import pytest
import torch

from llcuda.kernels import reference as ref


def dense_causal_attention(q, k, v, window=0):
    # q: [n, H, D], k, v: [n, KVH, D] of one sequence, all positions 0..n-1
    n, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    mask = j <= i
    if window:
        mask &= (i - j) < window
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_attention_equals_dense_for_mixed_prefill_and_decode(window, block_size):
    gen = torch.Generator().manual_seed(0)
    num_heads, num_kv_heads, head_dim = 4, 2, 8
    lengths = [13, 1, 30]  # full context length of each sequence
    new_tokens = [13, 1, 7]  # tokens fed this step (a prefill, a decode, a prefill chunk)
    num_blocks = 32
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    perm = torch.randperm(num_blocks, generator=gen)
    tables, next_block = [], 0
    qs, expected = [], []
    for length in lengths:
        nb = -(-length // block_size)
        tables.append(perm[next_block : next_block + nb])
        next_block += nb
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.zeros(len(lengths), max_blocks, dtype=torch.int32)
    for s, (length, n_new) in enumerate(zip(lengths, new_tokens, strict=True)):
        q = torch.randn(length, num_heads, head_dim, generator=gen)
        k = torch.randn(length, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(length, num_kv_heads, head_dim, generator=gen)
        block_tables[s, : len(tables[s])] = tables[s]
        pos = torch.arange(length)
        slots = tables[s][pos // block_size].long() * block_size + pos % block_size
        ref.write_kv_ref(k, v, k_cache, v_cache, slots)
        qs.append(q[length - n_new :])
        expected.append(dense_causal_attention(q, k, v, window)[length - n_new :])
    qsl = torch.tensor([0] + list(torch.tensor(new_tokens).cumsum(0)), dtype=torch.int32)
    out = ref.paged_attention_ref(
        torch.cat(qs),
        k_cache,
        v_cache,
        qsl,
        torch.tensor(lengths, dtype=torch.int32),
        block_tables,
        window,
    )
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_rope_neox_rotates_pairs_half_apart():
    positions = torch.tensor([0, 3])
    cos, sin = ref.rope_cos_sin_ref(positions, rope_dim=4, base=10000.0)
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]).repeat(2, 1, 1)
    out = ref.rope_neox_ref(x, cos, sin)
    torch.testing.assert_close(out[0], x[0])  # position 0: identity
    theta0, theta1 = 3.0, 3.0 * 10000.0 ** (-0.5)
    expect = [
        1 * math.cos(theta0) - 3 * math.sin(theta0),
        2 * math.cos(theta1) - 4 * math.sin(theta1),
        1 * math.sin(theta0) + 3 * math.cos(theta0),
        2 * math.sin(theta1) + 4 * math.cos(theta1),
    ]
    torch.testing.assert_close(out[1, 0], torch.tensor(expect), rtol=1e-5, atol=1e-5)


def test_rope_norm_rotates_adjacent_pairs():
    positions = torch.tensor([2])
    cos, sin = ref.rope_cos_sin_ref(positions, rope_dim=4, base=100.0)
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    out = ref.rope_norm_ref(x, cos, sin)[0, 0]
    t0, t1 = 2.0, 2.0 * 100.0 ** (-0.5)
    expect = [
        1 * math.cos(t0) - 2 * math.sin(t0),
        1 * math.sin(t0) + 2 * math.cos(t0),
        3 * math.cos(t1) - 4 * math.sin(t1),
        3 * math.sin(t1) + 4 * math.cos(t1),
    ]
    torch.testing.assert_close(out, torch.tensor(expect), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base,scale", [(10000.0, 1.0), (1000000.0, 0.125)])
def test_rope_table_gives_every_position_s_angles(base, scale):
    """The factored table (256 fine rows + one row per 256 positions) gives the cos/sin of the
    whole table at every position, the far end of a 128k context included."""
    max_positions, rope_dim = 131072, 256
    cos_t, sin_t = ref.rope_table_ref(max_positions, rope_dim, base, scale)
    assert cos_t.shape == (256 + 512, 128)
    positions = torch.cat((torch.arange(600), torch.randint(0, max_positions, (2000,)),
                           torch.tensor([max_positions - 1])))  # fmt: skip
    cos, sin = ref.rope_at_ref(cos_t, sin_t, positions)
    cos_want, sin_want = ref.rope_cos_sin_ref(positions, rope_dim, base, scale)
    torch.testing.assert_close(cos, cos_want, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_want, rtol=0, atol=1e-6)


def test_rms_norm_and_gelu_match_formulas():
    x = torch.tensor([[3.0, 4.0]])
    w = torch.tensor([2.0, 0.5])
    out = ref.rms_norm_ref(x, w, eps=0.0)
    rms = math.sqrt((9 + 16) / 2)
    torch.testing.assert_close(out, torch.tensor([[3 / rms * 2, 4 / rms * 0.5]]))
    g = ref.gelu_tanh_ref(torch.tensor([1.0]))
    expect = 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (1 + 0.044715)))
    torch.testing.assert_close(g, torch.tensor([expect]))


def test_residual_rms_norm_ref_adds_partials():
    from llcuda.kernels.reference import residual_rms_norm_ref

    gen = torch.Generator().manual_seed(0)
    x, parts = torch.randn(3, 16, generator=gen), torch.randn(4, 3, 16, generator=gen)
    w1, w2 = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    got = residual_rms_norm_ref(x, parts, w1, w2, 1e-6)
    want = residual_rms_norm_ref(x, parts.sum(dim=0), w1, w2, 1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_softcap_ref_bounds_logits():
    x = torch.tensor([-1e4, -3.0, 0.0, 3.0, 1e4])
    y = ref.softcap_ref(x, 30.0)
    assert y.abs().max() <= 30.0 and y[2] == 0.0
    torch.testing.assert_close(y[3], torch.tensor(30.0 * math.tanh(0.1)))


def test_write_kv_ref_skips_padding_slots():
    """Slot -1 marks a padding token (as write_kv's kernel skips it): the cache's last slot, which
    a negative index would reach, stays as it was."""
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(3, 4, 2, 8, generator=gen)
    v_cache = torch.randn(3, 4, 2, 8, generator=gen)
    k0, v0 = k_cache.clone(), v_cache.clone()
    k = torch.randn(3, 2, 8, generator=gen)
    v = torch.randn(3, 2, 8, generator=gen)
    ref.write_kv_ref(k, v, k_cache, v_cache, torch.tensor([5, -1, 0]))
    flat_k, flat_v = k_cache.view(-1, 2, 8), v_cache.view(-1, 2, 8)
    assert torch.equal(flat_k[5], k[0]) and torch.equal(flat_k[0], k[2])
    assert torch.equal(flat_v[5], v[0]) and torch.equal(flat_v[0], v[2])
    untouched = [i for i in range(12) if i not in (0, 5)]
    assert torch.equal(flat_k[untouched], k0.view(-1, 2, 8)[untouched])
    assert torch.equal(flat_v[untouched], v0.view(-1, 2, 8)[untouched])
