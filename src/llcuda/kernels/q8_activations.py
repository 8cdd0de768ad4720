"""Activations quantized to int8 per group of 32: the specification of the decode GEMV's INT8_X
path (quant_matmul._gemv_step_int8), which multiplies packed weights with int8 activations four
products per IDP4A instruction, as llama.cpp's MMVQ does with its Q8_1 blocks.

Per group of 32 consecutive elements of a row: dx = max|x| / 127, q = round(x / dx) (ties to
even) in [-127, 127], and the group stands for dx * q. The GEMV's result is then exactly (up to
float summation order) dequantize(w) @ quantize_q8_ref(x): the weight's zero points and minimums
meet the quantized activations too (the sum of dx * q, not of x), so one line states it.

Near rounding ties the spec leaves q open by one: the GPU divides 127 / max|x| approximately
(within 2 ulp) and fuses x * (127 / max|x|) + 1.5 * 2^23 into one multiply-add, so an element
whose x / dx lies within a few ulp of a half-integer may round to the other neighbour (one in
~10^5 random elements; Triton's interpreter differs there too). `q8_tie_slack` names those
elements, and the tests allow each of them either value.

The GEMV quantizes its activations itself, or reads them quantized (`Q8Rows`) from the kernel
that wrote them (fused_norm's norms, which have the whole row at hand): every GEMV program then
loads a quarter of the bytes and skips the per-group reductions. `pack_q8_ref` is that layout;
q8_tile holds the Triton code that writes and reads it (this module needs no Triton).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

Q8_GROUP = 32


class Q8Rows(NamedTuple):
    """Rows [M, K] quantized as quantize_q8_ref, in the layout the decode GEMV reads.

    words: int32 [M, K/4]; group g of a row is words 8g..8g+7, byte b of word j holding
        q[32g + 8b + j] (two's complement), the order of the packed weights' planes.
    meta: fp32 [M, K/32, 4] per group: dx, the sum of q over elements 0..15, the sum of q over
        all 32, and 0 (the sums are exact integers; the weights' zero points meet them).
    """

    words: torch.Tensor
    meta: torch.Tensor


def _groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, G, 32] round(x / dx) as fp32, dx [M, G])."""
    m, k = x.shape
    if k % Q8_GROUP:
        raise ValueError(f"q8 activations need K a multiple of {Q8_GROUP}, got {k}")
    g = x.float().reshape(m, k // Q8_GROUP, Q8_GROUP)  # [M, G, 32]
    amax = g.abs().amax(dim=2)  # [M, G]
    inv = torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), 0.0)
    q = torch.round(g * inv[..., None])  # half to even, as the kernel's 1.5 * 2^23 trick
    return q, amax * (1.0 / 127.0)


def quantize_q8_ref(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (K a multiple of 32) -> the values its int8 quantization stands for, [M, K] fp32."""
    q, dx = _groups(x)
    return (q * dx[..., None]).reshape(x.shape)


# |x / dx - (k + 1/2)| below this, the kernel may round either way: its 127 / max|x| is within 2
# ulp (2.4e-7 relative), i.e. 3e-5 at |x / dx| = 127; the interpreter's product was 7.6e-6 off
Q8_TIE_WINDOW = 5e-5


def q8_tie_slack(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> fp32 [M, K]: dx where x's element lies within Q8_TIE_WINDOW of a rounding tie
    (its q may be either neighbour), else 0. `q8_tie_slack(x) @ |W|.T` bounds what those
    elements can move a product."""
    m, k = x.shape
    g = x.float().reshape(m, k // Q8_GROUP, Q8_GROUP)
    amax = g.abs().amax(dim=2, keepdim=True)
    t = g * torch.where(amax > 0, 127.0 / torch.where(amax > 0, amax, 1.0), 0.0)
    near = ((t - torch.floor(t)) - 0.5).abs() < Q8_TIE_WINDOW
    return torch.where(near, amax * (1.0 / 127.0), 0.0).reshape(m, k)


def pack_q8_ref(x: torch.Tensor) -> Q8Rows:
    """x [M, K] -> its Q8Rows (the layout the norms write and the GEMV reads)."""
    q, dx = _groups(x)
    m, n_groups = dx.shape
    qb = q.to(torch.int32).reshape(m, n_groups, 4, 8) & 0xFF  # [M, G, byte b, word j]
    words = (qb << (8 * torch.arange(4, device=x.device)).view(1, 1, 4, 1)).sum(2)  # [M, G, 8]
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    meta = torch.stack([dx, q[..., :16].sum(-1), q.sum(-1), torch.zeros_like(dx)], dim=-1)
    return Q8Rows(words.reshape(m, -1).contiguous(), meta.contiguous())


def empty_q8_rows(m: int, k: int, device: torch.device) -> Q8Rows:
    """Uninitialised Q8Rows for m rows of k elements (k a multiple of 32), for a kernel to fill."""
    if k % Q8_GROUP:
        raise ValueError(f"q8 activations need K a multiple of {Q8_GROUP}, got {k}")
    return Q8Rows(torch.empty((m, k // 4), dtype=torch.int32, device=device),
                  torch.empty((m, k // Q8_GROUP, 4), dtype=torch.float32, device=device))
