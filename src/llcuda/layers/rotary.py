"""Rotary position embedding: the cos/sin table of one (base, scale), computed once at load.

The rotation itself is fused with the per-head Q/K norm (`ops.qk_norm_rope_store_kv`)."""

from __future__ import annotations

import torch

from llcuda.kernels import reference as ref


class RotaryEmbedding:
    """cos/sin [max_positions, rope_dim // 2] fp32 on the layer's device."""

    def __init__(
        self,
        rope_dim: int,
        max_positions: int,
        base: float,
        scale: float = 1.0,
        device: torch.device | str = "cpu",
    ):
        positions = torch.arange(max_positions, device=device)
        # [max_positions, rope_dim // 2] each
        self.cos, self.sin = ref.rope_cos_sin_ref(positions, rope_dim, base, scale)
