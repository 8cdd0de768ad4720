"""Rotary position embedding: the cos/sin tables of one (base, scale), computed once at load.

The rotation itself is fused with the per-head Q/K norm (`ops.qk_norm_rope_store_kv`)."""

from __future__ import annotations

import torch

from llcuda.kernels import reference as ref


class RotaryEmbedding:
    """cos/sin of positions [0, max_positions) as reference.rope_table_ref's factored tables,
    [256 + ceil(max_positions / 256), rope_dim // 2] fp32 each, on the layer's device. Whole
    tables ([max_positions, rope_dim // 2]) took 64 MiB of VRAM for Gemma 3 1B's two bases at
    32k context; these take 0.8 MiB, for two more row loads and the angle-sum identity.
    freq_factors: None or [rope_dim // 2] per-pair divisors of the angle (GGUF `rope_freqs.weight`,
    Llama 3's rope scaling; Phi-3's rope_factors_long / _short), as llama.cpp's ggml_rope_ext."""

    def __init__(
        self,
        rope_dim: int,
        max_positions: int,
        base: float,
        scale: float = 1.0,
        device: torch.device | str = "cpu",
        *,
        freq_factors: torch.Tensor | None = None,
    ):
        self.cos, self.sin = ref.rope_table_ref(max_positions, rope_dim, base, scale, device,
                                                freq_factors=freq_factors)  # fmt: skip
