"""Pure-PyTorch reference kernels: the specification of every fused GPU kernel and the CPU path.

Each function computes in float32 exactly what llama.cpp computes (GGUF-NOTES.md section 3), written
for clarity over speed. Triton kernels in this package are tested against these functions.
"""

from __future__ import annotations

import math

import torch

from llcuda.kernels.dequant_ref import dequantize_ref
from llcuda.kernels.quant_matmul_cpu import quant_matmul_cpu
from llcuda.layers.quant_tensor import QuantTensor


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, in fp32 (GGUF norms hold 1+w)."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def softcap_ref(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma's logit soft-capping: cap * tanh(x / cap), fp32."""
    return cap * torch.tanh(x.float() / cap)


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), llama.cpp's GELU for GEGLU."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def geglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gelu_tanh_ref(gate) * up


def silu_ref(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) in fp32, llama.cpp's ggml_silu (SwiGLU's gate activation)."""
    x = x.float()
    return x * torch.sigmoid(x)


# The gated FFN activations by name: act(gate) * up. "gelu_tanh" is Gemma's GEGLU, "silu" the
# Llama / Qwen / Phi SwiGLU.
GATED_ACTS = {"gelu_tanh": gelu_tanh_ref, "silu": silu_ref}


def check_gated_act(act: str) -> None:
    if act not in GATED_ACTS:
        raise ValueError(f"unknown gated FFN activation {act!r}; known: {sorted(GATED_ACTS)}")


def rope_cos_sin_ref(
    positions: torch.Tensor,
    rope_dim: int,
    base: float,
    scale: float = 1.0,
    *,
    freq_factors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of theta_i = pos * scale * base^(-2i / rope_dim) / freq_factors[i], i < rope_dim/2.

    positions: [num_tokens] int -> cos, sin: [num_tokens, rope_dim // 2] float32. freq_factors:
    None (all ones) or [rope_dim // 2] (GGUF `rope_freqs.weight`: Llama 3's rope scaling, Phi-3's
    rope_factors_long / _short): llama.cpp's ggml_rope_ext divides each pair's angle by its factor.
    """
    half = rope_dim // 2
    i = torch.arange(0, half, dtype=torch.float64, device=positions.device)
    inv_freq = base ** (
        -2.0 * i / rope_dim
    )  # float64 then fp32 angles, like llama.cpp's powf chain
    if freq_factors is not None:
        if freq_factors.shape != (half,):
            raise ValueError(
                f"freq_factors has shape {tuple(freq_factors.shape)}, expected ({half},) for "
                f"rope_dim {rope_dim}"
            )
        inv_freq = inv_freq / freq_factors.to(device=positions.device, dtype=torch.float64)
    theta = positions.to(torch.float64)[:, None] * scale * inv_freq[None, :]
    return torch.cos(theta).float(), torch.sin(theta).float()


# The factored cos/sin table: position p = coarse + fine, coarse a multiple of ROPE_FINE_STEPS.
ROPE_FINE_STEPS = 256


