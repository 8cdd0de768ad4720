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


# --- The many-architecture variants (issue 17): each against a direct formula -----------------


def rotate_complex(x, angles, neox):
    """RoPE as a complex rotation: pair (a, b) -> (a + ib) * e^(i angle). x: [T, H, D];
    angles: [T, R/2]; pairs are (i, i + R/2) with neox, else (2i, 2i + 1); dims past R pass."""
    half = angles.shape[-1]
    x = x.double()
    if neox:
        a, b = x[..., :half], x[..., half : 2 * half]
    else:
        a, b = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
    z = torch.complex(a, b) * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    out = x.clone()
    if neox:
        out[..., :half], out[..., half : 2 * half] = z.real, z.imag
    else:
        out[..., 0 : 2 * half : 2], out[..., 1 : 2 * half : 2] = z.real, z.imag
    return out.float()


def angles_at(positions, rope_dim, base, scale=1.0, factors=None):
    i = torch.arange(rope_dim // 2, dtype=torch.float64)
    theta = base ** (-2.0 * i / rope_dim)
    if factors is not None:
        theta = theta / factors.double()
    return positions.double()[:, None] * scale * theta[None, :]


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rope_dim", [16, 8])
def test_rope_styles_equal_a_complex_rotation(neox, rope_dim):
    gen = torch.Generator().manual_seed(1)
    positions = torch.tensor([0, 1, 7, 300])
    x = torch.randn(4, 3, 16, generator=gen)
    cos, sin = ref.rope_cos_sin_ref(positions, rope_dim, 10000.0)
    rope = ref.rope_neox_ref if neox else ref.rope_norm_ref
    want = rotate_complex(x, angles_at(positions, rope_dim, 10000.0), neox)
    torch.testing.assert_close(rope(x, cos, sin), want, rtol=1e-5, atol=1e-5)


def test_rope_freq_factors_divide_each_pair_s_angle():
    """llama.cpp's ggml_rope_ext with freq factors: theta_i / factor_i; the factored table
    stays exact because the angle is still linear in the position."""
    rope_dim, base, scale = 64, 500000.0, 0.5
    factors = torch.linspace(1.0, 8.0, rope_dim // 2)
    positions = torch.tensor([0, 5, 255, 256, 4097, 8191])
    cos, sin = ref.rope_cos_sin_ref(positions, rope_dim, base, scale, freq_factors=factors)
    angles = angles_at(positions, rope_dim, base, scale, factors)
    torch.testing.assert_close(cos, torch.cos(angles).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, torch.sin(angles).float(), rtol=0, atol=1e-6)
    cos_t, sin_t = ref.rope_table_ref(8192, rope_dim, base, scale, freq_factors=factors)
    cos_at, sin_at = ref.rope_at_ref(cos_t, sin_t, positions)
    torch.testing.assert_close(cos_at, cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin_at, sin, rtol=0, atol=1e-6)
    from llcuda.layers.rotary import RotaryEmbedding

    rotary = RotaryEmbedding(rope_dim, 8192, base, scale, freq_factors=factors)
    torch.testing.assert_close(rotary.cos, cos_t, rtol=0, atol=0)
    with pytest.raises(ValueError, match="freq_factors"):
        ref.rope_cos_sin_ref(positions, rope_dim, base, freq_factors=factors[:-1])


def test_silu_and_gated_acts_match_torch():
    gen = torch.Generator().manual_seed(2)
    gate_up = torch.randn(2, 3, 10, generator=gen) * 4  # split-K partials [S, T, 2F]
    gate, up = gate_up.sum(0).chunk(2, dim=-1)
    torch.testing.assert_close(ref.silu_ref(gate), torch.nn.functional.silu(gate))
    torch.testing.assert_close(ref.gated_act_ref(gate_up, "silu"),
                               torch.nn.functional.silu(gate) * up)  # fmt: skip
    gelu = torch.nn.functional.gelu(gate, approximate="tanh")
    torch.testing.assert_close(ref.gated_act_ref(gate_up, "gelu_tanh"), gelu * up)
    from llcuda.kernels import ops

    torch.testing.assert_close(ops.gated_act(gate_up, "silu"), torch.nn.functional.silu(gate) * up)
    with pytest.raises(ValueError, match="relu"):
        ops.gated_act(gate_up, "relu")


def test_quant_matmul_gated_and_fused_linear_gated_on_cpu():
    from llcuda.gguf.constants import GGMLType
    from llcuda.kernels import ops
    from llcuda.layers.linear import FusedQuantLinear
    from llcuda.layers.quant_tensor import QuantTensor

    gen = torch.Generator().manual_seed(3)
    wg, wu = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    x = torch.randn(3, 8, generator=gen)

    def f32(w):
        return QuantTensor(w.contiguous().view(torch.uint8), GGMLType.F32, tuple(w.shape))

    silu = torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)
    got = ops.quant_matmul_gated(x, f32(torch.cat((wg, wu))), "silu")
    torch.testing.assert_close(got, silu, rtol=1e-5, atol=1e-5)
    layer = FusedQuantLinear([f32(wg), f32(wu)])
    torch.testing.assert_close(layer.gated(x, "silu"), silu, rtol=1e-5, atol=1e-5)
    gelu = torch.nn.functional.gelu(x @ wg.T, approximate="tanh") * (x @ wu.T)
    torch.testing.assert_close(layer.gated(x, "gelu_tanh"), gelu, rtol=1e-5, atol=1e-5)


def test_residual_without_post_norm_is_a_plain_add():
    gen = torch.Generator().manual_seed(4)
    x, parts, w = torch.randn(3, 16, generator=gen), torch.randn(2, 3, 16, generator=gen), \
        torch.rand(16, generator=gen) + 0.5  # fmt: skip
    x_out, h = ref.residual_rms_norm_ref(x, parts, None, w, 1e-6)
    want = x + parts.sum(0)
    torch.testing.assert_close(x_out, want)
    rms = want.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(h, want / rms * w)
    from llcuda.kernels import ops

    torch.testing.assert_close(ops.residual_rms_norm(x, parts, None, w, 1e-6)[1], h)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("with_norm", [True, False])
def test_qk_rope_store_kv_variants_match_direct_formulas(neox, with_norm):
    """No q/k norm (Llama, Qwen2), NORM or NEOX rope, Qwen2's q|k|v bias, split-K partials, a
    padding slot and RoPE on part of the head, against per-step formulas."""
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim, rope_dim, tokens = 4, 2, 16, 8, 3
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qk = torch.randn(2, tokens, q_size + kv_size, generator=gen)
    v = torch.randn(2, tokens, kv_size, generator=gen)
    bias = torch.randn(q_size + 2 * kv_size, generator=gen)
    qw = torch.rand(head_dim, generator=gen) + 0.5 if with_norm else None
    kw = torch.rand(head_dim, generator=gen) + 0.5 if with_norm else None
    positions = torch.tensor([0, 9, 600])
    slots = torch.tensor([5, -1, 2])
    cos_t, sin_t = ref.rope_table_ref(1024, rope_dim, 10000.0)
    k_cache = torch.zeros(2, 4, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    scale = 0.25
    q = ref.qk_norm_rope_store_kv_ref(qk, v, heads, kv_heads, head_dim, qw, kw, cos_t, sin_t,
                                      positions, 1e-6, scale, k_cache, v_cache, slots,
                                      rope_neox=neox, bias=bias)  # fmt: skip

    def norm(t, w):
        if w is None:
            return t
        return t / t.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w

    summed = qk.sum(0) + bias[: q_size + kv_size]
    angles = angles_at(positions, rope_dim, 10000.0)
    q_want = rotate_complex(norm(summed[:, :q_size].reshape(tokens, heads, head_dim), qw),
                            angles, neox) * scale  # fmt: skip
    k_want = rotate_complex(norm(summed[:, q_size:].reshape(tokens, kv_heads, head_dim), kw),
                            angles, neox)  # fmt: skip
    v_want = (v.sum(0) + bias[q_size + kv_size :]).reshape(tokens, kv_heads, head_dim)
    torch.testing.assert_close(q, q_want, rtol=1e-5, atol=1e-5)
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    for t, slot in ((0, 5), (2, 2)):
        torch.testing.assert_close(flat_k[slot], k_want[t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flat_v[slot], v_want[t], rtol=1e-5, atol=1e-5)
    written = torch.zeros(8, dtype=torch.bool)
    written[[5, 2]] = True
    assert flat_k[~written].abs().sum() == 0  # the padding token wrote nothing
    with pytest.raises(ValueError, match="bias"):
        ref.qk_norm_rope_store_kv_ref(qk, v, heads, kv_heads, head_dim, qw, kw, cos_t, sin_t,
                                      positions, 1e-6, scale, k_cache, v_cache, slots,
                                      bias=bias[:-1])  # fmt: skip


def test_ops_qk_rope_store_kv_rejects_one_norm_weight():
    from llcuda.kernels import ops

    cos_t, sin_t = ref.rope_table_ref(300, 8, 10000.0)
    cache = torch.zeros(1, 4, 1, 8)
    with pytest.raises(ValueError, match="q_weight and k_weight"):
        ops.qk_norm_rope_store_kv(torch.zeros(1, 16), torch.zeros(1, 8), 1, 1, 8, torch.ones(8),
                                  None, cos_t, sin_t, torch.tensor([0]), 1e-6, 1.0, cache,
                                  cache.clone(), torch.tensor([0]))  # fmt: skip


def test_paged_attention_softcap_equals_dense_capped_softmax():
    """Gemma 2's soft-cap: softcap * tanh(q.k / softcap) before the causal mask and softmax."""
    gen = torch.Generator().manual_seed(6)
    heads, kv_heads, head_dim, n, block_size, cap = 4, 1, 8, 11, 4, 5.0
    q = torch.randn(n, heads, head_dim, generator=gen) * 3
    k = torch.randn(n, kv_heads, head_dim, generator=gen) * 3
    v = torch.randn(n, kv_heads, head_dim, generator=gen)
    k_cache = torch.zeros(4, block_size, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    table = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    pos = torch.arange(n)
    ref.write_kv_ref(k, v, k_cache, v_cache, table[0][pos // block_size].long() * block_size
                     + pos % block_size)  # fmt: skip
    kk = k.repeat_interleave(heads, 1)
    scores = torch.einsum("qhd,khd->hqk", q, kk)
    scores = cap * torch.tanh(scores / cap)
    mask = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    want = torch.einsum("hqk,khd->qhd", probs, v.repeat_interleave(heads, 1))
    got = ref.paged_attention_ref(q, k_cache, v_cache, torch.tensor([0, n], dtype=torch.int32),
                                  torch.tensor([n], dtype=torch.int32), table, 0, softcap=cap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    uncapped = ref.paged_attention_ref(q, k_cache, v_cache, torch.tensor([0, n]),
                                       torch.tensor([n]), table, 0)  # fmt: skip
    assert (uncapped - want).abs().max() > 1e-2  # the cap changes the answer at these scores
