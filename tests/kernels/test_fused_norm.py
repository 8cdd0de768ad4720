"""Fused Triton norms / RoPE / GEGLU against the pure-torch reference (reference.py)."""

from __future__ import annotations

import pytest
import torch

from llcuda.kernels import reference as ref

pytestmark = pytest.mark.gpu
fused_norm = pytest.importorskip(
    "llcuda.kernels.fused_norm", reason="needs triton (GPU builds of torch)"
)
DEVICE = "cuda"


def _rand(*shape, scale=1.0):
    return (torch.randn(*shape, generator=_rand.gen) * scale).to(DEVICE)


_rand.gen = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("tokens,n", [(1, 640), (7, 1152), (64, 2048), (3, 100)])
def test_rms_norm_and_residual(tokens, n):
    x, a, w1, w2 = _rand(tokens, n, scale=30), _rand(tokens, n, scale=200), _rand(n), _rand(n)
    torch.testing.assert_close(fused_norm.rms_norm(x, w1, 1e-6), ref.rms_norm_ref(x, w1, 1e-6))
    got = fused_norm.residual_rms_norm(x, a, w1, w2, 1e-6)
    want = ref.residual_rms_norm_ref(x, a, w1, w2, 1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens,n,splits", [(1, 4096, 1), (3, 2560, 4), (2, 1152, 1), (1, 96, 2)])
def test_norms_write_q8_rows(tokens, n, splits):
    """With q8 the norms also write h quantized for the int8 decode GEMVs: exactly
    pack_q8_ref(h), the h they return unchanged."""
    from llcuda.kernels.q8_activations import pack_q8_ref

    x, w1, w2 = _rand(tokens, n, scale=30), _rand(n), _rand(n)
    a = _rand(splits, tokens, n, scale=200)
    x_out, h, q = fused_norm.residual_rms_norm(x, a, None, w2, 1e-6, q8=True)
    plain = fused_norm.residual_rms_norm(x, a, None, w2, 1e-6)
    assert torch.equal(x_out, plain[0]) and torch.equal(h, plain[1])
    want = pack_q8_ref(h)
    assert torch.equal(q.words, want.words)
    torch.testing.assert_close(q.meta, want.meta, rtol=1e-6, atol=0)
    h, q = fused_norm.rms_norm(x, w1, 1e-6, q8=True)
    assert torch.equal(h, fused_norm.rms_norm(x, w1, 1e-6))
    assert torch.equal(q.words, pack_q8_ref(h).words)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim,splits", [(4, 1, 256, 1), (4, 1, 256, 5),
                                                            (8, 2, 128, 3), (2, 2, 64, 1)])