def rope_table_ref(
    max_positions: int,
    rope_dim: int,
    base: float,
    scale: float = 1.0,
    device="cpu",
    *,
    freq_factors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of positions [0, max_positions), factored: [F + ceil(max_positions / F),
    rope_dim // 2] fp32 each (F = ROPE_FINE_STEPS). Rows [0, F) hold the angles of positions
    0..F-1, row F + j that of position j * F. The angle is linear in the position, so any
    position's cos/sin is two rows and the angle-sum identity (rope_at_ref): at 32k positions
    384 rows instead of 32,768 (0.4 MB instead of 32 MB for a 256-wide head). freq_factors
    (rope_cos_sin_ref) keep the angle linear in the position, so the factoring still holds."""
    fine = torch.arange(ROPE_FINE_STEPS, device=device)
    coarse = torch.arange(0, max_positions, ROPE_FINE_STEPS, device=device)
    return rope_cos_sin_ref(torch.cat((fine, coarse)), rope_dim, base, scale,
                            freq_factors=freq_factors)  # fmt: skip


def rope_at_ref(
    cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [num_tokens, rope_dim // 2] fp32 at positions, from rope_table_ref's tables:
    cos(a + b) = cos a cos b - sin a sin b, sin(a + b) = sin a cos b + cos a sin b."""
    fine = positions % ROPE_FINE_STEPS
    coarse = ROPE_FINE_STEPS + positions // ROPE_FINE_STEPS
    cf, sf = cos_table[fine], sin_table[fine]
    cc, sc = cos_table[coarse], sin_table[coarse]
    return cc * cf - sc * sf, sc * cf + cc * sf


def rope_neox_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NEOX rotation: element i pairs with i + rope_dim/2.

    x: [num_tokens, num_heads, head_dim]; cos, sin: [num_tokens, rope_dim // 2]. Dims past
    rope_dim pass through unchanged.
    """
    half = cos.shape[-1]
    x = x.float()
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c, rest), dim=-1)


def rope_norm_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NORM (Llama) rotation on adjacent pairs (2i, 2i+1). Shapes as rope_neox_ref."""
    half = cos.shape[-1]
    x = x.float()
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    pairs = rot.unflatten(-1, (half, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1)


def quant_matmul_ref(
    x: torch.Tensor, weight: QuantTensor, rows_per_chunk: int = 8192
) -> torch.Tensor:
    """x @ dequantize(weight).T without ever holding the whole float matrix.

    x: [num_tokens, in_features] -> [num_tokens, out_features] float32. The weight is dequantized
    `rows_per_chunk` output rows at a time, so a 262k-row LM head needs only a few MB of scratch.
    On CPU, `quant_matmul_cpu` does the same with decoders bit-equal to `dequantize_ref` that are
    tens of times faster (only the matmul's summation order can differ).
    """
    if weight.device.type == "cpu" and x.device.type == "cpu":
        return quant_matmul_cpu(x, weight)
    x32 = x.float()
    n_rows = weight.shape[0]
    if n_rows <= rows_per_chunk:
        return x32 @ weight.dequantize().T
    out = torch.empty(x32.shape[0], n_rows, dtype=torch.float32, device=x.device)
    for start in range(0, n_rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_rows)
        out[:, start:stop] = x32 @ weight.dequantize(slice(start, stop)).T
    return out


def embedding_ref(weight: QuantTensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Rows of a quantized embedding table. token_ids: [num_tokens] -> [num_tokens, n_embd] fp32."""
    rows = weight.data[token_ids.to(weight.data.device)]  # [num_tokens, row_bytes] uint8
    return dequantize_ref(rows, weight.qtype)


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store this step's keys and values in the paged cache.

    k, v: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads,
    head_dim]; slot_mapping: [num_tokens] int64, slot = block_id * block_size + offset. A
    negative slot marks a padding token (a CUDA-graph batch padded to its bucket): it is skipped,
    not written to the cache's last slot as a negative index would.
    """
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    real = slot_mapping >= 0
    if not bool(real.all()):
        k, v, slot_mapping = k[real], v[real], slot_mapping[real]
    k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = v.to(v_cache.dtype)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    sliding_window: int = 0,
    *,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of a flat batch of queries over each sequence's paged KV cache.

    q: [num_tokens, num_heads, head_dim], already scaled (no extra 1/sqrt(d) here);
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim];
    query_start_loc: [num_seqs + 1] offsets of each sequence's queries in q;
    seq_lens: [num_seqs] context length of each sequence including this step's tokens;
    block_tables: [num_seqs, max_blocks_per_seq] block ids;
    sliding_window: 0 for global attention, else a query at position p sees keys p-window+1 .. p;
    softcap: 0 for none, else Gemma 2's attention logit soft-capping, scores = softcap *
    tanh(scores / softcap) after q.k and before the mask and softmax.
    Returns [num_tokens, num_heads, head_dim] float32.

    The queries of a sequence are its last tokens: query i of sequence s sits at position
    seq_lens[s] - num_queries_s + i.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for s in range(len(lens)):
        q_start, q_end, ctx = qsl[s], qsl[s + 1], lens[s]
        num_q = q_end - q_start
        if num_q == 0:
            continue
        first_q_pos = ctx - num_q
        # Keys older than the first query's window are invisible to every query: skip them.
        key_start = max(0, first_q_pos - sliding_window + 1) if sliding_window > 0 else 0
        first_block, last_block = key_start // block_size, (ctx - 1) // block_size
        blocks = block_tables[s, first_block : last_block + 1].long()
        offset = first_block * block_size
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[key_start - offset : ctx - offset]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[key_start - offset : ctx - offset]
        k = k.float().repeat_interleave(group, dim=1)  # [num_keys, num_heads, head_dim]
        v = v.float().repeat_interleave(group, dim=1)
        qs = q[q_start:q_end].float()  # [num_q, num_heads, head_dim]
        scores = torch.einsum("qhd,khd->hqk", qs, k)  # [num_heads, num_q, num_keys]
        if softcap > 0.0:
            scores = softcap_ref(scores, softcap)
        q_pos = torch.arange(first_q_pos, ctx, device=q.device)[:, None]
        k_pos = torch.arange(key_start, ctx, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window > 0:
            visible &= (q_pos - k_pos) < sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def residual_rms_norm_ref(
    x: torch.Tensor,
    a: torch.Tensor,
    w_post: torch.Tensor | None,
    w_next: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma's post-norm residual then the next pre-norm: x' = x + RMSNorm(a)*w_post,
    h = RMSNorm(x')*w_next. x, a: [num_tokens, hidden] -> (x', h). `a` may also come as split-K
    partial sums [splits, num_tokens, hidden] (a matmul's `partials` output), summed here.
    w_post None: no post-norm, x' = x + a (the Llama family's plain residual)."""
    a = sum_partials_ref(a)
    x = x.float() + (a if w_post is None else rms_norm_ref(a, w_post, eps))
    return x, rms_norm_ref(x, w_next, eps)


def qk_norm_rope_ref(
    t: torch.Tensor,
    num_heads: int,
    head_dim: int,
    weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    scale: float = 1.0,
    *,
    rope_neox: bool = True,
) -> torch.Tensor:
    """Per-head RMSNorm (weight None: none), RoPE (NEOX halves, or with rope_neox False NORM
    adjacent pairs), then a scale. t: [num_tokens, num_heads * head_dim]; cos, sin: [num_tokens,
    rope_dim // 2] at each token's position (rope_at_ref) -> [num_tokens, num_heads, head_dim]
    fp32."""
    heads = t.float().reshape(t.shape[0], num_heads, head_dim)
    normed = heads if weight is None else rms_norm_ref(heads, weight, eps)
    rope = rope_neox_ref if rope_neox else rope_norm_ref
    return rope(normed, cos, sin) * scale


def sum_partials_ref(t: torch.Tensor) -> torch.Tensor:
    """A matmul output [T, n], or its split-K partial sums [S, T, n], as [T, n] fp32."""
    return t.float().sum(dim=0) if t.dim() == 3 else t.float()


def qk_norm_rope_store_kv_ref(
    qk: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    eps: float,
    scale: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    rope_neox: bool = True,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A layer's attention inputs in one pass. qk: [T, (num_heads + num_kv_heads) * head_dim]
    (q then k), v: [T, num_kv_heads * head_dim], either as split-K partials [S, T, n] too.
    Stores k = RoPE(RMSNorm(k)*k_weight) and v in the cache at slot_mapping (negative: skipped);
    returns q = RoPE(RMSNorm(q)*q_weight)*scale [T, num_heads, head_dim] fp32.

    q_weight / k_weight None: no per-head RMSNorm (Llama, Qwen2, Phi-3, Gemma 2). rope_neox False:
    NORM RoPE on adjacent pairs (llama.cpp's `llama` architecture), True: NEOX halves. bias: None
    or fp32 [q_size + 2 * kv_size] = [bq | bk | bv] (Qwen2), added to the summed q | k | v before
    the norm and RoPE (v before it is stored). RoPE covers the first 2 * cos.shape[-1] dims."""
    qk, v = sum_partials_ref(qk), sum_partials_ref(v)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qk, v = qk[:, : q_size + kv_size], v[:, :kv_size]
    if bias is not None:
        if bias.shape != (q_size + 2 * kv_size,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected "
                             f"({q_size + 2 * kv_size},) = [bq | bk | bv]")  # fmt: skip
        bias = bias.float()
        qk, v = qk + bias[: q_size + kv_size], v + bias[q_size + kv_size :]
    cos_at, sin_at = rope_at_ref(cos, sin, positions)  # [T, rope_dim // 2], shared by q and k
    q = qk_norm_rope_ref(qk[:, :q_size], num_heads, head_dim, q_weight, cos_at, sin_at, eps,
                         scale, rope_neox=rope_neox)  # fmt: skip
    k = qk_norm_rope_ref(qk[:, q_size:], num_kv_heads, head_dim, k_weight, cos_at, sin_at,
                         eps, rope_neox=rope_neox)  # fmt: skip
    write_kv_ref(k, v.reshape(-1, num_kv_heads, head_dim), k_cache, v_cache, slot_mapping)
    return q


def gated_act_ref(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """gate_up: [num_tokens, 2 * ffn] (gate | up), or its split-K partials [S, num_tokens,
    2 * ffn] -> act(gate) * up: [num_tokens, ffn] fp32, act one of GATED_ACTS."""
    check_gated_act(act)
    gate, up = sum_partials_ref(gate_up).chunk(2, dim=-1)
    return GATED_ACTS[act](gate) * up


def argmax_ref(x: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] -> [rows] int64: each row's first maximum, NaN above every number
    (torch.argmax; greedy sampling's choice)."""
    return x.argmax(dim=-1)
