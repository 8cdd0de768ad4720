"""ModelConfig from GGUF metadata, read the way llama.cpp reads it (`llama-model.cpp` load_hparams).

The fields every decoder has are read once (`_common`); then one small reader per architecture
sets what is its own (GGUF-NOTES.md section 4 says where each rule comes from in llama.cpp):
- `llama` (also Mistral, SmolLM2, TinyLlama files): NORM rope (the converter permuted Q/K rows),
  SwiGLU, optional `attention.scale`, Llama 3 frequency factors in `rope_freqs.weight`.
- `qwen2`: NEOX rope, SwiGLU; q/k/v biases are found by the decoder from the tensor list.
- `qwen3`: qwen2 plus a per-head q/k RMSNorm.
- `phi3`: NEOX, SwiGLU over a fused [gate | up]; LongRoPE factors (long ones past the trained
  context) and `rope.scaling.attn_factor`, which scales cos and sin and so the scores by its square.
- `gemma2`: sqrt(n_embd) embedding scale, sandwich norms, GEGLU(tanh), attention (default 50) and
  final (default 30) logit soft-capping, even layers local with a 4096 window, tied head.
- `gemma3`: Gemma 2's skeleton with q/k norms instead of the attention soft-cap; local layers from
  `attention.sliding_window_pattern` (a bool per layer, or a period n, default 6: layer il is
  local iff il % n < n - 1) with `rope.freq_base_swa` (default 10000).
Both Gemmas scale q by 1/sqrt(head_dim), 1/sqrt(n_embd / n_head) for the 27B.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llcuda.config import ModelConfig
from llcuda.gguf.reader import GGUFError, GGUFFile, UnsupportedModelError

MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
_MISSING = object()


class _Meta:
    """Typed access to `{arch}.*` keys with errors that name the file and the key."""

    def __init__(self, g: GGUFFile, arch: str) -> None:
        self.g, self.arch = g, arch

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        full = f"{self.arch}.{key}"
        value = self.g.metadata.get(full, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise GGUFError(f"{self.g.path}: missing required metadata key {full!r}")
            return default
        return value

    def get_int(self, key: str, default: Any = _MISSING, per_layer: bool = False) -> int:
        value = self.raw(key, default)
        if per_layer and isinstance(value, (np.ndarray, list)):
            # llama.cpp accepts a per-layer array; we only run models whose layers agree
            if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
                raise GGUFError(
                    f"{self.g.path}: {self.arch}.{key} must be an integer or an array of "
                    f"integers, got {value!r:.80}"
                )
            values = {int(v) for v in value}
            if len(values) != 1:
                raise UnsupportedModelError(
                    f"{self.g.path}: {self.arch}.{key} differs between layers "
                    f"({sorted(values)}); only uniform layers are supported"
                )
            value = values.pop()
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise GGUFError(
                f"{self.g.path}: {self.arch}.{key} must be an integer, got {value!r:.80}"
            )
        return int(value)

    def get_float(self, key: str, default: Any = _MISSING) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GGUFError(f"{self.g.path}: {self.arch}.{key} must be a number, got {value!r:.80}")
        if not math.isfinite(value):
            raise GGUFError(f"{self.g.path}: {self.arch}.{key} must be finite, got {value!r}")
        return float(value)


def _f32_inv_sqrt(x: int) -> float:
    """1.0f / sqrtf(float(x)) as llama.cpp computes it, in float32."""
    return float(np.float32(1.0) / np.sqrt(np.float32(x)))


def _vocab_size(g: GGUFFile, n_embd: int) -> int:
    emb = g.tensors.get("token_embd.weight")
    if emb is None:
        raise GGUFError(f"{g.path}: missing tensor 'token_embd.weight'")
    if len(emb.shape) != 2 or emb.shape[0] != n_embd:
        raise GGUFError(
            f"{g.path}: token_embd.weight has shape {emb.shape}, expected ({n_embd}, n_vocab)"
        )
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and not isinstance(tokens, list):
        raise GGUFError(f"{g.path}: tokenizer.ggml.tokens must be an array of strings")
    if tokens is not None and len(tokens) != emb.shape[1]:
        raise GGUFError(
            f"{g.path}: tokenizer.ggml.tokens has {len(tokens)} tokens but token_embd.weight has "
            f"{emb.shape[1]} rows"
        )
    return emb.shape[1]


def _rope_scaling_factor(m: _Meta) -> float:
    kind = m.raw("rope.scaling.type", "linear")
    factor = m.get_float("rope.scaling.factor", 0.0)
    if factor == 0.0:
        factor = m.get_float("rope.scale_linear", 0.0)  # the old key name
    if kind == "none" or factor == 0.0:
        return 1.0
    if kind != "linear":
        raise UnsupportedModelError(
            f"{m.g.path}: rope scaling type {kind!r} is not supported (only linear)"
        )
    return factor


def _sliding_window_layers(m: _Meta, n_layers: int, default: int) -> tuple[bool, ...]:
    pattern = m.raw("attention.sliding_window_pattern", default)
    if isinstance(pattern, (np.ndarray, list)):
        if len(pattern) != n_layers:
            raise GGUFError(
                f"{m.g.path}: {m.arch}.attention.sliding_window_pattern has {len(pattern)} "
                f"entries for {n_layers} layers"
            )
        return tuple(bool(x) for x in pattern)
    n = m.get_int("attention.sliding_window_pattern", default)
    # llama_hparams::set_swa_pattern: n == 0 makes every layer local
    return tuple(n == 0 or il % n < n - 1 for il in range(n_layers))


def _common(m: _Meta) -> dict[str, Any]:
    """The fields every supported decoder reads the same way."""
    g = m.g
    n_embd = m.get_int("embedding_length")
    n_layers = m.get_int("block_count")
    n_head = m.get_int("attention.head_count", per_layer=True)
    n_kv_head = m.get_int("attention.head_count_kv", n_head, per_layer=True)
    if n_layers <= 0 or n_embd <= 0 or n_head <= 0 or n_kv_head <= 0 or n_head % n_kv_head:
        raise GGUFError(
            f"{g.path}: bad model shape: embedding_length={n_embd}, block_count={n_layers}, "
            f"head_count={n_head}, head_count_kv={n_kv_head}"
        )
    if n_layers > MAX_LAYERS:  # before any per-layer loop; check_tensor_shapes counts blocks
        raise GGUFError(
            f"{g.path}: {m.arch}.block_count is {n_layers}, more than the {MAX_LAYERS} layers "
            f"llama.cpp supports (LLAMA_MAX_LAYERS)"
        )
    head_dim = m.get_int("attention.key_length", n_embd // n_head)
    v_dim = m.get_int("attention.value_length", n_embd // n_head)
    if v_dim != head_dim:
        raise UnsupportedModelError(
            f"{g.path}: key_length {head_dim} != value_length {v_dim} is not supported"
        )
    rope_theta = m.get_float("rope.freq_base", 10000.0)
    return dict(
        architecture=m.arch,
        name=str(g.metadata.get("general.name", g.path.stem)),
        vocab_size=_vocab_size(g, n_embd),
        hidden_size=n_embd,
        intermediate_size=m.get_int("feed_forward_length", per_layer=True),
        num_layers=n_layers,
        num_heads=n_head,
        num_kv_heads=n_kv_head,
        head_dim=head_dim,
        rms_norm_eps=m.get_float("attention.layer_norm_rms_epsilon"),
        max_position_embeddings=m.get_int("context_length"),
        rope_theta=rope_theta,
        rope_theta_local=rope_theta,
        rope_scaling_factor=_rope_scaling_factor(m),
        rope_dim=m.get_int("rope.dimension_count", head_dim),
        tie_word_embeddings="output.weight" not in g.tensors,
        attention_scale=_f32_inv_sqrt(head_dim),
    )


def _optional_tensor(m: _Meta, name: str) -> str:
    return name if name in m.g.tensors else ""


def _llama(m: _Meta, c: dict[str, Any]) -> dict[str, Any]:
    if c["rope_dim"] != c["head_dim"]:  # llama.cpp: n_rot must cover the head
        raise GGUFError(
            f"{m.g.path}: invalid llama rope.dimension_count {c['rope_dim']} != {c['head_dim']}"
        )
    return dict(
        rope_neox=False,
        attention_scale=m.get_float("attention.scale", 0.0) or c["attention_scale"],
        rope_freq_factors=_optional_tensor(m, "rope_freqs.weight"),
    )


def _qwen2(m: _Meta, c: dict[str, Any]) -> dict[str, Any]:
    return {}


def _qwen3(m: _Meta, c: dict[str, Any]) -> dict[str, Any]:
    return dict(qk_norm=True)


def _phi3(m: _Meta, c: dict[str, Any]) -> dict[str, Any]:
    attn_factor = m.get_float("rope.scaling.attn_factor", 1.0)
    long_factors = _optional_tensor(m, "rope_factors_long.weight")
    return dict(
        # cos and sin are both multiplied by attn_factor, so q.k by its square: folded into q
        attention_scale=c["attention_scale"] * attn_factor * attn_factor,
        rope_freq_factors=_optional_tensor(m, "rope_factors_short.weight"),
        rope_long_factors=long_factors,
        rope_original_context=(
            m.get_int("rope.scaling.original_context_length", c["max_position_embeddings"])
            if long_factors
            else 0
        ),
    )


def _gemma(m: _Meta, c: dict[str, Any]) -> dict[str, Any]:
    """What Gemma 2 and 3 share."""
    n_embd, n_head = c["hidden_size"], c["num_heads"]
    big = c["num_layers"] == (46 if m.arch == "gemma2" else 62)  # the 27B models
    return dict(
        hidden_act="gelu_tanh",
        post_norms=True,
        attention_scale=_f32_inv_sqrt(n_embd // n_head if big else c["head_dim"]),
        embedding_scale=float(np.sqrt(np.float32(n_embd))),  # sqrtf(n_embd)
    )


def _gemma2(m: _Meta, c: dict[str, Any]) -> dict[str, Any]:
    window = m.get_int("attention.sliding_window", 4096)
    return dict(
        _gemma(m, c),
        attn_logit_softcapping=m.get_float("attn_logit_softcapping", 50.0),
        final_logit_softcapping=m.get_float("final_logit_softcapping", 30.0),
        sliding_window=window,
        sliding_window_layers=tuple(il % 2 == 0 for il in range(c["num_layers"])),
        rope_theta_local=m.get_float("rope.freq_base_swa", c["rope_theta"]),
        tie_word_embeddings=True,  # gemma2.cpp always reads the head from token_embd
    )


def _gemma3(m: _Meta, c: dict[str, Any]) -> dict[str, Any]:
    window = m.get_int("attention.sliding_window", 0)
    swa = window > 0
    return dict(
        _gemma(m, c),
        qk_norm=True,
        rope_theta_local=m.get_float("rope.freq_base_swa", 10000.0) if swa else 10000.0,
        sliding_window=window if swa else 0,
        sliding_window_layers=_sliding_window_layers(m, c["num_layers"], 6) if swa else (),
        final_logit_softcapping=m.get_float("final_logit_softcapping", 0.0),
    )


ARCHITECTURE_READERS = {
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "llama": _llama,
    "phi3": _phi3,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
}
SUPPORTED_ARCHITECTURES = tuple(sorted(ARCHITECTURE_READERS))


def model_config_from_gguf(g: GGUFFile) -> ModelConfig:
    """The model's shape and math from its GGUF metadata and tensor list."""
    arch = g.architecture
    reader = ARCHITECTURE_READERS.get(arch)
    if reader is None:
        raise UnsupportedModelError(
            f"{g.path}: unsupported architecture {arch!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    m = _Meta(g, arch)
    common = _common(m)
    return ModelConfig(**{**common, **reader(m, common)})