def test_qk_norm_rope_store_kv(heads, kv_heads, head_dim, splits, cache_dtype):
    """q returned, k and v stored, from split-K partials of one fused q|k|v output (views of it,
    as the model passes them), over padding slots (-1) that must change nothing."""
    tokens, block_size = 9, 16
    qk_size, kv_size = (heads + kv_heads) * head_dim, kv_heads * head_dim
    qkv = _rand(splits, tokens, qk_size + kv_size, scale=5)  # [S, T, q|k|v]
    qk, v = qkv[..., :qk_size], qkv[..., qk_size:]
    q_w, k_w = _rand(head_dim), _rand(head_dim)
    cos, sin = ref.rope_table_ref(32768, head_dim, 10000.0, device=DEVICE)
    positions = torch.tensor([0, 1, 5, 511, 512, 700, 2000, 32767, 3], device=DEVICE)
    slots = torch.randperm(6 * block_size, generator=_rand.gen)[:tokens].to(DEVICE)
    slots[3] = slots[7] = -1
    shape = (6, block_size, kv_heads, head_dim)
    k_cache, v_cache = _rand(*shape).to(cache_dtype), _rand(*shape).to(cache_dtype)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    args = (heads, kv_heads, head_dim, q_w, k_w, cos, sin, positions, 1e-6, 0.0625)
    want = ref.qk_norm_rope_store_kv_ref(qk, v, *args, k_want, v_want, slots)
    got = fused_norm.qk_norm_rope_store_kv(qk, v, *args, k_cache, v_cache, slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tol = {"rtol": 1e-5, "atol": 1e-5} if cache_dtype == torch.float32 else {}
    torch.testing.assert_close(k_cache, k_want, **tol)
    torch.testing.assert_close(v_cache, v_want, **tol)
    # whole rows: the matmul output unsplit ([T, n]) gives the same
    k2, v2 = _rand(*shape).to(cache_dtype), _rand(*shape).to(cache_dtype)
    summed = qkv.sum(0)
    got2 = fused_norm.qk_norm_rope_store_kv(summed[:, :qk_size], summed[:, qk_size:], *args,
                                            k2, v2, slots)  # fmt: skip
    torch.testing.assert_close(got2, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("tokens,f", [(1, 2048), (5, 6912), (2, 1000), (37, 8192), (1, 18944)])
def test_gated_act(tokens, f, act):
    """GEGLU and SwiGLU of a gate|up output, whole or as split-K partials."""
    gu = _rand(tokens, 2 * f, scale=4)
    gu[0, 0], gu[0, 1] = 60.0, -60.0  # tanh / exp saturation stays finite
    got = fused_norm.gated_act(gu, act)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref.gated_act_ref(gu, act), rtol=1e-5, atol=1e-5)
    parts = _rand(3, tokens, 2 * f, scale=2)  # split-K partials of the gate|up matmul
    torch.testing.assert_close(fused_norm.gated_act(parts, act), ref.gated_act_ref(parts, act),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_bf16_matmul_outputs_are_read_as_they_are():
    """bf16 rows (a matmul run in half precision) give the results of those rows widened."""
    x, w1, w2 = _rand(9, 1152, scale=30), _rand(1152), _rand(1152)
    a = _rand(9, 1152, scale=200).to(torch.bfloat16)
    got = fused_norm.residual_rms_norm(x, a, w1, w2, 1e-6)
    want = fused_norm.residual_rms_norm(x, a.float(), w1, w2, 1e-6)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w)
    gate_up = _rand(5, 2 * 6912).to(torch.bfloat16)
    torch.testing.assert_close(fused_norm.gated_act(gate_up, "gelu_tanh"),
                               fused_norm.gated_act(gate_up.float(), "gelu_tanh"))  # fmt: skip
    qkv = _rand(6, 1536).to(torch.bfloat16)
    cos, sin = _rand(ref.ROPE_FINE_STEPS + 1, 128), _rand(ref.ROPE_FINE_STEPS + 1, 128)
    pos, slots = torch.arange(6, device=DEVICE), torch.arange(6, device=DEVICE)
    args = (4, 1, 256, _rand(256), _rand(256), cos, sin, pos, 1e-6, 0.0625)
    caches = [torch.zeros(2, 8, 1, 256, device=DEVICE) for _ in range(4)]
    got = fused_norm.qk_norm_rope_store_kv(qkv[:, :1280], qkv[:, 1280:], *args, *caches[:2], slots)
    want = fused_norm.qk_norm_rope_store_kv(qkv[:, :1280].float(), qkv[:, 1280:].float(), *args,
                                            *caches[2:], slots)  # fmt: skip
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(caches[:2], caches[2:])


def test_residual_norm_adds_split_k_partials():
    x, w1, w2 = _rand(5, 1152, scale=30), _rand(1152), _rand(1152)
    parts = _rand(7, 5, 1152, scale=50)
    got = fused_norm.residual_rms_norm(x, parts, w1, w2, 1e-6)
    want = ref.residual_rms_norm_ref(x, parts.sum(dim=0), w1, w2, 1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_softcap_in_place():
    x = _rand(3, 262144, scale=40)
    want = ref.softcap_ref(x, 30.0)
    got = fused_norm.softcap_(x, 30.0)
    assert got.data_ptr() == x.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float32"):
        fused_norm.softcap_(x.to(torch.bfloat16), 30.0)


# (head_dim, num_heads, num_kv_heads) of the issue-17 architectures: GQA ratios 1 to 8
ARCH_HEADS = [(64, 32, 8), (64, 8, 8), (96, 32, 32), (128, 24, 8), (128, 28, 4), (128, 16, 2),
              (256, 8, 4), (256, 4, 1)]  # fmt: skip
ROPE_VARIANTS = [(norm, neox, bias) for norm in (True, False) for neox in (True, False)
                 for bias in (True, False)]  # fmt: skip


@pytest.mark.parametrize("tokens,splits", [(1, 3), (37, 1)], ids=["decode", "prefill"])
@pytest.mark.parametrize("norm,neox,bias", ROPE_VARIANTS,
                         ids=lambda v: str(v))  # fmt: skip
@pytest.mark.parametrize("head_dim,heads,kv_heads", ARCH_HEADS)
def test_qk_rope_store_kv_variants(head_dim, heads, kv_heads, norm, neox, bias, tokens, splits):
    """Every flag of the kernel (q/k norm, NEOX / NORM RoPE, q|k|v bias) against the reference:
    q returned, k and v stored (bf16 cache), a padding slot untouched; Llama 3-style factored
    rope tables."""
    block_size = 16
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = _rand(splits, tokens, q_size + 2 * kv_size, scale=3)
    qk, v = qkv[..., : q_size + kv_size], qkv[..., q_size + kv_size :]
    q_w, k_w = (_rand(head_dim), _rand(head_dim)) if norm else (None, None)
    b = _rand(q_size + 2 * kv_size) if bias else None
    cos, sin = ref.rope_table_ref(8192, head_dim, 500000.0, device=DEVICE,
                                  freq_factors=torch.linspace(1, 8, head_dim // 2))
    positions = torch.randint(0, 8192, (tokens,), generator=_rand.gen).to(DEVICE)
    slots = torch.randperm(4 * block_size * ((tokens + 15) // 16 + 1),
                           generator=_rand.gen)[:tokens].to(DEVICE)  # fmt: skip
    slots[tokens // 2] = -1
    shape = (slots.max().item() // block_size + 1, block_size, kv_heads, head_dim)
    k_cache, v_cache = _rand(*shape).bfloat16(), _rand(*shape).bfloat16()
    k_want, v_want = k_cache.clone(), v_cache.clone()
    args = (heads, kv_heads, head_dim, q_w, k_w, cos, sin, positions, 1e-6, head_dim**-0.5)
    kw = {"rope_neox": neox, "bias": b}
    want = ref.qk_norm_rope_store_kv_ref(qk, v, *args, k_want, v_want, slots, **kw)
    got = fused_norm.qk_norm_rope_store_kv(qk, v, *args, k_cache, v_cache, slots, **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_cache, k_want)
    torch.testing.assert_close(v_cache, v_want)


@pytest.mark.parametrize("splits", [1, 6])
@pytest.mark.parametrize("tokens,n", [(1, 2048), (1, 3072), (37, 4096), (3, 3584), (64, 896)])
def test_residual_without_post_norm(tokens, n, splits):
    """The Llama family's residual (HAS_POST off): x + a, then the next pre-norm; `a` as split-K
    partials of a matmul or whole."""
    x, w = _rand(tokens, n, scale=30), _rand(n)
    a = _rand(splits, tokens, n, scale=50)
    got = fused_norm.residual_rms_norm(x, a, None, w, 1e-5)
    want = ref.residual_rms_norm_ref(x, a, None, w, 1e-5)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)
