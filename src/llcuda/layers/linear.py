"""A linear layer whose weight stays in its GGUF quantized blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llcuda.kernels import ops
from llcuda.layers import weight_staging
from llcuda.layers.quant_tensor import QuantTensor

if TYPE_CHECKING:
    from llcuda.kernels.q8_activations import Q8Rows


class QuantLinear:
    """y = x @ W.T, W dequantized on the fly (reference) or inside the Triton kernel (CUDA)."""

    def __init__(self, weight: QuantTensor, device: torch.device | str = "cpu"):
        self.out_features, self.in_features = weight.shape
        self.qtype = weight.qtype
        self.weight = _place([weight], device)
        self.nbytes = getattr(self.weight, "nbytes", weight.nbytes)  # bytes where it lives

    def __call__(self, x: torch.Tensor, xq: Q8Rows | None = None) -> torch.Tensor:
        # x: [num_tokens, in_features] -> [num_tokens, out_features] float32 (xq as partials')
        return ops.quant_matmul(x, self.weight, xq=xq)

    def reads_q8_rows(self) -> bool:
        """Whether a one-token product reads its input quantized by the norm that wrote it
        (ops.decode_reads_q8_rows)."""
        return ops.decode_reads_q8_rows(self.weight)

    def partials(self, x: torch.Tensor, xq: Q8Rows | None = None) -> torch.Tensor:
        # x: [num_tokens, in_features] -> split-K partial sums [splits, num_tokens, out_features],
        # for ops.residual_rms_norm, which adds them up instead of a separate reduction kernel;
        # xq: x's Q8Rows if the norm that wrote x quantized it too (the int8 decode GEMV reads it)
        return ops.quant_matmul(x, self.weight, partials=True, xq=xq)


class FusedQuantLinear:
    """Several weights that read the same input (q|k, gate|up), one output [T, sum of outs].

    On CUDA, weights of one quant type are concatenated once at load so a single matmul launch
    reads them all; otherwise each runs on its own and the outputs are concatenated.
    """

    def __init__(self, weights: list[QuantTensor], device: torch.device | str = "cpu"):
        self.split_sizes = [w.shape[0] for w in weights]
        self.out_features = sum(self.split_sizes)
        same_kind = len({(int(w.qtype), w.shape[1]) for w in weights}) == 1
        self.parts: list[QuantLinear] | None = None
        if torch.device(device).type == "cuda" and same_kind:
            self.weight = _place(weights, device)
            self.nbytes = self.weight.nbytes
        else:
            self.parts = [QuantLinear(w, device) for w in weights]
            self.nbytes = sum(p.nbytes for p in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in_features] -> [num_tokens, sum(split_sizes)] float32
        if self.parts is None:
            return ops.quant_matmul(x, self.weight)
        return torch.cat([part(x) for part in self.parts], dim=-1)

    def partials(self, x: torch.Tensor, xq: Q8Rows | None = None) -> torch.Tensor:
        # x: [num_tokens, in_features] -> split-K partial sums [splits, num_tokens, sum of outs]
        if self.parts is None:
            return ops.quant_matmul(x, self.weight, partials=True, xq=xq)
        return self(x).unsqueeze(0)

    def reads_q8_rows(self) -> bool:
        """As QuantLinear.reads_q8_rows (never for weights kept apart)."""
        return self.parts is None and ops.decode_reads_q8_rows(self.weight)

    def gated(self, x: torch.Tensor, act: str, xq: Q8Rows | None = None) -> torch.Tensor:
        # x: [num_tokens, in_features] -> act(gate) * up [num_tokens, ffn] for a gate|up pair of
        # equal halves (act "gelu_tanh": GEGLU, "silu": SwiGLU), the activation in the matmul's
        # epilogue where it can be
        if self.parts is None:
            return ops.quant_matmul_gated(x, self.weight, act, xq=xq)
        return ops.gated_act(self(x), act)


def _place(weights: list[QuantTensor], device: torch.device | str) -> object:
    """The weights where they will be used (ops.prepare_weight); on CUDA several of one kind are
    concatenated along N. The raw uploads and the repacking's temporaries come from the load's
    scratch pool (weight_staging); the result is copied out of it into memory of its own."""
    device = torch.device(device)
    if device.type == "cpu":
        (weight,) = weights
        return ops.prepare_weight(weight, device)
    from llcuda.kernels.quant_pack import fuse_packed

    with weight_staging.scratch(device):
        packed = [ops.prepare_weight(w, device) for w in weights]
    return fuse_packed(packed) if len(packed) > 1 else packed[0].clone()


def paired_partials(first: FusedQuantLinear | QuantLinear, second: QuantLinear, x: torch.Tensor,
                    xq: Q8Rows | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(first.partials(x), second.partials(x)): two layers that read the same input but keep
    their weights in different quant types (a Q4_K_M layer's q|k and its v). A GPU decode step
    runs both in one launch ([1, T, n] views of one output); anything else, one after another."""
    weight = getattr(first, "weight", None) if getattr(first, "parts", None) is None else None
    if weight is not None:
        both = ops.quant_matmul_pair(x, weight, second.weight, xq=xq)  # [T, n1 + n2] or None
        if both is not None:
            return both[None, :, : first.out_features], both[None, :, first.out_features :]
    return first.partials(x, xq), second.partials(x, xq)
