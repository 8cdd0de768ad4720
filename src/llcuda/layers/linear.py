"""A linear layer whose weight stays in its GGUF quantized blocks."""

from __future__ import annotations

import torch

from llcuda.kernels import ops
from llcuda.layers.quant_tensor import QuantTensor


class QuantLinear:
    """y = x @ W.T, W dequantized on the fly (reference) or inside the Triton kernel (CUDA)."""

    def __init__(self, weight: QuantTensor, device: torch.device | str = "cpu"):
        self.out_features, self.in_features = weight.shape
        self.qtype = weight.qtype
        self.weight = ops.prepare_weight(weight, device)
        self.nbytes = getattr(self.weight, "nbytes", weight.nbytes)  # bytes where it lives

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in_features] -> [num_tokens, out_features] float32
        return ops.quant_matmul(x, self.weight)
