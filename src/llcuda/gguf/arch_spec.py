"""What a GGUF of each architecture holds as llama.cpp's converter (convert_hf_to_gguf.py) writes
it: the `{arch}.*` metadata keys and the tensor list (HF name, GGUF name, HF shape), for twins.

The converter maps Hugging Face names onto GGUF names (gguf-py's tensor_mapping.py) and writes
only the keys its model class knows:
- `llama` (LlamaModel): head_dim -> attention.key_length / value_length, rope.dimension_count,
  vocab_size; Llama 3 rope scaling is a `rope_freqs.weight` tensor of per-pair divisors (written
  first, generate_extra_tensors), no scaling key. Q/K rows are permuted for NORM (pairwise) RoPE.
- `qwen2`: no head_dim key (head_dim = n_embd / n_head); q/k/v biases.
- `qwen3`: head_dim -> key_length / value_length; attn_q_norm / attn_k_norm of size head_dim.
- `phi3` (Phi3MiniModel): rope.scaling.original_context_length, rope.dimension_count,
  attention.sliding_window; fused attn_qkv and ffn_up = [gate | up], no ffn_gate.
- `gemma2`: key/value_length, attn_logit_softcapping, final_logit_softcapping,
  attention.sliding_window; no rope.freq_base (llama.cpp's default 10000); norms hold 1 + w.
- `gemma3`: key/value_length, rope.freq_base, attention.sliding_window; norms hold 1 + w.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from gguf import GGUFValueType

ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")


@dataclass(frozen=True)
class ArchSpec:
    """One twin's shape and math (HF config fields, in llama.cpp's terms)."""

    arch: str
    n_embd: int
    n_layers: int
    n_ff: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab_size: int
    context_length: int = 4096
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tied: bool = True
    # llama 3 rope scaling (HF rope_scaling, rope_type llama3): factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings; None: plain RoPE
    llama3_rope: tuple[float, float, float, int] | None = None
    sliding_window: int = 0
    # Phi-3 LongRoPE (HF rope_type longrope): the trained context the long factors extend; 0: none
    longrope_original_context: int = 0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    tokenizer: str = "llama-bpe"  # tokenizer.ggml.pre for gpt2 BPE, "spm" or "gemma" (llama)
    name: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def has_biases(self) -> bool:
        return self.arch == "qwen2"

    @property
    def has_qk_norm(self) -> bool:
        return self.arch in ("qwen3", "gemma3")

    @property
    def is_gemma(self) -> bool:
        return self.arch in ("gemma2", "gemma3")


def longrope_factors(spec: ArchSpec) -> dict[str, np.ndarray]:
    """Phi-3 LongRoPE's divisors [head_dim / 2], short and long, growing with the wavelength as
    the real ones do (the long ones much more): the converter writes them as
    `rope_factors_short/long.weight` (Phi3MiniModel.generate_extra_tensors)."""
    i = np.arange(spec.head_dim // 2, dtype=np.float32) / (spec.head_dim // 2)
    return {"rope_factors_long": (1.0 + 15.0 * i * i).astype(np.float32),
            "rope_factors_short": (1.0 + 0.5 * i * i).astype(np.float32)}  # fmt: skip


def longrope_attn_factor(spec: ArchSpec) -> float:
    """The converter's `rope.scaling.attn_factor`: sqrt(1 + ln s / ln orig), s = ctx / orig."""
    orig = spec.longrope_original_context
    scale = spec.context_length / orig
    return math.sqrt(1.0 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def llama3_rope_factors(spec: ArchSpec) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: `rope_freqs` [head_dim / 2], the
    divisor of each rotary frequency (1 for short wavelengths, `factor` for long, smooth between).
    """
    assert spec.llama3_rope is not None
    factor, low_ff, high_ff, old_ctx = spec.llama3_rope
    dim = spec.head_dim
    freqs = 1.0 / (np.float32(spec.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen, high_wavelen = old_ctx / low_ff, old_ctx / high_ff
    factors = []
    for freq in freqs.astype(np.float64):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def tensor_list(spec: ArchSpec) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, GGUF name, HF shape [out, in] or [n]) in the converter's order: extra tensors,
    then the checkpoint's (names sorted: embed_tokens, layers by index, norm, lm_head)."""
    s = spec
    q_dim, kv_dim = s.n_head * s.head_dim, s.n_kv_head * s.head_dim
    out: list[tuple[str, str, tuple[int, ...]]] = []
    if s.llama3_rope is not None:
        out.append(("rope_freqs", "rope_freqs.weight", (s.head_dim // 2,)))
    if s.longrope_original_context:
        out += [(name, f"{name}.weight", (s.head_dim // 2,))
                for name in ("rope_factors_long", "rope_factors_short")]  # fmt: skip
    out.append(("model.embed_tokens.weight", "token_embd.weight", (s.vocab_size, s.n_embd)))
    for i in range(s.n_layers):
        layer: list[tuple[str, str, tuple[int, ...]]] = [
            ("input_layernorm.weight", "attn_norm.weight", (s.n_embd,)),
        ]
        if s.arch == "phi3":
            layer += [
                ("mlp.down_proj.weight", "ffn_down.weight", (s.n_embd, s.n_ff)),
                ("mlp.gate_up_proj.weight", "ffn_up.weight", (2 * s.n_ff, s.n_embd)),
                ("self_attn.o_proj.weight", "attn_output.weight", (s.n_embd, q_dim)),
                ("self_attn.qkv_proj.weight", "attn_qkv.weight", (q_dim + 2 * kv_dim, s.n_embd)),
            ]
        else:
            layer += [
                ("mlp.down_proj.weight", "ffn_down.weight", (s.n_embd, s.n_ff)),
                ("mlp.gate_proj.weight", "ffn_gate.weight", (s.n_ff, s.n_embd)),
                ("mlp.up_proj.weight", "ffn_up.weight", (s.n_ff, s.n_embd)),
                ("self_attn.k_proj.weight", "attn_k.weight", (kv_dim, s.n_embd)),
                ("self_attn.o_proj.weight", "attn_output.weight", (s.n_embd, q_dim)),
                ("self_attn.q_proj.weight", "attn_q.weight", (q_dim, s.n_embd)),
                ("self_attn.v_proj.weight", "attn_v.weight", (kv_dim, s.n_embd)),
            ]
        if s.has_biases:
            layer += [
                ("self_attn.k_proj.bias", "attn_k.bias", (kv_dim,)),
                ("self_attn.q_proj.bias", "attn_q.bias", (q_dim,)),
                ("self_attn.v_proj.bias", "attn_v.bias", (kv_dim,)),
            ]
        if s.has_qk_norm:
            layer += [
                ("self_attn.k_norm.weight", "attn_k_norm.weight", (s.head_dim,)),
                ("self_attn.q_norm.weight", "attn_q_norm.weight", (s.head_dim,)),
            ]
        if s.is_gemma:  # Gemma's post_attention_layernorm is a true post-attention norm
            layer += [
                ("post_attention_layernorm.weight", "post_attention_norm.weight", (s.n_embd,)),
                ("post_feedforward_layernorm.weight", "post_ffw_norm.weight", (s.n_embd,)),
                ("pre_feedforward_layernorm.weight", "ffn_norm.weight", (s.n_embd,)),
            ]
        else:
            layer.append(("post_attention_layernorm.weight", "ffn_norm.weight", (s.n_embd,)))
        layer.sort()
        out += [(f"model.layers.{i}.{hf}", f"blk.{i}.{gg}", shape) for hf, gg, shape in layer]
    out.append(("model.norm.weight", "output_norm.weight", (s.n_embd,)))
    if not s.tied:
        out.append(("lm_head.weight", "output.weight", (s.vocab_size, s.n_embd)))
    return out


def arch_metadata(spec: ArchSpec, file_type: int) -> list[tuple[str, object, GGUFValueType]]:
    """The `{arch}.*` keys in the converter's order (after general.*, before tokenizer.*)."""
    s, a = spec, spec.arch
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    ft = ("general.file_type", file_type, u32)
    kv: list[tuple[str, object, GGUFValueType]] = []
    if a == "phi3":
        kv += [
            (f"{a}.context_length", s.context_length, u32),
            (f"{a}.rope.scaling.original_context_length",
             s.longrope_original_context or s.context_length, u32),  # fmt: skip
            (f"{a}.embedding_length", s.n_embd, u32),
            (f"{a}.feed_forward_length", s.n_ff, u32),
            (f"{a}.block_count", s.n_layers, u32),
            (f"{a}.attention.head_count", s.n_head, u32),
            (f"{a}.attention.head_count_kv", s.n_kv_head, u32),
            (f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps, f32),
            (f"{a}.rope.dimension_count", s.head_dim, u32),
            (f"{a}.rope.freq_base", s.rope_theta, f32),
            ft,
            (f"{a}.attention.sliding_window", s.sliding_window, u32),
        ]
        if s.longrope_original_context:
            kv.append((f"{a}.rope.scaling.attn_factor", longrope_attn_factor(s), f32))
        return kv
    kv += [
        (f"{a}.context_length", s.context_length, u32),
        (f"{a}.embedding_length", s.n_embd, u32),
        (f"{a}.block_count", s.n_layers, u32),
        (f"{a}.feed_forward_length", s.n_ff, u32),
        (f"{a}.attention.head_count", s.n_head, u32),
        (f"{a}.attention.head_count_kv", s.n_kv_head, u32),
    ]
    if a != "gemma2":  # Gemma2Model writes no rope base (llama.cpp: 10000)
        kv.append((f"{a}.rope.freq_base", s.rope_theta, f32))
    kv.append((f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps, f32))
    if a in ("llama", "qwen3", "gemma2", "gemma3"):  # HF configs with a head_dim field
        kv += [
            (f"{a}.attention.key_length", s.head_dim, u32),
            (f"{a}.attention.value_length", s.head_dim, u32),
        ]
    kv.append(ft)
    if a == "llama":
        kv += [
            (f"{a}.vocab_size", s.vocab_size, u32),
            (f"{a}.rope.dimension_count", s.head_dim, u32),
        ]
    if a == "gemma2":
        kv += [
            (f"{a}.attn_logit_softcapping", s.attn_softcap, f32),
            (f"{a}.final_logit_softcapping", s.final_softcap, f32),
            (f"{a}.attention.sliding_window", s.sliding_window, u32),
        ]
    if a == "gemma3":
        kv.append((f"{a}.attention.sliding_window", s.sliding_window, u32))
    return kv
