"""Rotary position embedding with a precomputed cos/sin table per (base, scale)."""

from __future__ import annotations

import torch

from llcuda.kernels import reference as ref


class RotaryEmbedding:
    """cos/sin for positions < max_positions, computed once; NEOX (Gemma, Qwen) or NORM (Llama)."""

    def __init__(
        self,
        rope_dim: int,
        max_positions: int,
        base: float,
        scale: float = 1.0,
        neox: bool = True,
        device: torch.device | str = "cpu",
    ):
        positions = torch.arange(max_positions, device=device)
        # [max_positions, rope_dim // 2] each
        self.cos, self.sin = ref.rope_cos_sin_ref(positions, rope_dim, base, scale)
        self.neox = neox

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, num_heads, head_dim]; positions: [num_tokens]
        cos, sin = self.cos[positions], self.sin[positions]
        rotate = ref.rope_neox_ref if self.neox else ref.rope_norm_ref
        return rotate(x, cos, sin)
