"""Every weight's shape checked against the hyperparameters before anything is built.

llama.cpp's `create_tensor` refuses a file whose tensor is missing or has the wrong shape at load;
without this check such a file loads here and then every request fails deep inside a matmul.
Shapes are GGUF's `ne`, innermost first: a weight is `(in_features, out_features)`, so `attn_q`
is `(n_embd, n_head * head_dim)` (GGUF-NOTES section 1).

`check_block_count` runs first, from the metadata reader, so that an absurd `block_count` fails
against the tensors present before any per-layer loop (sliding-window pattern, model build) runs.
"""

from __future__ import annotations

from llcuda.config import ModelConfig
from llcuda.gguf.reader import GGUFError, GGUFFile


def _required_norms(c: ModelConfig) -> tuple[str, ...]:
    """The per-block norms the shared decoder (models/decoder.py) reads for this config."""
    return (
        ("ffn_norm",)
        + (("attn_q_norm", "attn_k_norm") if c.qk_norm else ())
        + (("post_attention_norm", "post_ffw_norm") if c.post_norms else ())
    )


def block_numbers(g: GGUFFile) -> set[int]:
    """The N of every `blk.N.*` tensor; a `blk.` name without a plain decimal N is an error."""
    found: set[int] = set()
    for name in g.tensors:
        if not name.startswith("blk."):
            continue
        part = name.split(".", 2)[1]
        if not part.isdecimal() or not part.isascii() or str(int(part)) != part:
            raise GGUFError(f"{g.path}: tensor {name!r} has no block number (expected blk.N.*)")
        found.add(int(part))
    return found


def check_block_count(g: GGUFFile, block_count: int, key: str) -> None:
    """`block_count` (metadata `key`) must match the blk.N tensors: blocks 0..block_count-1."""
    blocks = block_numbers(g)
    n_present = max(blocks) + 1 if blocks else 0
    if block_count != n_present:
        raise GGUFError(
            f"{g.path}: {key} is {block_count} but the file has tensors for {n_present} blocks "
            f"(blk.0 .. blk.{n_present - 1})"
            if n_present
            else f"{g.path}: {key} is {block_count} but the file has no blk.N tensors"
        )


def _check(g: GGUFFile, name: str, expected: tuple[int, ...], required: bool) -> bool:
    """True when `name` exists (with the expected shape); False when optional and absent."""
    info = g.tensors.get(name)
    if info is None:
        if required:
            raise GGUFError(f"{g.path}: missing tensor {name!r} (expected shape {expected})")
        return False
    if info.shape != expected:
        raise GGUFError(
            f"{g.path}: tensor {name!r} has shape {info.shape}, expected {expected} "
            f"(ne, innermost first)"
        )
    return True


def _check_hparams(g: GGUFFile, c: ModelConfig) -> None:
    arch = c.architecture
    for field, value in (
        ("embedding_length", c.hidden_size),
        ("feed_forward_length", c.intermediate_size),
        ("attention.head_count", c.num_heads),
        ("attention.head_count_kv", c.num_kv_heads),
        ("attention.key_length", c.head_dim),
    ):
        if value <= 0:
            raise GGUFError(f"{g.path}: {arch}.{field} must be positive, got {value}")
    for field, value in (
        ("attention.layer_norm_rms_epsilon", c.rms_norm_eps),
        ("attention.sliding_window", c.sliding_window),
        ("final_logit_softcapping", c.final_logit_softcapping),
    ):
        if value < 0:  # a negative epsilon turns the RMSNorm of a small vector into NaN
            raise GGUFError(f"{g.path}: {arch}.{field} must not be negative, got {value}")
    for field, value in (
        ("rope.freq_base", c.rope_theta),
        ("rope.freq_base_swa", c.rope_theta_local),
        ("rope.scaling.factor", c.rope_scaling_factor),
    ):
        if value <= 0:
            raise GGUFError(f"{g.path}: {arch}.{field} must be positive, got {value}")
    rope_dim = c.rope_dim or c.head_dim
    if rope_dim > c.head_dim or rope_dim % 2:
        raise GGUFError(
            f"{g.path}: {arch}.rope.dimension_count must be even and at most the head size "
            f"{c.head_dim}, got {rope_dim}"
        )


def check_tensor_shapes(g: GGUFFile, c: ModelConfig) -> None:
    """Raise GGUFError naming the first tensor that is missing, misplaced or misshapen."""
    _check_hparams(g, c)
    check_block_count(g, c.num_layers, f"{c.architecture}.block_count")
    n_embd, n_vocab = c.hidden_size, c.vocab_size
    half_rope = (c.rope_dim or c.head_dim) // 2

    _check(g, "token_embd.weight", (n_embd, n_vocab), required=True)
    _check(g, "output.weight", (n_embd, n_vocab), required=False)
    _check(g, "output_norm.weight", (n_embd,), required=True)
    for name in ("rope_freqs", "rope_factors_long", "rope_factors_short"):
        _check(g, f"{name}.weight", (half_rope,), required=False)

    for i in range(c.num_layers):
        _check_block(g, c, i)


def _check_block(g: GGUFFile, c: ModelConfig, i: int) -> None:
    n_embd, n_ff = c.hidden_size, c.intermediate_size
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def blk(kind: str, expected: tuple[int, ...], required: bool = True) -> bool:
        return _check(g, f"blk.{i}.{kind}.weight", expected, required)

    blk("attn_norm", (n_embd,))
    if f"blk.{i}.attn_qkv.weight" in g.tensors:  # fused q, k, v (phi3)
        blk("attn_qkv", (n_embd, q_dim + 2 * kv_dim))
    else:
        blk("attn_q", (n_embd, q_dim))
        blk("attn_k", (n_embd, kv_dim))
        blk("attn_v", (n_embd, kv_dim))
    blk("attn_output", (q_dim, n_embd))
    if c.architecture == "phi3":  # only llama.cpp's phi3 builder reads ffn_up as [gate | up]
        blk("ffn_up", (n_embd, 2 * n_ff))
    else:
        blk("ffn_gate", (n_embd, n_ff))
        blk("ffn_up", (n_embd, n_ff))
    blk("ffn_down", (n_ff, n_embd))
    required_norms = _required_norms(c)
    for kind, shape in (
        ("attn_q_norm", (c.head_dim,)),
        ("attn_k_norm", (c.head_dim,)),
        ("post_attention_norm", (n_embd,)),
        ("ffn_norm", (n_embd,)),
        ("post_ffw_norm", (n_embd,)),
    ):
        blk(kind, shape, required=kind in required_norms)
    for kind, size in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
        _check(g, f"blk.{i}.{kind}.bias", (size,), required=False)
