"""Activations quantized to int8 per group of 32: the specification of the decode GEMV's INT8_X
path (quant_matmul._gemv_step_int8), which multiplies packed weights with int8 activations four
products per IDP4A instruction, as llama.cpp's MMVQ does with its Q8_1 blocks.

Per group of 32 consecutive elements of a row: dx = max|x| / 127, q = round(x / dx) (ties to
even) in [-127, 127], and the group stands for dx * q. The GEMV's result is then exactly (up to
float summation order) dequantize(w) @ quantize_q8_ref(x): the weight's zero points and minimums
meet the quantized activations too (the sum of dx * q, not of x), so one line states it.
"""

from __future__ import annotations

import torch

Q8_GROUP = 32


def quantize_q8_ref(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (K a multiple of 32) -> the values its int8 quantization stands for, [M, K] fp32."""
    m, k = x.shape
    if k % Q8_GROUP:
        raise ValueError(f"q8 activations need K a multiple of {Q8_GROUP}, got {k}")
    g = x.float().reshape(m, k // Q8_GROUP, Q8_GROUP)  # [M, G, 32]
    amax = g.abs().amax(dim=2, keepdim=True)  # [M, G, 1]
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), 0.0)
    q = torch.round(g * inv)  # half to even, as the kernel's 1.5 * 2^23 trick
    return (q * (amax * (1.0 / 127.0))).reshape(m, k)
