"""ModelConfig from GGUF metadata, read the way llama.cpp reads it (`llama-model.cpp` load_hparams).

Gemma 3 (`src/models/gemma3.cpp`): sliding-window layers from `attention.sliding_window_pattern`
(a bool per layer, or a period n, default 6: layer il is local iff il % n < n - 1), local layers
use `rope.freq_base_swa` (default 10000), q is scaled by 1/sqrt(head_dim) (1/sqrt(n_embd/n_head)
for the 62-layer 27B), embeddings by sqrt(n_embd). Llama, Qwen2 and Qwen3 share the Llama-style
fields: no sliding window, no embedding scale, optional `attention.scale`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llcuda.config import ModelConfig
from llcuda.gguf.reader import GGUFError, GGUFFile, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("gemma3", "llama", "qwen2", "qwen3")
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


def _sliding_window_layers(m: _Meta, n_layers: int) -> tuple[bool, ...]:
    pattern = m.raw("attention.sliding_window_pattern", 6)
    if isinstance(pattern, (np.ndarray, list)):
        if len(pattern) != n_layers:
            raise GGUFError(
                f"{m.g.path}: {m.arch}.attention.sliding_window_pattern has {len(pattern)} "
                f"entries for {n_layers} layers"
            )
        return tuple(bool(x) for x in pattern)
    n = m.get_int("attention.sliding_window_pattern", 6)
    # llama_hparams::set_swa_pattern: n == 0 makes every layer local
    return tuple(n == 0 or il % n < n - 1 for il in range(n_layers))


def model_config_from_gguf(g: GGUFFile) -> ModelConfig:
    """The model's shape and math from its GGUF metadata and tensor list."""
    arch = g.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{g.path}: unsupported architecture {arch!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    m = _Meta(g, arch)
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
            f"{g.path}: {arch}.block_count is {n_layers}, more than the {MAX_LAYERS} layers "
            f"llama.cpp supports (LLAMA_MAX_LAYERS)"
        )
    head_dim = m.get_int("attention.key_length", n_embd // n_head)
    v_dim = m.get_int("attention.value_length", n_embd // n_head)
    if v_dim != head_dim:
        raise UnsupportedModelError(
            f"{g.path}: key_length {head_dim} != value_length {v_dim} is not supported"
        )
    rope_dim = m.get_int("rope.dimension_count", head_dim)
    common = dict(
        architecture=arch,
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
        rope_theta=m.get_float("rope.freq_base", 10000.0),
        rope_scaling_factor=_rope_scaling_factor(m),
        rope_dim=rope_dim,
        tie_word_embeddings="output.weight" not in g.tensors,
    )
    if arch == "gemma3":
        sliding_window = m.get_int("attention.sliding_window", 0)
        swa = sliding_window > 0
        # gemma3.cpp: the 27B (62 layers) scales q by 1/sqrt(n_embd / n_head) (integer division)
        scale_dim = n_embd // n_head if n_layers == 62 else head_dim
        return ModelConfig(
            **common,
            rope_theta_local=m.get_float("rope.freq_base_swa", 10000.0) if swa else 10000.0,
            sliding_window=sliding_window if swa else 0,
            sliding_window_layers=_sliding_window_layers(m, n_layers) if swa else (),
            attention_scale=_f32_inv_sqrt(scale_dim),
            final_logit_softcapping=m.get_float("final_logit_softcapping", 0.0),
            embedding_scale=float(np.sqrt(np.float32(n_embd))),  # sqrtf(n_embd), gemma3.cpp
        )
    # llama / qwen2 / qwen3
    if arch == "llama" and rope_dim != head_dim:
        raise GGUFError(f"{g.path}: invalid llama rope.dimension_count {rope_dim} != {head_dim}")
    return ModelConfig(
        **common,
        rope_theta_local=common["rope_theta"],
        attention_scale=m.get_float("attention.scale", 0.0) or _f32_inv_sqrt(head_dim),
    )
